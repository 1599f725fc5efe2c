"""The reconciler against the in-memory map writer: ordering, minimal deltas, rollback, restore.

`CheckingWriter` replays what the BPF programs would see after every single map operation and asserts make before
break: at no intermediate point may a frontend point at a missing slot or backend, send traffic to a backend that is
neither in the old nor the new set, or lose all its backends when old and new both have some.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpr.datapath import abi, codec
from kpr.datapath.writers import FaultyMapWriter, MemoryMapWriter
from kpr.model.types import Backend, BackendState, Frontend, FrontendKind, ServiceKey
from kpr.reconcile.ids import IdsExhausted
from kpr.reconcile.reconciler import Reconciler, ServiceSyncError
from kpr.reconcile.slots import assign_slots

pytestmark = pytest.mark.unit

SVC = ServiceKey("default", "web")


def backends(
    *last_octets: int,
    port: int = 8080,
    local: tuple[int, ...] = (),
    protocol: str = "TCP",
    state: BackendState = BackendState.ACTIVE,
) -> tuple[Backend, ...]:
    return tuple(Backend(f"10.244.1.{n}", port, protocol, node_local=n in local, state=state) for n in last_octets)


def frontend(
    bs: tuple[Backend, ...], *, addr: str = "10.96.0.10", port: int = 80, protocol: str = "TCP", **kw: object
) -> Frontend:
    return Frontend(SVC, "http", FrontendKind.CLUSTER_IP, addr, port, protocol, bs, **kw)  # type: ignore[arg-type]


def datapath_view(w: MemoryMapWriter) -> dict[tuple[str, int, str, int], frozenset[tuple[str, int, str]] | str]:
    """What a new flow to each frontend (per scope the socket hooks use) can reach, or why it is rejected."""
    view: dict[tuple[str, int, str, int], frozenset[tuple[str, int, str]] | str] = {}
    for fam in ("4", "6"):
        be = {int(k.value): codec.decode_backend(v).address for k, v in w.items(f"backends{fam}")}
        for fe in codec.decode_services(w.items(f"services{fam}")):
            for scope, master in fe.scopes.items():
                key = (*fe.address, scope)
                if scope == abi.SCOPE_DEFAULT and master.flags & abi.SVC_F_TWO_SCOPES:
                    assert abi.SCOPE_INTERNAL in fe.scopes, f"{key}: TWO_SCOPES without an internal entry"
                if master.count == 0:
                    view[key] = "drop" if master.flags & abi.SVC_F_EMPTY_DROP else "reject"
                    continue
                reach = set()
                for slot, backend_id in enumerate(master.slots, 1):
                    assert backend_id is not None, f"{key}: slot {slot} of {master.count} missing"
                    assert backend_id in be, f"{key}: slot {slot} names unknown backend {backend_id}"
                    reach.add(be[backend_id])
                view[key] = frozenset(reach)
    return view


class CheckingWriter(MemoryMapWriter):
    """Checks the datapath view after every operation against the allowed old/new sets."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: dict[tuple[str, int, str, int], set[tuple[str, int, str]]] = {}
        self.must_serve: set[tuple[str, int, str, int]] = set()
        self.steps = 0

    def expect(self, before: dict, after: dict) -> None:  # type: ignore[type-arg]
        self.allowed, self.must_serve = {}, set()
        for k in before.keys() | after.keys():
            old, new = before.get(k), after.get(k)
            self.allowed[k] = set(old if isinstance(old, frozenset) else ()) | set(
                new if isinstance(new, frozenset) else ()
            )
            if isinstance(old, frozenset) and old and isinstance(new, frozenset) and new:
                self.must_serve.add(k)

    def _check(self) -> None:
        self.steps += 1
        for k, reach in datapath_view(self).items():
            if isinstance(reach, frozenset):
                assert reach <= self.allowed.get(k, set()), f"{k} reaches {reach - self.allowed.get(k, set())}"
        view = datapath_view(self)
        for k in self.must_serve:
            assert isinstance(view.get(k), frozenset) and view[k], f"{k} lost all backends mid-change"

    def update(self, map_name, key, value):  # type: ignore[no-untyped-def]
        super().update(map_name, key, value)
        self._check()

    def delete(self, map_name, key):  # type: ignore[no-untyped-def]
        super().delete(map_name, key)
        self._check()


