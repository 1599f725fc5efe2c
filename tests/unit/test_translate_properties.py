"""Invariants of kpr.model.translate over random (valid) services, slices and nodes.

The checks compute what they expect from the inputs, independently of translate's internals. As in a real cluster,
a pod IP lives on one node, and in "zones" worlds its zone hints are a property of the address too, so an address's
locality and hints do not depend on which duplicate copy wins the merge.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpr.model.translate import local_ready_endpoints, translate
from kpr.model.types import (
    Backend,
    BackendState,
    Endpoint,
    EndpointPort,
    EndpointSliceSpec,
    Frontend,
    FrontendKind,
    NodeInfo,
    ServiceKey,
    ServicePort,
    ServiceSpec,
)

pytestmark = pytest.mark.unit

NODES = ("node-a", "node-b", "node-c")
ZONES = ("zone-a", "zone-b")
POD_IPS = {
    "IPv4": tuple(f"10.244.0.{i}" for i in range(1, 7)),
    "IPv6": tuple(f"fd00:244::{i}" for i in range(1, 7)),
    "FQDN": ("a.example.com", "b.example.com"),
}
ALL_POD_IPS = (*POD_IPS["IPv4"], *POD_IPS["IPv6"])
PORT_NAMES = ("", "http", "dns")
PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE = ServiceKey("default", "web")
EXTERNAL_IPS = ("198.51.100.1", "2001:db8::1", "192.168.0.10")  # one is a node address, one an LB IP as well
LB_IPS = ("203.0.113.1", "2001:db8::2", "198.51.100.1")
# "none": no hints; "zones": every endpoint has zone hints, fixed per address; "random": anything, node hints too
HINT_MODES = ("none", "zones", "random")


@dataclass
class World:
    service: ServiceSpec
    slices: list[EndpointSliceSpec]
    node: NodeInfo
    hint_mode: str = "none"
    home: dict[str, str] = field(default_factory=dict)  # pod IP → its node ("" = unknown)
    zone_hints: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pod IP → its hints ("zones" mode)


@st.composite
def endpoints(draw: st.DrawFn, family: str, world: World) -> Endpoint:
    count = draw(st.sampled_from((1, 1, 1, 1, 2, 0)))  # kube-proxy uses addresses[0]; an empty list is skipped
    addresses = tuple(draw(st.lists(st.sampled_from(POD_IPS[family]), min_size=count, max_size=count, unique=True)))
    terminating = draw(st.sampled_from((False, False, True)))
    ready = not terminating and draw(st.sampled_from((True, True, True, False)))  # never ready while terminating
    first = addresses[0] if addresses else ""
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()
    if world.hint_mode == "zones":
        hint_zones = world.zone_hints.get(first, ZONES)
    elif world.hint_mode == "random":
        hint_zones = tuple(draw(st.lists(st.sampled_from(ZONES), max_size=2, unique=True)))
        hint_nodes = tuple(draw(st.lists(st.sampled_from(NODES), max_size=2, unique=True)))
    return Endpoint(
        addresses=addresses,
        ready=ready,
        serving=draw(st.booleans()) or ready,
        terminating=terminating,
        node_name=world.home.get(first, "") if addresses else draw(st.sampled_from(NODES)),
        zone=draw(st.sampled_from(("", *ZONES))),
        hint_zones=hint_zones,
        hint_nodes=hint_nodes,
    )


@st.composite
def slices(draw: st.DrawFn, name: str, world: World) -> EndpointSliceSpec:
    service = world.service
    # mostly the families of the service's cluster IPs, sometimes another or FQDN
    families = tuple("IPv6" if ":" in ip else "IPv4" for ip in service.cluster_ips)
    family = draw(st.sampled_from(families * 4 + ("IPv4", "IPv6", "FQDN")))
    # mostly ports the service has (by name and protocol), sometimes one it does not
    ours = st.sampled_from([(p.name, p.protocol) for p in service.ports])
    other = st.tuples(st.sampled_from(PORT_NAMES), st.sampled_from(PROTOCOLS))
    n_ports = draw(st.sampled_from((1, 2, 1, 3, 0)))
    keys = draw(st.lists(st.one_of(ours, ours, ours, other), min_size=n_ports, max_size=n_ports))
    ports = [EndpointPort(n, proto, draw(st.sampled_from((53, 8080, 9090)))) for n, proto in keys]
    n_endpoints = draw(st.sampled_from((2, 1, 3, 4, 0)))
    return EndpointSliceSpec(
        namespace=draw(st.sampled_from(("default",) * 5 + ("other",))),
        name=name,
        service_name=draw(st.sampled_from(("web",) * 5 + ("api", ""))),
        address_type=family,
        endpoints=tuple(draw(st.lists(endpoints(family, world), min_size=n_endpoints, max_size=n_endpoints))),
        ports=tuple(ports),
    )


@st.composite
def services(draw: st.DrawFn) -> ServiceSpec:
    svc_type = draw(st.sampled_from(("ClusterIP", "NodePort", "LoadBalancer")))
    cluster_ips = draw(st.sampled_from((("10.96.0.1",), ("fd00:96::1",), ("10.96.0.1", "fd00:96::1"), ())))
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from((53, 80, 443)), st.sampled_from(PROTOCOLS)), min_size=1, max_size=3, unique=True
        )
    )
    names = draw(st.permutations(PORT_NAMES))
    ports = tuple(
        ServicePort(
            name=names[i],
            protocol=protocol,
            port=port,
            node_port=draw(st.sampled_from((0, 30000 + i))) if svc_type != "ClusterIP" else 0,
        )
        for i, (port, protocol) in enumerate(keys)
    )
    return ServiceSpec(
        key=SERVICE,
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=tuple(draw(st.lists(st.sampled_from(EXTERNAL_IPS), unique=True))),
        load_balancer_ips=tuple(draw(st.lists(st.sampled_from(LB_IPS), unique=True))),
        load_balancer_source_ranges=draw(st.sampled_from(((), ("10.0.0.0/8",), ("10.0.0.0/8", "2001:db8::/32")))),
        affinity_timeout=draw(st.sampled_from((0, 10800))),
        internal_traffic_policy=draw(st.sampled_from(("Cluster", "Local"))),
        external_traffic_policy=draw(st.sampled_from(("Cluster", "Local"))),
        traffic_distribution=draw(st.sampled_from(("", "PreferClose"))),
    )


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = len(ALL_POD_IPS)
    home = dict(zip(ALL_POD_IPS, draw(st.lists(st.sampled_from((*NODES, "")), min_size=n, max_size=n)), strict=True))
    hint_choices = st.sampled_from((("zone-a",), ("zone-b",), ("zone-a", "zone-b")))
    zone_hints = dict(zip(ALL_POD_IPS, draw(st.lists(hint_choices, min_size=n, max_size=n)), strict=True))
    node = NodeInfo(
        name=draw(st.sampled_from((*NODES, "node-z"))),
        zone=draw(st.sampled_from((*ZONES, ""))),
        primary_ips=tuple(draw(st.lists(st.sampled_from(("192.168.0.10", "fd00:192::10")), unique=True))),
    )
    world = World(draw(services()), [], node, draw(st.sampled_from(HINT_MODES)), home, zone_hints)
    names = draw(st.permutations([f"web-{c}" for c in "abcd"]))
    count = draw(st.sampled_from((2, 1, 2, 3, 4, 0)))
    world.slices = [draw(slices(names[i], world)) for i in range(count)]
    return world


# --- an independent view of the inputs ----------------------------------------------------------------------------


@dataclass
class Copies:
    """What every copy of one endpoint address:port in the service's slices (for one service port) says."""

    ready: bool = False  # some copy is ready (a ready copy wins the merge)
    all_serving_terminating: bool = True
    any_serving_terminating: bool = False
    local: bool = False
    hints: tuple[str, ...] = ()


