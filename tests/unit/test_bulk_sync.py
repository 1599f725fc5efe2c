"""The bulk first sync (Reconciler.load_all, Agent._bulk_sync) against the service-by-service path it stands in for.

On the same inputs, load_all must leave exactly the map entries (byte for byte, ids included), the per-service results
and the in-memory state that sync_service() called service after service leaves, so later incremental changes work
the same. The inputs are a generated corpus: ClusterIP / NodePort / LoadBalancer / externalIPs, both families and
dual stack, affinity, external and internal traffic policy Local, terminating and not-ready endpoints, source ranges,
several ports, pod IPs shared between services (in different states) and addresses two services claim.
"""

from __future__ import annotations

import dataclasses
import errno
import random
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr.agent.agent import Agent, AgentConfig
from kpr.datapath import abi, codec
from kpr.datapath.writers import FaultyMapWriter, MapWriteError, MemoryMapWriter
from kpr.model.translate import translate
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
from kpr.objects.events import Delete, Replace, Upsert
from kpr.reconcile.reconciler import BulkLoadError, Reconciler, SyncResult
from tests.fakes import QuietSource

pytestmark = pytest.mark.unit

NODE = NodeInfo("node-a", zone="zone-a", primary_ips=("192.168.0.10", "fd00:192::10"))
POD_IPS = {
    "IPv4": [f"10.244.0.{i}" for i in range(1, 13)],
    "IPv6": [f"fd00:244::{i:x}" for i in range(1, 13)],
}
EXTERNAL_IPS = ["198.51.100.1", "198.51.100.2", "2001:db8::1"]  # few: services claim the same ones
LB_IPS = ["203.0.113.1", "203.0.113.2", "2001:db8::2", "198.51.100.1"]
SOURCE_RANGES = [(), ("10.0.0.0/8",), ("10.0.0.0/8", "2001:db8::/32"), ("192.168.0.0/16",)]
PORTS = [(80, "TCP"), (443, "TCP"), (53, "UDP"), (53, "TCP"), (9000, "SCTP")]
PORT_NAMES = ["", "http", "dns", "metrics"]


def corpus(seed: int, services: int = 14) -> tuple[list[ServiceSpec], list[EndpointSliceSpec]]:
    rnd = random.Random(seed)
    home = {ip: rnd.choice(["node-a", "node-b", ""]) for ips in POD_IPS.values() for ip in ips}
    specs, slices = [], []
    for i in range(services):
        kind = rnd.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
        families = rnd.choice([("IPv4",), ("IPv6",), ("IPv4", "IPv6"), ("IPv4",)])
        cluster_ips = tuple(f"10.96.0.{i + 1}" if f == "IPv4" else f"fd00:96::{i + 1:x}" for f in families)
        if rnd.random() < 0.05:
            cluster_ips = ()  # headless
        chosen = rnd.sample(PORTS, rnd.choice([1, 1, 2, 3]))
        names = rnd.sample(PORT_NAMES, len(chosen)) if len(chosen) > 1 else [rnd.choice(PORT_NAMES)]
        ports = tuple(
            ServicePort(
                name=names[j],
                protocol=proto,
                port=port,
                target_port=rnd.choice([8080, 9090]),
                node_port=30000 + i * 4 + j if kind != "ClusterIP" and rnd.random() < 0.8 else 0,
            )
            for j, (port, proto) in enumerate(chosen)
        )
        key = ServiceKey(rnd.choice(["default", "default", "kube-system"]), f"svc{i}")
        specs.append(
            ServiceSpec(
                key=key,
                type=kind,
                cluster_ips=cluster_ips,
                ports=ports,
                external_ips=tuple(rnd.sample(EXTERNAL_IPS, rnd.choice([0, 0, 0, 1, 2]))),
                load_balancer_ips=tuple(rnd.sample(LB_IPS, rnd.choice([1, 1, 2]))) if kind == "LoadBalancer" else (),
                load_balancer_source_ranges=rnd.choice(SOURCE_RANGES) if kind == "LoadBalancer" else (),
                affinity_timeout=rnd.choice([0, 0, 10800, 60]),
                internal_traffic_policy=rnd.choice(["Cluster", "Cluster", "Local"]),
                external_traffic_policy=rnd.choice(["Cluster", "Local"]),
            )
        )
        for family in families:
            for s in range(rnd.choice([0, 1, 1, 2])):
                endpoints = []
                for ip in rnd.sample(POD_IPS[family], rnd.choice([0, 1, 2, 3, 5])):
                    terminating = rnd.random() < 0.25
                    ready = not terminating and rnd.random() < 0.8
                    endpoints.append(
                        Endpoint(
                            (ip,),
                            ready=ready,
                            serving=ready or rnd.random() < 0.6,
                            terminating=terminating,
                            node_name=home[ip],
                        )
                    )
                slice_ports = tuple(
                    EndpointPort(p.name, p.protocol, rnd.choice([8080, 9090, 53])) for p in ports if rnd.random() < 0.9
                )
                slices.append(
                    EndpointSliceSpec(
                        namespace=key.namespace,
                        name=f"{key.name}-{family[-1]}{s}",
                        service_name=key.name,
                        address_type=family,
                        endpoints=tuple(endpoints),
                        ports=slice_ports,
                    )
                )
    return specs, slices