def map_states(w: MemoryMapWriter) -> dict[tuple[str, int, str], str]:
    """Every backend entry's address and state name, whatever references it."""
    out = {}
    for fam in ("4", "6"):
        for _, v in w.items(f"backends{fam}"):
            b = codec.decode_backend(v)
            out[b.address] = b.state_name
    return out


def assert_maps_empty(w: MemoryMapWriter) -> None:
    assert all(not t for name, t in w.tables.items() if name != "counters"), "maps must end empty"


def run_steps(steps: list[list[Frontend]]) -> tuple[CheckingWriter, Reconciler]:
    w = CheckingWriter()
    rec = Reconciler(w)
    expected_before: dict = {}  # type: ignore[type-arg]
    for fs in steps:
        shadow = MemoryMapWriter()
        Reconciler(shadow).sync_service(SVC, fs)
        expected_after = datapath_view(shadow)
        w.expect(expected_before, expected_after)
        rec.sync_service(SVC, fs)
        assert datapath_view(w) == expected_after
        assert all(v == (0, 0, 0) for v in rec.drift().values()), rec.drift()
        expected_before = expected_after
    return w, rec


def test_scale_up_down_to_zero_and_back_keeps_every_step_consistent() -> None:
    w, rec = run_steps(
        [
            [frontend(backends(1))],
            [frontend(backends(1, 2, 3))],
            [frontend(())],
            [frontend(backends(4))],
            [frontend(backends(2, 3, 4, 5))],
            [frontend(backends(5))],
            [],
        ]
    )
    # TCP backends and the frontend's rev_nat outlive the service while tracked flows may name them...
    assert set(map_states(w).values()) == {"gone"} and len(w.tables["rev_nat4"]) == 1
    assert not w.tables["services4"] and not w.tables["svc_names"]
    rec.release_unused(set(), set())  # ...and go once none does
    assert_maps_empty(w)


def test_one_endpoint_change_costs_constant_operations_whatever_the_service_size() -> None:
    costs = []
    for size in (10, 100, 1000):
        w = MemoryMapWriter()
        rec = Reconciler(w)
        bs = tuple(Backend(f"10.1.{i // 250}.{i % 250}", 80, "TCP") for i in range(size))
        rec.sync_service(SVC, [frontend(bs)])
        before = w.ops
        rec.sync_service(SVC, [frontend(bs[1:])])  # one endpoint gone
        removed = w.ops - before
        before = w.ops
        rec.sync_service(SVC, [frontend((*bs[1:], Backend("10.9.9.9", 80, "TCP")))])  # one endpoint added
        added = w.ops - before
        costs.append((removed, added))
    assert costs[0] == costs[1] == costs[2], costs
    # removal: move the last slot into the hole, shrink the master, delete the surplus slot and the backend
    assert costs[0] == (4, 3)


def test_unrelated_services_do_not_change_the_cost_of_a_change() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    for i in range(2000):
        key = ServiceKey("bulk", f"s{i}")
        rec.sync_service(
            key,
            [Frontend(key, "", FrontendKind.CLUSTER_IP, f"10.97.{i // 250}.{i % 250}", 80, "TCP", backends(1, 2))],
        )
    before = w.ops
    rec.sync_service(SVC, [frontend(backends(7, 8))])
    assert w.ops - before == 7  # rev_nat, name, 2 backends, 2 slots, master


def test_no_write_when_nothing_changed() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(SVC, [frontend(backends(1, 2), affinity_timeout=30)])
    before = w.ops
    assert rec.sync_service(SVC, [frontend(backends(2, 1), affinity_timeout=30)]).ops == 0
    assert w.ops == before


def test_two_scopes_are_made_and_broken_in_order() -> None:
    ext = backends(1, 2, local=(1,))
    local = tuple(b for b in ext if b.node_local)
    run_steps(
        [
            [frontend(ext)],
            [frontend(local, internal_backends=ext)],
            [frontend((), internal_backends=ext, empty_drop=True)],
            [frontend(ext)],
            [],
        ]
    )