def relevant(world: World, fe: Frontend) -> dict[tuple[str, int], Copies]:
    port = next(p for p in world.service.ports if p.name == fe.port_name and p.protocol == fe.protocol)
    family = "IPv6" if fe.family == 6 else "IPv4"
    out: dict[tuple[str, int], Copies] = {}
    for es in world.slices:
        if (es.namespace, es.service_name) != (SERVICE.namespace, SERVICE.name) or es.address_type != family:
            continue
        for ep_port in es.ports:
            if (ep_port.name, ep_port.protocol) != (port.name, port.protocol):
                continue
            for ep in es.endpoints:
                if not ep.addresses:
                    continue
                copies = out.setdefault((ep.addresses[0], ep_port.port), Copies())
                copies.ready |= ep.ready
                copies.all_serving_terminating &= ep.serving and ep.terminating
                copies.any_serving_terminating |= ep.serving and ep.terminating
                copies.local = bool(world.node.name) and ep.node_name == world.node.name
                copies.hints = ep.hint_zones
    return out


def external(fe: Frontend) -> bool:
    return fe.kind != FrontendKind.CLUSTER_IP


def external_policy_local(world: World) -> bool:
    svc = world.service
    accessible = svc.type in ("NodePort", "LoadBalancer") or bool(svc.external_ips)
    return accessible and svc.external_traffic_policy == "Local"


