"""Table tests for kpr.model.translate, driven by tests/unit/cases/translate/*.yaml.

Each case file holds `node:` (name, zone, primaryIPs), `objects:` (raw Service / EndpointSlice manifests,
converted through kpr.objects.convert as the agent would) and `expect:` (every frontend of every service, compactly):

    - frontend: 10.96.0.10:80/TCP        # addr:port/protocol, IPv6 as [addr]:port/protocol
      kind: ClusterIP
      backends: ["10.244.1.2:8080 local", "10.244.2.3:8080 terminating"]   # flags: local, and a state
      internal: null                     # internal_backends (default null)
      standby: ["10.244.2.4:8080 not-serving"]  # the other endpoints, kept for their flows (default [])
      drop: false                        # empty_drop (default false)
      affinity: 0                        # affinity_timeout (default 0)
      sourceRanges: []                   # source_ranges (default [])
      service: default/web               # optional
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kpr.model.translate import (
    frontends_by_address,
    local_ready_endpoints,
    needs_health_check,
    node_eligible,
    translate,
)
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
from kpr.objects.convert import endpoint_slice_from_dict, object_kind, service_from_dict

pytestmark = pytest.mark.unit

CASES_DIR = Path(__file__).parent / "cases" / "translate"
CASES = sorted(CASES_DIR.glob("*.yaml"))
EXPECT_DEFAULTS: dict[str, Any] = {"internal": None, "drop": False, "affinity": 0, "sourceRanges": [], "standby": []}


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def render_backend(backend: Backend) -> str:
    flags = ["local"] if backend.node_local else []
    if backend.state != BackendState.ACTIVE:
        flags.append(str(backend.state))
    return " ".join([_hostport(backend.addr, backend.port), *flags])


def render_backends(backends: Iterable[Backend] | None) -> list[str] | None:
    return None if backends is None else [render_backend(b) for b in backends]


def render(fe: Frontend) -> dict[str, Any]:
    for backend in (*fe.backends, *(fe.internal_backends or ()), *fe.standby):
        assert backend.protocol == fe.protocol, f"{fe.address}: backend {backend} has another protocol"
    return {
        "frontend": f"{_hostport(fe.addr, fe.port)}/{fe.protocol}",
        "kind": str(fe.kind),
        "service": str(fe.service),
        "backends": render_backends(fe.backends),
        "internal": render_backends(fe.internal_backends),
        "drop": fe.empty_drop,
        "affinity": fe.affinity_timeout,
        "sourceRanges": list(fe.source_ranges),
        "standby": render_backends(fe.standby),
    }


def run_case(case: Mapping[str, Any]) -> list[Frontend]:
    raw_node = case["node"]
    node = NodeInfo(
        name=raw_node["name"],
        zone=raw_node.get("zone") or "",
        primary_ips=tuple(raw_node.get("primaryIPs") or ()),
    )
    services: list[ServiceSpec] = []
    slices: list[EndpointSliceSpec] = []
    for obj in case["objects"]:
        kind = object_kind(obj)
        if kind == "Service":
            services.append(service_from_dict(obj))
        elif kind == "EndpointSlice":
            slices.append(endpoint_slice_from_dict(obj))
        else:
            raise AssertionError(f"unexpected object kind {kind!r} in case")
    return [fe for svc in services for fe in translate(svc, slices, node)]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_translate_case(path: Path) -> None:
    case = yaml.safe_load(path.read_text())
    got = [render(fe) for fe in run_case(case)]
    got_by_frontend = {fe["frontend"]: fe for fe in got}
    assert len(got_by_frontend) == len(got), "two frontends with the same address"

    want_by_frontend: dict[str, dict[str, Any]] = {}
    for item in case["expect"]:
        want = {**EXPECT_DEFAULTS, **item}
        if "service" not in item:
            got_by_frontend.get(want["frontend"], {}).pop("service", None)
        assert want["frontend"] not in want_by_frontend, f"{path.name}: {want['frontend']} expected twice"
        want_by_frontend[want["frontend"]] = want
    assert got_by_frontend == want_by_frontend


def test_case_files_exist() -> None:
    assert len(CASES) >= 18


# --- behaviour the YAML tables do not show well -------------------------------------------------------------------

NODE = NodeInfo(name="node-a", zone="zone-a", primary_ips=("192.168.0.10", "fd00::10"))


def _slice(
    name: str, service: str, family: str, addrs: Iterable[tuple[str, bool]], port: int = 8080
) -> EndpointSliceSpec:
    return EndpointSliceSpec(
        namespace="default",
        name=name,
        service_name=service,
        address_type=family,
        endpoints=tuple(Endpoint(addresses=(a,), ready=r, node_name="node-b") for a, r in addrs),
        ports=(EndpointPort(name="", protocol="TCP", port=port),),
    )


def test_output_sorted_by_family_address_port_protocol() -> None:
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        type="NodePort",
        cluster_ips=("fd00::a", "10.96.0.100"),
        external_ips=("10.96.0.9",),
        ports=(
            ServicePort(name="b", protocol="UDP", port=53, node_port=30053),
            ServicePort(name="a", protocol="TCP", port=53, node_port=30054),
            ServicePort(name="c", protocol="TCP", port=8, node_port=30008),
        ),
    )
    slices = [
        _slice("v4", "web", "IPv4", [("10.244.0.10", True), ("10.244.0.9", True), ("10.244.0.100", True)]),
    ]
    got = [(fe.addr, fe.port, fe.protocol) for fe in translate(svc, slices, NODE)]
    assert got == [  # NodePorts at the wildcard address of each family: served on every NodePort address
        ("0.0.0.0", 30008, "TCP"),
        ("0.0.0.0", 30053, "UDP"),
        ("0.0.0.0", 30054, "TCP"),
        ("10.96.0.9", 8, "TCP"),
        ("10.96.0.9", 53, "TCP"),
        ("10.96.0.9", 53, "UDP"),
        ("10.96.0.100", 8, "TCP"),
        ("10.96.0.100", 53, "TCP"),
        ("10.96.0.100", 53, "UDP"),
        ("::", 30008, "TCP"),
        ("::", 30053, "UDP"),
        ("::", 30054, "TCP"),
        ("fd00::a", 8, "TCP"),
        ("fd00::a", 53, "TCP"),
        ("fd00::a", 53, "UDP"),
    ]
    # backends in numeric address order, not string order
    named = ServiceSpec(key=svc.key, cluster_ips=("10.96.0.100",), ports=(ServicePort("", "TCP", 80),))
    (fe,) = translate(named, slices, NODE)
    assert [b.addr for b in fe.backends] == ["10.244.0.9", "10.244.0.10", "10.244.0.100"]


def test_ready_duplicate_wins_whatever_the_slice_order() -> None:
    svc = ServiceSpec(key=ServiceKey("default", "web"), cluster_ips=("10.96.0.1",), ports=(ServicePort("", "TCP", 80),))
    not_ready_first = _slice("a", "web", "IPv4", [("10.244.0.1", False)])
    ready_second = _slice("b", "web", "IPv4", [("10.244.0.1", True)])
    for order in ([not_ready_first, ready_second], [ready_second, not_ready_first]):
        (fe,) = translate(svc, order, NODE)
        assert [b.addr for b in fe.backends] == ["10.244.0.1"]


def test_same_address_different_ports_are_two_backends() -> None:
    svc = ServiceSpec(key=ServiceKey("default", "web"), cluster_ips=("10.96.0.1",), ports=(ServicePort("", "TCP", 80),))
    slices = [
        _slice("a", "web", "IPv4", [("10.244.0.1", True)], 8080),
        _slice("b", "web", "IPv4", [("10.244.0.1", True)], 9090),
    ]
    (fe,) = translate(svc, slices, NODE)
    assert [(b.addr, b.port) for b in fe.backends] == [("10.244.0.1", 8080), ("10.244.0.1", 9090)]


def test_translate_accepts_a_one_shot_iterable() -> None:
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        cluster_ips=("10.96.0.1", "fd00::1"),
        ports=(ServicePort("", "TCP", 80), ServicePort("x", "TCP", 81)),
    )
    slices = [_slice("a", "web", "IPv4", [("10.244.0.1", True)]), _slice("b", "web", "IPv6", [("fd00:244::1", True)])]
    got = translate(svc, iter(slices), NODE)
    assert {fe.addr: len(fe.backends) for fe in got if fe.port == 80} == {"10.96.0.1": 1, "fd00::1": 1}


def test_a_shared_address_within_a_service_yields_one_frontend() -> None:
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        type="LoadBalancer",
        cluster_ips=("10.96.0.1",),
        external_ips=("203.0.113.5",),
        load_balancer_ips=("203.0.113.5",),
        ports=(ServicePort("", "TCP", 80),),
    )
    got = translate(svc, [], NODE)
    assert [(fe.addr, fe.kind) for fe in got] == [
        ("10.96.0.1", FrontendKind.CLUSTER_IP),
        ("203.0.113.5", FrontendKind.EXTERNAL_IP),
    ]


def test_external_addresses_of_a_family_without_cluster_ip_are_ignored() -> None:
    # kube-proxy's per-family proxier (newBaseServiceInfo) drops externalIPs / LB IPs of a family the service lacks.
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        type="LoadBalancer",
        cluster_ips=("10.96.0.1",),
        external_ips=("2001:db8::7",),
        load_balancer_ips=("2001:db8::8", "203.0.113.8"),
        load_balancer_source_ranges=("10.0.0.0/8", "2001:db8::/32"),
        ports=(ServicePort("", "TCP", 80),),
    )
    got = {fe.addr: fe for fe in translate(svc, [], NODE)}
    assert set(got) == {"10.96.0.1", "203.0.113.8"}
    assert got["203.0.113.8"].source_ranges == ("10.0.0.0/8",)


def test_frontends_by_address_first_wins() -> None:
    key_a, key_b = ServiceKey("default", "a"), ServiceKey("default", "b")
    fe_a = Frontend(key_a, "", FrontendKind.EXTERNAL_IP, "203.0.113.1", 80, "TCP", ())
    fe_b = Frontend(key_b, "", FrontendKind.EXTERNAL_IP, "203.0.113.1", 80, "TCP", ())
    fe_c = Frontend(key_b, "", FrontendKind.EXTERNAL_IP, "203.0.113.1", 80, "UDP", ())
    index = frontends_by_address([fe_a, fe_b, fe_c])
    assert index == {("203.0.113.1", 80, "TCP"): fe_a, ("203.0.113.1", 80, "UDP"): fe_c}


def test_endpoint_of_the_wrong_family_is_ignored() -> None:
    # kube-proxy's EndpointSliceCache.addEndpoints skips an address whose family is not the slice's proxier's.
    svc = ServiceSpec(key=ServiceKey("default", "web"), cluster_ips=("10.96.0.1",), ports=(ServicePort("", "TCP", 80),))
    mixed = _slice("a", "web", "IPv4", [("10.244.0.1", True), ("fd00:244::1", True)])
    (fe,) = translate(svc, [mixed], NODE)
    assert [b.addr for b in fe.backends] == ["10.244.0.1"]


def test_load_balancer_ips_need_type_load_balancer() -> None:
    # A service changed from LoadBalancer to NodePort may still carry its old status for a while.
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        type="NodePort",
        cluster_ips=("10.96.0.1",),
        load_balancer_ips=("203.0.113.9",),
        ports=(ServicePort("", "TCP", 80, node_port=30080),),
    )
    assert [fe.kind for fe in translate(svc, [], NODE)] == [FrontendKind.NODE_PORT, FrontendKind.CLUSTER_IP]


def test_health_check_counts_distinct_ready_local_addresses_of_load_balancers_with_local_policy() -> None:
    """kube-proxy's LocalReadyEndpoints (squashed by IP, per family) and NeedsHealthCheck (LoadBalancer + Local)."""
    svc = ServiceSpec(
        key=ServiceKey("default", "web"),
        type="LoadBalancer",
        cluster_ips=("10.96.0.1",),
        ports=(ServicePort("a", "TCP", 80, node_port=30080), ServicePort("b", "UDP", 53, node_port=30053)),
        external_traffic_policy="Local",
        health_check_node_port=32000,
    )

    def es(*endpoints: Endpoint) -> EndpointSliceSpec:
        ports = (EndpointPort("a", "TCP", 8080), EndpointPort("b", "UDP", 8053))
        return EndpointSliceSpec("default", "web-1", "web", "IPv4", endpoints, ports)

    ready = Endpoint(("10.244.0.1",), node_name="node-a")
    terminating = Endpoint(("10.244.0.2",), ready=False, serving=True, terminating=True, node_name="node-a")
    remote = Endpoint(("10.244.1.1",), node_name="node-b")
    assert needs_health_check(svc)
    assert local_ready_endpoints(svc, [es(ready, terminating, remote)], NODE) == {"IPv4": 1}  # one pod, two ports
    assert local_ready_endpoints(svc, [es(terminating, remote)], NODE) == {"IPv4": 0}  # terminating only: drained
    assert local_ready_endpoints(svc, [], NODE) == {"IPv4": 0}
    assert not needs_health_check(ServiceSpec(**{**_fields(svc), "type": "NodePort"}))
    assert not needs_health_check(ServiceSpec(**{**_fields(svc), "external_traffic_policy": "Cluster"}))


def _fields(svc: ServiceSpec) -> dict[str, object]:
    return {f: getattr(svc, f) for f in ServiceSpec.__dataclass_fields__}


def test_a_node_being_deleted_or_marked_by_the_autoscaler_is_not_eligible() -> None:
    assert node_eligible(NodeInfo("n"))
    assert not node_eligible(NodeInfo("n", being_deleted=True))
    assert not node_eligible(
        NodeInfo("n", taints=("node.kubernetes.io/unschedulable", "ToBeDeletedByClusterAutoscaler"))
    )
    assert node_eligible(NodeInfo("n", taints=("node.kubernetes.io/unschedulable",)))