def translated(specs: list[ServiceSpec], slices: list[EndpointSliceSpec]) -> list[tuple[ServiceKey, list[Frontend]]]:
    return [(spec.key, translate(spec, slices, NODE)) for spec in sorted(specs, key=lambda s: s.key)]


def state(rec: Reconciler) -> dict[str, Any]:
    """Everything the reconciler keeps between syncs."""
    return {
        "frontends": rec.frontends,
        "by_service": rec.by_service,
        "backends": rec.backends,
        "backend_by_id": rec._backend_by_id,
        "backend_ids": (rec.backend_ids.used, rec.backend_ids.next),
        "rev_nat_ids": (rec.rev_nat_ids.used, rec.rev_nat_ids.next),
        "gone": rec.gone_backends,
        "lingering": rec.lingering_rev_nats,
        "unclaimed": rec.unclaimed,
        "flow_ends": (rec.flow_ends.udp_backends, rec.flow_ends.udp_frontends),
        "ranged": rec.ranged_frontends,
        "restored": rec.restored_entries,
        "ops": rec.ops_applied,
    }


def one_by_one(work: list[tuple[ServiceKey, list[Frontend]]]) -> tuple[Reconciler, dict[ServiceKey, SyncResult]]:
    rec = Reconciler(MemoryMapWriter())
    return rec, {key: rec.sync_service(key, frontends) for key, frontends in work}


def assert_same(bulk: Reconciler, incremental: Reconciler) -> None:
    assert isinstance(bulk.writer, MemoryMapWriter) and isinstance(incremental.writer, MemoryMapWriter)
    for name in abi.MAPS:
        assert bulk.writer.tables[name] == incremental.writer.tables[name], name
    assert state(bulk) == state(incremental)


def check_corpus(seed: int) -> None:
    specs, slices = corpus(seed)
    work = translated(specs, slices)
    incremental, expected = one_by_one(work)
    bulk = Reconciler(MemoryMapWriter())
    assert bulk.pristine()
    assert bulk.load_all(work) == expected  # same ops and conflicts per service
    assert_same(bulk, incremental)
    assert all(counts == (0, 0, 0) for counts in bulk.drift().values())

    # Later changes go through the incremental path on both and keep them equal: endpoints move, services go.
    rnd = random.Random(seed + 1)
    later_specs, later_slices = corpus(seed + 1000)
    later = {spec.key: spec for spec in later_specs}
    for spec in rnd.sample(specs, len(specs) // 2):
        new = later.get(ServiceKey(spec.key.namespace, spec.key.name))
        frontends = translate(new, later_slices, NODE) if new is not None and rnd.random() < 0.7 else []
        for rec in (bulk, incremental):
            rec.sync_service(spec.key, frontends)
    assert bulk.services() == incremental.services()
    live = rnd.sample(sorted(bulk.services()), len(bulk.services()) // 2)
    for rec in (bulk, incremental):
        rec.prune(live)
        rec.release_unused(set(), set())
    assert_same(bulk, incremental)


@pytest.mark.parametrize("seed", range(40))
def test_the_bulk_load_leaves_what_service_by_service_syncs_leave(seed: int) -> None:
    check_corpus(seed)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1000, max_value=2**32))