def test_affinity_match_follows_slots() -> None:
    w, rec = run_steps(
        [[frontend(backends(1, 2), affinity_timeout=10)], [frontend(backends(2, 3), affinity_timeout=10)]]
    )
    fe = rec.frontends[("10.96.0.10", 80, "TCP")]
    ids = {rec.backends[b.identity].id for b in backends(2, 3)}
    match = {(k.backend_id, k.rev_nat_id) for k, _ in w.items("affinity_match")}
    assert match == {(i, fe.rev_nat_id) for i in ids}
    run_steps([[frontend(backends(1), affinity_timeout=10)], [frontend(backends(1))]])


def test_backend_shared_by_two_services_lives_until_the_last_one_lets_go() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    other = ServiceKey("default", "other")
    shared = backends(1)
    rec.sync_service(SVC, [frontend(shared)])
    rec.sync_service(other, [Frontend(other, "", FrontendKind.CLUSTER_IP, "10.96.0.11", 80, "TCP", shared)])
    assert len(w.tables["backends4"]) == 1
    rec.remove_service(SVC)
    assert map_states(w) == {shared[0].identity: "active"}
    rec.remove_service(other)
    assert map_states(w) == {shared[0].identity: "gone"}
    rec.release_unused(set(), set())
    assert not w.tables["backends4"]


def test_frontend_claimed_by_another_service_is_reported_not_stolen() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(SVC, [frontend(backends(1))])
    thief = ServiceKey("default", "thief")
    result = rec.sync_service(
        thief, [Frontend(thief, "", FrontendKind.EXTERNAL_IP, "10.96.0.10", 80, "TCP", backends(9))]
    )
    assert result.conflicts and "default/web" in result.conflicts[0]
    assert rec.frontends[("10.96.0.10", 80, "TCP")].service == SVC


@pytest.mark.parametrize("fail_at", range(0, 12))
def test_a_failed_write_is_undone_and_leaves_the_previous_programming(fail_at: int) -> None:
    inner = MemoryMapWriter()
    rec = Reconciler(inner)
    rec.sync_service(SVC, [frontend(backends(1, 2, 3))])
    snapshot = {name: dict(t) for name, t in inner.tables.items()}
    state_before = datapath_view(inner)

    counter = itertools.count()
    rec.writer = FaultyMapWriter(inner, lambda _m, _i: errno.E2BIG if next(counter) == fail_at else None)
    change = [frontend(backends(2, 4, 5, 6)), frontend(backends(7), port=81)]
    try:
        rec.sync_service(SVC, change)
    except ServiceSyncError as e:
        assert "map is full" in str(e)
        assert inner.tables == snapshot, "partial writes must be undone"
        assert datapath_view(inner) == state_before
        rec.writer = inner
        assert all(v == (0, 0, 0) for v in rec.drift().values())
        rec.sync_service(SVC, change)  # the retry works from the old state
    rec.writer = inner
    assert all(v == (0, 0, 0) for v in rec.drift().values())
    assert datapath_view(inner)[("10.96.0.10", 81, "TCP", 0)] == frozenset({("10.244.1.7", 8080, "TCP")})


def test_full_backend_map_is_an_error_not_a_partial_service() -> None:
    w = MemoryMapWriter(capacities={"backends4": 3})
    rec = Reconciler(w)
    with pytest.raises(ServiceSyncError):
        rec.sync_service(SVC, [frontend(backends(1, 2, 3, 4))])
    assert all(not t for name, t in w.tables.items())
    assert not rec.frontends and not rec.backends


def test_running_out_of_ids_is_its_own_error_and_leaves_the_service_as_it_was() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(SVC, [frontend(backends(1, 2))])
    tables = {name: dict(t) for name, t in w.tables.items()}
    rec.backend_ids.limit = 2  # both in use: a third backend needs an id that is not there
    with pytest.raises(ServiceSyncError) as failed:
        rec.sync_service(SVC, [frontend(backends(1, 2, 3))])
    assert isinstance(failed.value.cause, IdsExhausted)
    assert (failed.value.full, failed.value.reason) == (True, "backend ids")
    assert "backend ids: all 2 ids are in use; the service keeps its previous programming" in str(failed.value)
    assert w.tables == tables and rec.backend_ids.used == {1, 2}
    rec.backend_ids.limit = 3
    assert rec.sync_service(SVC, [frontend(backends(1, 2, 3))]).ops > 0