def uses_local_set(world: World, fe: Frontend) -> bool:
    if not external(fe):
        return world.service.internal_traffic_policy == "Local"
    return external_policy_local(world)


def backend_sets(fe: Frontend) -> list[tuple[str, Sequence[Backend]]]:
    sets: list[tuple[str, Sequence[Backend]]] = [("backends", fe.backends)]
    if fe.internal_backends is not None:
        sets.append(("internal", fe.internal_backends))
    return sets


def keys(backends: Sequence[Backend]) -> set[tuple[str, int]]:
    return {(b.addr, b.port) for b in backends}


Bounds = tuple[set[tuple[str, int]], set[tuple[str, int]]]  # (must be in the set, may be in the set)


def _fallback(copies: dict[tuple[str, int], Copies]) -> Bounds:
    # With no ready copy the first copy (in slice name order) wins: an address:port whose copies disagree may or may
    # not be serving-and-terminating after the merge.
    return (
        {k for k, c in copies.items() if c.all_serving_terminating},
        {k for k, c in copies.items() if c.any_serving_terminating},
    )


def expected_cluster_set(world: World, copies: dict[tuple[str, int], Copies]) -> Bounds | None:
    """Ready endpoints, zone-filtered when the hints apply, else the fallback; None when we cannot tell ("random")."""
    if world.hint_mode == "random":
        return None
    ready = {k for k, c in copies.items() if c.ready}
    if not ready:
        return _fallback(copies)
    zone = world.node.zone
    if world.hint_mode == "zones" and zone and any(zone in copies[k].hints for k in ready):
        ready = {k for k in ready if zone in copies[k].hints}
    return ready, ready


def expected_local_set(copies: dict[tuple[str, int], Copies]) -> Bounds:
    local = {k: c for k, c in copies.items() if c.local}
    ready = {k for k, c in local.items() if c.ready}
    return (ready, ready) if ready else _fallback(local)


def within(got: Sequence[Backend], bounds: Bounds) -> bool:
    must, may = bounds
    return must <= keys(got) <= may


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_no_duplicate_backends(world: World, got: list[Frontend]) -> None:
    for fe in got:
        for label, backends in backend_sets(fe):
            identities = [b.identity for b in backends]
            assert len(identities) == len(set(identities)), f"{fe.address} {label}: {identities}"


def check_backends_are_usable_endpoints(world: World, got: list[Frontend]) -> None:
    """Every backend is a ready endpoint, or a serving-and-terminating one when its set has no ready endpoint."""
    for fe in got:
        copies = relevant(world, fe)
        for label, backends in backend_sets(fe):
            local_set = label == "backends" and uses_local_set(world, fe)
            candidates = {k: c for k, c in copies.items() if c.local} if local_set else copies
            any_ready = any(c.ready for c in candidates.values())
            for b in backends:
                c = candidates.get((b.addr, b.port))
                assert c is not None, f"{fe.address} {label}: {b} is not an endpoint of this set"
                assert c.ready or c.any_serving_terminating, f"{fe.address} {label}: {b} is not usable"
                if not c.ready:
                    assert not any_ready, f"{fe.address} {label}: {b} is a fallback although one is ready"
                assert b.protocol == fe.protocol
                assert (b.state == BackendState.ACTIVE) == c.ready, f"{fe.address} {label}: {b}"


def check_local_policies_yield_only_node_local_backends(world: World, got: list[Frontend]) -> None:
    for fe in got:
        if uses_local_set(world, fe):
            assert all(b.node_local for b in fe.backends), fe
            assert all(world.home.get(b.addr) == world.node.name for b in fe.backends), fe
        for b in (*fe.backends, *(fe.internal_backends or ())):
            assert b.node_local == (world.home.get(b.addr, "") == world.node.name != ""), b


def check_sets_are_complete(world: World, got: list[Frontend]) -> None:
    """The cluster set is every ready endpoint (zone-filtered when hints apply), the local set every ready local one,
    each falling back to serving-and-terminating ones; in-cluster clients of ETP=Local frontends get the cluster set.
    """
    for fe in got:
        copies = relevant(world, fe)
        cluster, local = expected_cluster_set(world, copies), expected_local_set(copies)
        want = local if uses_local_set(world, fe) else cluster
        if want is not None:
            assert within(fe.backends, want), fe
        if external(fe) and external_policy_local(world) and cluster is not None:
            internal = fe.internal_backends if fe.internal_backends is not None else fe.backends
            assert within(internal, cluster), fe