def test_the_bulk_load_equals_service_by_service_on_any_corpus(seed: int) -> None:
    check_corpus(seed)


BACKEND_POOL = [("10.244.1.1", 8080), ("10.244.1.2", 8080), ("10.244.1.3", 9090), ("fd00:244:1::1", 8080)]


@st.composite
def made_frontends(draw: st.DrawFn, service: ServiceKey) -> list[Frontend]:
    """Frontends as no translate() makes them: a backend twice in a scope, in another state in another frontend of
    the same service, standby and in slots at once; addresses shared with other services."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        addr = draw(st.sampled_from(("10.96.1.1", "10.96.1.2", "fd00:96:1::1")))
        protocol = draw(st.sampled_from(("TCP", "UDP")))

        def backend_list(max_size: int, protocol: str = protocol) -> tuple[Backend, ...]:
            picks = draw(st.lists(st.sampled_from(BACKEND_POOL), max_size=max_size))
            return tuple(
                Backend(a, p, protocol, node_local=draw(st.booleans()), state=draw(st.sampled_from(BackendState)))
                for a, p in picks
            )

        out.append(
            Frontend(
                service,
                draw(st.sampled_from(("", "http"))),
                draw(st.sampled_from(FrontendKind)),
                addr,
                draw(st.sampled_from((80, 53))),
                protocol,
                backend_list(4),
                internal_backends=draw(st.one_of(st.none(), st.just(backend_list(3)))),
                empty_drop=draw(st.booleans()),
                affinity_timeout=draw(st.sampled_from((0, 60))),
                source_ranges=draw(st.sampled_from(((), ("10.0.0.0/8",), ("10.0.0.0/8", "10.0.0.0/8")))),
                standby=backend_list(2),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_bulk_load_equals_service_by_service_on_frontends_translate_never_makes(data: st.DataObject) -> None:
    keys = [ServiceKey("default", f"s{i}") for i in range(data.draw(st.integers(1, 4)))]
    work = [(key, data.draw(made_frontends(key))) for key in keys]
    incremental, expected = one_by_one(work)
    bulk = Reconciler(MemoryMapWriter())
    assert bulk.load_all(work) == expected
    assert_same(bulk, incremental)


def test_the_corpus_covers_what_it_claims() -> None:
    """The generated inputs reach every case the bulk path must get right (so the comparison above means something)."""
    seen: set[str] = set()
    for seed in range(40):
        specs, slices = corpus(seed)
        results = dict(one_by_one(translated(specs, slices))[1])
        for key, frontends in translated(specs, slices):
            for f in frontends:
                seen.add(str(f.kind))
                seen.add(f"v{f.family}")
                seen |= {"affinity"} if f.affinity_timeout else set()
                seen |= {"two scopes"} if f.internal_backends is not None else set()
                seen |= {"source ranges"} if f.source_ranges else set()
                seen |= {"standby"} if f.standby else set()
                seen |= {"empty drop"} if f.empty_drop else set()
                seen |= {b.state.value for b in f.backends + f.standby}
            seen |= {"conflict"} if results[key].conflicts else set()
    assert seen >= {
        "ClusterIP", "NodePort", "LoadBalancer", "ExternalIP", "v4", "v6", "affinity", "two scopes", "source ranges",
        "standby", "empty drop", "active", "terminating", "not-serving", "conflict",
    }  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    addr=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    port=st.integers(0, 65535),
    protocol=st.sampled_from(("TCP", "UDP", "SCTP")),
    number=st.integers(0, 2**32 - 1),
    small=st.integers(0, 255),
    # ctypes stops a name at a NUL; lone surrogates cannot be encoded (nor are they in any Kubernetes name)
    text=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=80),
)
def test_packed_entries_are_the_bytes_of_the_ctypes_mirror(
    addr: str, port: int, protocol: str, number: int, small: int, text: str
) -> None:
    u16 = number & 0xFFFF
    assert codec.pack_svc_key(addr, port, protocol, small & 1, u16) == bytes(
        codec.svc_key(addr, port, protocol, small & 1, u16)
    )
    assert codec.pack_svc_master(u16, number, small, number) == bytes(codec.svc_master(u16, number, small, number))
    assert codec.pack_svc_slot(number) == bytes(codec.svc_slot(number))
    for state_ in abi.BACKEND_STATE_NAMES:
        for local in (False, True):
            assert codec.pack_backend(addr, port, protocol, state=state_, node_local=local) == bytes(
                codec.backend_value(addr, port, protocol, state=state_, node_local=local)
            )
    assert codec.pack_rev_nat(addr, port) == bytes(codec.rev_nat_value(addr, port))
    assert codec.pack_u32(number) == bytes(codec.u32(number))
    for kind in abi.KIND_CODES:
        assert codec.pack_svc_name(kind, text, text[::-1], text[:20]) == bytes(
            codec.svc_name_value(kind, text, text[::-1], text[:20])
        )
    assert codec.pack_affinity_match(number, u16) == bytes(abi.AffinityMatchKey(backend_id=number, rev_nat_id=u16))
    prefix = small % (33 if ":" not in addr else 129)
    cidr = f"{addr}/{prefix}"
    name, key = codec.src_range_entry(number, cidr)
    assert codec.pack_src_range(number, cidr) == (name, bytes(key))


def datapath_consistent(w: MemoryMapWriter) -> None:
    """What a program could look up at this moment: every master's slots and their backends exist, and an internal
    scope exists wherever a default scope says TWO_SCOPES."""
    for fam in ("4", "6"):
        backends = {int(k.value) for k, _ in w.items(f"backends{fam}")}
        rev_nats = {int(k.value) for k, _ in w.items(f"rev_nat{fam}")}
        for fe in codec.decode_services(w.items(f"services{fam}")):
            for scope, master in fe.scopes.items():
                assert master.rev_nat_id in rev_nats, f"{fe.address}: rev_nat {master.rev_nat_id} missing"
                assert all(b is not None and b in backends for b in master.slots), f"{fe.address}/{scope}"
                if scope == abi.SCOPE_DEFAULT and master.flags & abi.SVC_F_TWO_SCOPES:
                    assert abi.SCOPE_INTERNAL in fe.scopes, f"{fe.address}: TWO_SCOPES without the internal scope"


@pytest.mark.parametrize("seed", range(4))
def test_a_failed_bulk_write_is_undone_and_the_datapath_never_sees_half_a_service(seed: int) -> None:
    """Checked after every single entry written (and deleted again): make before break across the whole load; a
    failure at any point leaves the maps empty and the state pristine, so the caller can sync one by one."""
    work = translated(*corpus(seed, services=6))
    total = sum(len(t) for t in written_by_load_all(work).tables.values())
    for fail_at in sorted({0, 1, total // 3, total // 2, total - 1}):
        inner = MemoryMapWriter()

        def fail(_map: str, index: int, inner: MemoryMapWriter = inner, fail_at: int = fail_at) -> int | None:
            datapath_consistent(inner)
            return errno.E2BIG if index == fail_at else None

        rec = Reconciler(FaultyMapWriter(inner, fail))
        with pytest.raises(BulkLoadError, match="everything written was deleted"):
            rec.load_all(work)
        datapath_consistent(inner)
        assert all(not table for table in inner.tables.values())
        assert rec.pristine() and state(rec) == state(Reconciler(MemoryMapWriter()))


def written_by_load_all(work: list[tuple[ServiceKey, list[Frontend]]]) -> MemoryMapWriter:
    rec = Reconciler(MemoryMapWriter())
    rec.load_all(work)
    assert isinstance(rec.writer, MemoryMapWriter)
    return rec.writer


def test_no_room_is_found_before_anything_is_written() -> None:
    work = translated(*corpus(3))
    need = len(written_by_load_all(work).tables["services4"])
    writer = MemoryMapWriter({"services4": need - 1})
    rec = Reconciler(writer)
    with pytest.raises(BulkLoadError, match=f"services4 would need {need} entries and has room for {need - 1}"):
        rec.load_all(work)
    assert writer.ops == 0 and rec.pristine()


def test_maps_holding_entries_are_adopted_not_bulk_loaded() -> None:
    work = translated(*corpus(5))
    writer = MemoryMapWriter()
    Reconciler(writer).load_all(work)
    restarted = Reconciler(writer)
    restarted.restore()
    assert not restarted.pristine()
    with pytest.raises(BulkLoadError):
        restarted.load_all(work)


# ---- the agent ----


def run_agent(writer: Any, specs: list[ServiceSpec], slices: list[EndpointSliceSpec]) -> Agent:
    agent = Agent(AgentConfig(node_name=NODE.name, cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=writer, source=QuietSource())
    agent.events.put(Replace("Service", tuple(specs)))
    agent.events.put(Replace("EndpointSlice", tuple(slices)))
    agent.events.put(Replace("Node", (NODE,)))
    agent.step()
    assert agent.programming
    return agent


def first_sync_line(logs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e for e in logs if e["event"] == "first full sync done")


@pytest.mark.parametrize("seed", range(6))
def test_the_agent_programs_empty_maps_in_bulk_with_the_same_outcome(seed: int) -> None:
    specs, slices = corpus(seed)
    bulk_writer, plain_writer = MemoryMapWriter(), MemoryMapWriter()
    with structlog.testing.capture_logs() as logs:
        bulk = run_agent(bulk_writer, specs, slices)
    assert first_sync_line(logs)["bulk"] is True
    plain = Agent(AgentConfig(node_name=NODE.name, cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    plain.start(writer=plain_writer, source=QuietSource())
    plain.store.replace_services(specs)
    plain.store.replace_slices(slices)
    plain.store.set_node(NODE)
    plain.sync(set(plain.store.services))  # the service-by-service path
    assert bulk.reconciler is not None and plain.reconciler is not None
    ours = set(abi.MAPS) - {"netns_addrs"}  # the host's namespaces come and go between the two runs
    assert {m: bulk_writer.tables[m] for m in ours} == {m: plain_writer.tables[m] for m in ours}
    assert state(bulk.reconciler) == state(plain.reconciler)
    assert bulk.conflicted == plain.conflicted and bulk.retry_at == plain.retry_at == {}
    assert bulk.health_checks.by_service == plain.health_checks.by_service
    bulk.health_checks.close()
    plain.health_checks.close()

    # A restart finds the maps full: it adopts them (no bulk load) and changes nothing in them (netns_addrs, the
    # node's namespaces, is not the reconciler's and is written afresh by every agent).
    before = {name: dict(table) for name, table in bulk_writer.tables.items() if name != "netns_addrs"}
    with structlog.testing.capture_logs() as logs:
        restarted = run_agent(bulk_writer, specs, slices)
    assert first_sync_line(logs)["bulk"] is False
    assert before == {name: table for name, table in bulk_writer.tables.items() if name != "netns_addrs"}
    assert restarted.reconciler is not None and restarted.reconciler.frontends == bulk.reconciler.frontends
    restarted.health_checks.close()


def test_a_full_map_during_the_bulk_load_falls_back_to_service_by_service() -> None:
    """A write that fails mid-load (here a map that turns out full) is undone, logged, and the services are synced
    one by one: those that fit are programmed, the others reported and retried, none half-programmed."""
    specs, slices = corpus(7)
    need = len(written_by_load_all(translated(specs, slices)).tables["backends4"])

    class LyingCapacity(MemoryMapWriter):  # says there is room, then runs out (as a map shared with others could)
        def capacity(self, map_name: str) -> int:
            return 1 << 20 if map_name == "backends4" else super().capacity(map_name)

    writer = LyingCapacity({"backends4": need - 2})
    with structlog.testing.capture_logs() as logs:
        agent = run_agent(writer, specs, slices)
    warning = next(e for e in logs if e["event"] == "bulk first sync not possible; programming service by service")
    assert "backends4" in warning["reason"] and "everything written was deleted" in warning["reason"]
    assert first_sync_line(logs)["bulk"] is False
    assert agent.retry_at, "some service did not fit and waits for a retry"
    assert agent.reconciler is not None
    assert all(counts == (0, 0, 0) for counts in agent.reconciler.drift().values())
    agent.health_checks.close()


def test_programs_are_attached_only_once_the_bulk_load_is_in_the_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    specs, slices = corpus(9)
    writer = MemoryMapWriter()
    seen: list[int] = []
    agent = Agent(AgentConfig(node_name=NODE.name, cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    monkeypatch.setattr(agent, "attach_programs", lambda: seen.append(sum(map(len, writer.tables.values()))))
    agent.start(writer=writer, source=QuietSource())
    agent.attach_due = True
    agent.events.put(Replace("Service", tuple(specs)))
    agent.events.put(Replace("EndpointSlice", tuple(slices)))
    agent.step()
    assert seen == [] and writer.ops == 0  # the Node list is not in yet
    agent.events.put(Replace("Node", (NODE,)))
    agent.step()
    assert seen == [sum(map(len, writer.tables.values()))] and seen[0] > 0
    agent.health_checks.close()


def test_changes_after_a_bulk_first_sync_are_incremental() -> None:
    specs, slices = corpus(11)
    writer = MemoryMapWriter()
    agent = run_agent(writer, specs, slices)
    victim = next(s for s in slices if s.endpoints)
    before = writer.ops
    agent.events.put(Upsert("EndpointSlice", dataclasses.replace(victim, endpoints=victim.endpoints[1:])))
    agent.events.put(Delete("Service", specs[0].key.namespace, specs[0].key.name))
    agent.step()
    assert 0 < writer.ops - before < 100
    assert agent.reconciler is not None
    assert all(counts == (0, 0, 0) for counts in agent.reconciler.drift().values())
    agent.health_checks.close()


def test_memory_writer_packed_updates_keep_the_kernel_limit() -> None:
    writer = MemoryMapWriter({"backends4": 2})
    keys = b"".join(codec.pack_u32(i) for i in (1, 2, 3))
    values = b"".join(codec.pack_backend("10.0.0.1", 80, "TCP", state=0, node_local=False) for _ in range(3))
    with pytest.raises(MapWriteError) as e:
        writer.update_packed("backends4", keys, values, 3)
    assert e.value.errno == errno.E2BIG and e.value.done == 2 and len(writer.tables["backends4"]) == 2


def test_the_bulk_load_makes_no_map_operation_or_ctypes_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk path packs bytes: it never builds a MapOp or a ctypes key or value per entry (the per-service path
    does, and that was most of its cost)."""
    from kpr.reconcile import reconciler

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a per-entry object on the bulk path")

    monkeypatch.setattr(reconciler, "MapOp", refuse)
    for name in ("svc_key", "svc_key_maker", "svc_master", "svc_slot", "backend_value", "rev_nat_value",
                 "svc_name_value", "src_range_entry", "u32"):  # fmt: skip
        monkeypatch.setattr(codec, name, refuse)
    for struct_type in {spec.key for spec in abi.MAPS.values()} | {spec.value for spec in abi.MAPS.values()}:
        monkeypatch.setattr(struct_type, "__init__", refuse)
    work = translated(*corpus(2))
    assert any(f.source_ranges for _, fs in work for f in fs) and any(f.affinity_timeout for _, fs in work for f in fs)
    rec = Reconciler(MemoryMapWriter())
    rec.load_all(work)
    assert rec.frontends