def test_one_decoder_turns_the_services_map_into_frontends_scopes_and_slots() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(SVC, [frontend(backends(1, 2, 3), internal_backends=backends(1, 2))])
    rec.sync_service(SVC, [frontend(backends(1, 2, 3), internal_backends=backends(1, 2)), frontend((), port=81)])
    ids = {addr: entry.id for (addr, _, _), entry in rec.backends.items()}
    w.delete("services4", codec.svc_key("10.96.0.10", 80, "TCP", abi.SCOPE_DEFAULT, 2))  # a slot goes missing
    w.update("services4", codec.svc_key("10.96.0.10", 80, "TCP", abi.SCOPE_DEFAULT, 9), codec.svc_slot(7))  # surplus
    w.update("services4", codec.svc_key("10.96.0.11", 80, "TCP", abi.SCOPE_INTERNAL, 0), codec.svc_master(0, 9, 0, 0))
    decoded = {fe.address: fe for fe in codec.decode_services(w.items("services4"))}
    assert list(decoded) == sorted(decoded)
    web = decoded[("10.96.0.10", 80, "TCP")]
    assert sorted(web.scopes) == [abi.SCOPE_DEFAULT, abi.SCOPE_INTERNAL]
    default, internal = web.scopes[abi.SCOPE_DEFAULT], web.scopes[abi.SCOPE_INTERNAL]
    assert default.count == 3 and default.flags & abi.SVC_F_TWO_SCOPES
    assert default.rev_nat_id == internal.rev_nat_id == rec.frontends[web.address].rev_nat_id
    assert default.slots[0] in (ids["10.244.1.1"], ids["10.244.1.2"], ids["10.244.1.3"]) and default.slots[1] is None
    assert set(internal.slots) == {ids["10.244.1.1"], ids["10.244.1.2"]}
    empty = decoded[("10.96.0.10", 81, "TCP")].scopes
    assert list(empty) == [abi.SCOPE_DEFAULT] and empty[abi.SCOPE_DEFAULT].slots == ()
    assert list(decoded[("10.96.0.11", 80, "TCP")].scopes) == [abi.SCOPE_INTERNAL]  # no default scope: reported as is


def test_restore_adopts_the_maps_and_the_next_sync_writes_nothing() -> None:
    w = MemoryMapWriter()
    first = Reconciler(w)
    v6 = Frontend(
        SVC, "http", FrontendKind.CLUSTER_IP, "fd00:96::10", 80, "TCP", (Backend("fd00:244:1::11", 8080, "TCP"),)
    )
    desired = [
        frontend(backends(1, 2, local=(1,)), affinity_timeout=5, internal_backends=backends(1, 2, 3, local=(1,))),
        v6,
    ]
    first.sync_service(SVC, desired)
    second = Reconciler(w)
    report = second.restore()
    assert (report.frontends, report.services, report.orphans) == (2, 1, 0)
    before = w.ops
    assert second.sync_service(SVC, desired).ops == 0
    assert w.ops == before
    assert second.prune([SVC]) == 0
    # and a change after restore is still minimal
    assert second.sync_service(SVC, [v6]).ops > 0
    assert all(v == (0, 0, 0) for v in second.drift().values())


def test_prune_removes_services_gone_while_the_agent_was_down_and_garbage() -> None:
    w = MemoryMapWriter()
    first = Reconciler(w)
    gone = ServiceKey("default", "gone")
    first.sync_service(SVC, [frontend(backends(1))])
    first.sync_service(gone, [Frontend(gone, "", FrontendKind.CLUSTER_IP, "10.96.0.99", 53, "UDP", backends(9))])
    w.update(
        "backends4", codec.u32(4242), codec.backend_value("10.9.9.9", 1, "UDP", state=0, node_local=False)
    )  # garbage
    second = Reconciler(w)
    second.restore()
    second.sync_service(SVC, [frontend(backends(1))])
    assert second.prune([SVC]) > 0
    assert set(second.by_service) == {SVC}
    assert all(v == (0, 0, 0) for v in second.drift().values())