def check_backend_family_matches_frontend(world: World, got: list[Frontend]) -> None:
    for fe in got:
        for _, backends in backend_sets(fe):
            assert all((":" in b.addr) == (fe.family == 6) for b in backends), fe


def check_frontends_unique_and_sorted(world: World, got: list[Frontend]) -> None:
    addresses = [fe.address for fe in got]
    assert len(addresses) == len(set(addresses)), addresses
    order = [(fe.family, int(ipaddress.ip_address(fe.addr)), fe.port, fe.protocol) for fe in got]
    assert order == sorted(order), addresses
    for fe in got:
        for _, backends in backend_sets(fe):
            backend_order = [(int(ipaddress.ip_address(b.addr)), b.port) for b in backends]
            assert backend_order == sorted(backend_order), fe


def check_drop_only_when_endpoints_exist_elsewhere(world: World, got: list[Frontend]) -> None:
    for fe in got:
        copies = relevant(world, fe)
        if fe.backends:
            assert not fe.empty_drop, fe
        if fe.empty_drop:
            assert any(c.ready or c.any_serving_terminating for c in copies.values()), fe
        if not fe.backends and not uses_local_set(world, fe):
            assert not fe.empty_drop, f"cluster policy with no usable endpoint must reject: {fe}"
        if not fe.backends and any(c.ready for c in copies.values()):
            assert fe.empty_drop, f"endpoints elsewhere only must drop: {fe}"


def check_internal_backends_only_for_external_local(world: World, got: list[Frontend]) -> None:
    for fe in got:
        if fe.internal_backends is not None:
            assert external(fe) and uses_local_set(world, fe), fe
            assert fe.internal_backends != fe.backends, fe
        assert fe.affinity_timeout == world.service.affinity_timeout
        if fe.kind != FrontendKind.LOAD_BALANCER:
            assert fe.source_ranges == ()


def check_every_endpoint_is_a_backend_or_standby(world: World, got: list[Frontend]) -> None:
    """Flows may sit on any endpoint of the port: each one is in a slot set or standby, once, with its state."""
    for fe in got:
        copies = relevant(world, fe)
        in_slots = keys(fe.backends) | keys(fe.internal_backends or ())
        standby = [(b.addr, b.port) for b in fe.standby]
        assert len(standby) == len(set(standby)), f"{fe.address}: duplicate standby {standby}"
        assert not in_slots & set(standby), f"{fe.address}: standby overlaps the slots"
        assert in_slots | set(standby) == set(copies), f"{fe.address}: endpoints missing or invented"
        for b in fe.standby:
            c = copies[(b.addr, b.port)]
            assert b.protocol == fe.protocol and (b.state == BackendState.ACTIVE) == c.ready, f"{fe.address}: {b}"
            assert b.node_local == c.local, f"{fe.address}: {b}"


def check_health_check_counts_ready_local_endpoints(world: World, got: list[Frontend]) -> None:
    """Per family of the service: distinct addresses of ready endpoints on this node over every service port; never
    terminating or not-ready ones (a ready copy of an address:port wins the merge)."""
    families = {"IPv6" if ":" in ip else "IPv4" for ip in world.service.cluster_ips}
    counts = {}
    for family in families:
        ready_local: set[str] = set()
        for port in world.service.ports:
            seen: dict[tuple[str, int], Copies] = {}
            for es in world.slices:
                if (es.namespace, es.service_name, es.address_type) != ("default", "web", family):
                    continue
                for ep_port in es.ports:
                    if (ep_port.name, ep_port.protocol) != (port.name, port.protocol):
                        continue
                    for ep in es.endpoints:
                        if ep.addresses:
                            copies = seen.setdefault((ep.addresses[0], ep_port.port), Copies())
                            copies.ready |= ep.ready
                            copies.local = bool(world.node.name) and ep.node_name == world.node.name
            ready_local |= {addr for (addr, _), c in seen.items() if c.ready and c.local}
        counts[family] = len(ready_local)
    assert local_ready_endpoints(world.service, world.slices, world.node) == counts


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]


@SETTINGS
@given(worlds())
def test_translate_invariants(world: World) -> None:
    # One generated world feeds every check: generating worlds costs far more than translating them.
    got = translate(world.service, world.slices, world.node)
    for check in CHECKS:
        check(world, got)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.randoms(use_true_random=False))
def test_deterministic(world: World, rnd: random.Random) -> None:
    first = translate(world.service, world.slices, world.node)
    assert translate(world.service, world.slices, world.node) == first
    shuffled = list(world.slices)
    rnd.shuffle(shuffled)
    assert translate(world.service, shuffled, world.node) == first


def test_every_check_is_run() -> None:
    assert len(CHECKS) == 10
