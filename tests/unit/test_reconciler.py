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
from kpr.model.types import Backend, Frontend, FrontendKind, ServiceKey
from kpr.reconcile.reconciler import Reconciler, ServiceSyncError
from kpr.reconcile.slots import assign_slots

pytestmark = pytest.mark.unit

SVC = ServiceKey("default", "web")


def backends(*last_octets: int, port: int = 8080, local: tuple[int, ...] = ()) -> tuple[Backend, ...]:
    return tuple(Backend(f"10.244.1.{n}", port, "TCP", node_local=n in local) for n in last_octets)


def frontend(bs: tuple[Backend, ...], *, addr: str = "10.96.0.10", port: int = 80, **kw: object) -> Frontend:
    return Frontend(SVC, "http", FrontendKind.CLUSTER_IP, addr, port, "TCP", bs, **kw)  # type: ignore[arg-type]


def datapath_view(w: MemoryMapWriter) -> dict[tuple[str, int, str, int], frozenset[tuple[str, int, str]] | str]:
    """What a new flow to each frontend (per scope the socket hooks use) can reach, or why it is rejected."""
    view: dict[tuple[str, int, str, int], frozenset[tuple[str, int, str]] | str] = {}
    for fam in ("4", "6"):
        entries = {codec.decode_svc_key(k): v for k, v in w.items(f"services{fam}")}
        be = {int(k.value): codec.decode_backend(v).address for k, v in w.items(f"backends{fam}")}
        for key, master in entries.items():
            if key.slot != 0:
                continue
            if key.scope == abi.SCOPE_DEFAULT and master.flags & abi.SVC_F_TWO_SCOPES:
                internal = next(
                    (v for k, v in entries.items() if k.address == key.address and k.scope == 1 and k.slot == 0),
                    None,
                )
                assert internal is not None, f"{key}: TWO_SCOPES without an internal entry"
            if master.count == 0:
                view[(*key.address, key.scope)] = "drop" if master.flags & abi.SVC_F_EMPTY_DROP else "reject"
                continue
            reach = set()
            for slot in range(1, master.count + 1):
                s = next(
                    (
                        v
                        for k, v in entries.items()
                        if k.address == key.address and k.scope == key.scope and k.slot == slot
                    ),
                    None,
                )
                assert s is not None, f"{key}: slot {slot} of {master.count} missing"
                assert s.backend_id in be, f"{key}: slot {slot} names unknown backend {s.backend_id}"
                reach.add(be[s.backend_id])
            view[(*key.address, key.scope)] = frozenset(reach)
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
    w, _ = run_steps(
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
    assert all(not t for t in w.tables.values() if t is not w.tables["counters"]), "maps must end empty"


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
    assert len(w.tables["backends4"]) == 1
    rec.remove_service(other)
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
        "backends4", codec.u32(4242), codec.backend_value("10.9.9.9", 1, "TCP", terminating=False, node_local=False)
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


def test_restore_drops_a_backend_no_slot_names_and_prune_deletes_it() -> None:
    w = MemoryMapWriter()
    Reconciler(w).sync_service(SVC, [frontend(backends(1))])
    stray = codec.backend_value("10.244.1.99", 8080, "TCP", terminating=False, node_local=False)
    w.update("backends4", codec.u32(99), stray)  # as if an agent died between a slot delete and the backend delete
    second = Reconciler(w)
    second.restore()
    assert ("10.244.1.99", 8080, "TCP") not in second.backends
    assert second.prune([SVC]) == 1
    assert len(w.tables["backends4"]) == 1 and all(v == (0, 0, 0) for v in second.drift().values())


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