def test_drift_is_detected_and_repaired() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(SVC, [frontend(backends(1, 2))])
    key = codec.svc_key("10.96.0.10", 80, "TCP", 0, 2)
    w.delete("services4", key)  # someone deleted a slot behind our back
    assert rec.drift()["services4"] == (1, 0, 0)
    assert rec.repair() == 1
    assert rec.drift()["services4"] == (0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 12), max_size=8, unique=True), min_size=1, max_size=6))
def test_any_sequence_of_backend_sets_is_applied_make_before_break(sets: list[list[int]]) -> None:
    run_steps([[frontend(backends(*s))] for s in sets] + [[]])


@given(st.lists(st.integers(1, 30), unique=True, max_size=15), st.lists(st.integers(1, 30), unique=True, max_size=15))
def test_assign_slots_keeps_survivors_in_place(old: list[int], new: list[int]) -> None:
    slots = assign_slots(old, new)
    assert sorted(slots) == sorted(new)
    moved = sum(1 for i, b in enumerate(slots) if i >= len(old) or old[i] != b)
    added = len(set(new) - set(old))
    removed = len(set(old) - set(new))
    assert moved <= added + removed  # each change moves at most one slot
    for i, b in enumerate(old):
        if b in new and i < len(slots) and slots[i] != b:
            assert b in slots  # a survivor only moves when compacting a hole


def test_a_restored_backend_no_slot_names_is_reclaimed_by_the_first_sync_or_treated_as_left() -> None:
    w = MemoryMapWriter()
    terminating = backends(2, state=BackendState.TERMINATING)
    Reconciler(w).sync_service(SVC, [frontend(backends(1), standby=terminating)])
    draining_id = next(int(k.value) for k, v in w.items("backends4") if v.state == abi.BACKEND_TERMINATING)
    stray_tcp = codec.backend_value("10.244.1.99", 8080, "TCP", state=abi.BACKEND_ACTIVE, node_local=False)
    stray_udp = codec.backend_value("10.244.1.98", 53, "UDP", state=abi.BACKEND_ACTIVE, node_local=False)
    w.update("backends4", codec.u32(99), stray_tcp)  # as if an agent died between a slot delete and the release
    w.update("backends4", codec.u32(98), stray_udp)
    second = Reconciler(w)
    second.restore()
    # Standby entries have no map entry naming them: they are kept until the first sync reclaims them, same id.
    assert second.backends[terminating[0].identity].id == draining_id
    assert second.sync_service(SVC, [frontend(backends(1), standby=terminating)]).ops == 0
    assert second.prune([SVC]) == 2  # the TCP stray marked gone (its flows may live), the UDP one deleted
    assert map_states(w) == {
        ("10.244.1.1", 8080, "TCP"): "active",
        ("10.244.1.2", 8080, "TCP"): "terminating",
        ("10.244.1.99", 8080, "TCP"): "gone",
    }
    assert second.take_flow_ends().udp_backends == {98: ("10.244.1.98", 53, "UDP")}
    assert all(v == (0, 0, 0) for v in second.drift().values())


def test_ids_named_by_conntrack_are_not_handed_out_again_right_after_a_restart() -> None:
    w = MemoryMapWriter()
    first = Reconciler(w)
    first.sync_service(SVC, [frontend(backends(1, 2, 3))])
    first.sync_service(SVC, [frontend(backends(1))])  # ids 2 and 3 freed
    w.update("ct4", abi.CtKey4(src=1, dst=2, sport=3, dport=4, proto=6), abi.CtValue4(backend_id=3))
    second = Reconciler(w)
    second.restore()
    second.sync_service(SVC, [frontend(backends(1, 7))])
    assert second.backends[("10.244.1.7", 8080, "TCP")].id > 3


# ---- connection lifecycle: what outlives an endpoint's usability ----

TERMINATING, NOT_SERVING = BackendState.TERMINATING, BackendState.NOT_SERVING


def ids_by_address(w: MemoryMapWriter) -> dict[tuple[str, int, str], int]:
    return {codec.decode_backend(v).address: int(k.value) for k, v in w.items("backends4")}


def test_a_rollout_keeps_each_endpoint_under_one_id_from_ready_to_gone() -> None:
    two = backends(2)[0].identity
    w, rec = run_steps([[frontend(backends(1, 2, 3))]])
    first_id = ids_by_address(w)[two]
    steps = [
        (backends(2, state=TERMINATING), "terminating", 4),  # state, then slot moved, master shrunk, slot deleted
        (backends(2, state=NOT_SERVING), "not-serving", 1),
        ((), "gone", 1),  # left the slice: kept for tracked TCP flows
        (backends(2, state=TERMINATING), "terminating", 1),  # back in a slice (a label put back): the same id again
    ]
    for standby, state, cost in steps:
        before = w.ops
        rec.sync_service(SVC, [frontend(backends(1, 3), standby=standby)])
        assert map_states(w)[two] == state and ids_by_address(w)[two] == first_id
        assert w.ops - before == cost, state
        assert datapath_view(w)[("10.96.0.10", 80, "TCP", 0)] == frozenset(b.identity for b in backends(1, 3))
    before = w.ops
    rec.sync_service(SVC, [frontend(backends(1, 2, 3))])  # ready again: active, in a slot
    assert map_states(w)[two] == "active" and ids_by_address(w)[two] == first_id and w.ops - before == 3
    assert not rec.take_flow_ends()  # TCP: nothing to end


def test_udp_backends_that_stop_serving_or_leave_and_udp_frontends_that_go_are_reported() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    udp = backends(1, 2, port=53, protocol="UDP")
    dns = frontend(udp, port=53, protocol="UDP")
    rec.sync_service(SVC, [dns])
    one, two = (ids_by_address(w)[b.identity] for b in udp)

    def step(*fes: Frontend) -> tuple[dict[int, tuple[str, int, str]], dict[int, tuple[str, int, str]]]:
        rec.sync_service(SVC, list(fes))
        ends = rec.take_flow_ends()
        return ends.udp_backends, ends.udp_frontends

    shrunk = frontend(udp[:1], port=53, protocol="UDP", standby=backends(2, port=53, protocol="UDP", state=TERMINATING))
    assert step(shrunk) == ({}, {})  # terminating but serving: its UDP flows stay
    stopped = frontend(
        udp[:1], port=53, protocol="UDP", standby=backends(2, port=53, protocol="UDP", state=NOT_SERVING)
    )
    assert step(stopped) == ({two: udp[1].identity}, {})  # stopped serving: its flows must move
    assert step(frontend(udp[:1], port=53, protocol="UDP")) == ({}, {})  # left, but it no longer served
    assert udp[1].identity not in map_states(w)  # UDP: deleted at once
    web = frontend(backends(7))
    rev_nat_dns = rec.frontends[dns.address].rev_nat_id
    assert step(web) == ({one: udp[0].identity}, {rev_nat_dns: dns.address})  # the UDP frontend went, with its backend
    assert set(w.tables["rev_nat4"]) == {bytes(codec.u32(rec.frontends[web.address].rev_nat_id))}


def test_a_removed_tcp_frontend_keeps_its_rev_nat_until_no_flow_names_it() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    a, b = frontend(backends(1)), frontend(backends(1), port=81)
    rec.sync_service(SVC, [a, b])
    b_id = rec.frontends[b.address].rev_nat_id
    rec.sync_service(SVC, [a])
    assert rec.lingering() == (set(), {b_id}) and len(w.tables["rev_nat4"]) == 2
    assert rec.release_unused(set(), {b_id}) == 0  # a tracked flow still shows replies as coming from it
    assert rec.release_unused(set(), set()) == 1
    assert rec.lingering() == (set(), set()) and len(w.tables["rev_nat4"]) == 1
    assert all(v == (0, 0, 0) for v in rec.drift().values())


def test_release_unused_deletes_only_gone_backends_no_flow_names() -> None:
    w, rec = run_steps([[frontend(backends(1, 2, 3))], [frontend(backends(1))]])
    ids = ids_by_address(w)
    two, three = ids[backends(2)[0].identity], ids[backends(3)[0].identity]
    assert rec.lingering() == ({two, three}, set())
    assert rec.release_unused({two, 12345}, set()) == 1
    assert set(ids_by_address(w).values()) == {ids[backends(1)[0].identity], two}
    assert rec.release_unused(set(), set()) == 1
    assert rec.lingering() == (set(), set())
    assert all(v == (0, 0, 0) for v in rec.drift().values())


def test_a_restart_keeps_draining_gone_and_lingering_entries_exactly() -> None:
    w = MemoryMapWriter()
    first = Reconciler(w)
    desired = [frontend(backends(1, 3), standby=backends(2, state=TERMINATING))]
    first.sync_service(SVC, [frontend(backends(1, 2, 3, 4)), frontend(backends(1), port=81)])
    first.sync_service(SVC, desired)  # 2 terminating, 4 gone, port 81's frontend removed
    snapshot = {name: dict(t) for name, t in w.tables.items()}
    second = Reconciler(w)
    second.restore()
    assert second.lingering() == first.lingering()
    assert second.sync_service(SVC, desired).ops == 0
    assert second.prune([SVC]) == 0  # nothing deleted: tracked flows keep their backends through the restart
    assert w.tables == snapshot
    assert all(v == (0, 0, 0) for v in second.drift().values())
    assert second.release_unused(set(), set()) == 2


STATUSES = st.sampled_from(("ready", "ready", "terminating", "not-serving", "absent"))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(STATUSES, min_size=6, max_size=6), min_size=1, max_size=8), st.sampled_from(("TCP", "UDP")))
def test_flows_keep_their_backend_until_released_and_udp_ends_are_reported(
    steps: list[list[str]], protocol: str
) -> None:
    """Any rollout-like sequence: make before break at every write; a TCP backend id once handed out names the same
    address until release_unused; every UDP backend that stops serving or leaves is reported exactly then."""
    states = {"ready": BackendState.ACTIVE, "terminating": TERMINATING, "not-serving": NOT_SERVING}

    def desired(statuses: list[str]) -> list[Frontend]:
        by_status = {s: [n + 1 for n, got in enumerate(statuses) if got == s] for s in states}
        standby = tuple(
            b
            for s in ("terminating", "not-serving")
            for b in backends(*by_status[s], protocol=protocol, state=states[s])
        )
        return [frontend(backends(*by_status["ready"], protocol=protocol), protocol=protocol, standby=standby)]

    run_steps([desired(s) for s in steps])
    # run_steps checked make before break; replay once more watching ids and reported ends step by step
    w2 = MemoryMapWriter()
    rec2 = Reconciler(w2)
    named: dict[int, tuple[str, int, str]] = {}
    previous = ["absent"] * 6
    for statuses in steps:
        rec2.sync_service(SVC, desired(statuses))
        now = ids_by_address(w2)
        inverse = {i: a for a, i in now.items()}
        ends = rec2.take_flow_ends().udp_backends
        for n, (was, is_) in enumerate(zip(previous, statuses, strict=True)):
            address = (f"10.244.1.{n + 1}", 8080, protocol)
            stopped = was in ("ready", "terminating") and is_ in ("not-serving", "absent")
            if protocol == "UDP":
                assert (address in ends.values()) == stopped, (n, was, is_, ends)
        if protocol == "TCP":
            for backend_id, address in named.items():
                assert inverse.get(backend_id) == address, "a tracked flow's backend changed or vanished"
            named.update(inverse)
        previous = statuses
    gone = {i for a, i in ids_by_address(w2).items() if map_states(w2)[a] == "gone"}
    keep = set(sorted(gone)[: len(gone) // 2])
    rec2.release_unused(keep, set())
    assert {i for a, i in ids_by_address(w2).items() if map_states(w2)[a] == "gone"} == keep
