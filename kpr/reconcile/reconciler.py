"""The reconciler: desired frontends per service -> the smallest ordered list of map operations.

Make before break. A change is planned as one unit per service:
  1. new frontends' rev_nat and svc_names entries, new or changed backends,
  2. affinity_match entries, backend slots, then master entries (internal scope before the default scope, whose
     TWO_SCOPES flag points at it) -- a master's count only grows once every slot it covers exists,
  3. then, with the masters already shrunk: surplus slots, the internal scope when no longer needed, affinity_match
     entries, removed frontends (master first), and finally backends nobody references.
If any operation fails, the ones already applied are undone in reverse order, the in-memory state is left as it was
and the error is raised: a service is never left half-programmed. In-memory state is committed only on success.

Connection lifecycle (kube-proxy never deletes TCP conntrack entries; UDP ones only when their endpoint stops serving
or leaves): every endpoint of a frontend's port is a backend entry, the usable ones in slots and the others standby,
each with its state, so a flow keeps its backend through terminating and not-ready. A TCP or SCTP backend that leaves
every slice is marked GONE instead of deleted, and a removed TCP or SCTP frontend keeps its rev_nat entry: tracked
flows still name them. release_unused() deletes them once no tracked flow does. A UDP backend that stops serving or
leaves, and a UDP frontend that goes, are reported in `flow_ends` so the agent ends their flows and connected sockets.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kpr.datapath import abi, codec
from kpr.datapath.abi import U32, CData
from kpr.datapath.writers import MapWriteError, MapWriter
from kpr.model.types import Backend, Frontend, ServiceKey
from kpr.reconcile.bulk import BulkPlan
from kpr.reconcile.ids import IdAllocator, IdsExhausted
from kpr.reconcile.slots import assign_slots
from kpr.reconcile.state import (
    BACKEND_STATES,
    MAKE_ORDER,
    Address,
    AppliedFrontend,
    BackendEntry,
    BulkLoadError,
    FlowEnds,
    MapOp,
    ScopeState,
    SyncResult,
    claim_frontends,
    keeps_flows,
    scope_plan,
)


class ServiceSyncError(Exception):
    """A service could not be programmed: a map write failed (and was undone) or its ids ran out while planning."""

    def __init__(self, service: ServiceKey, cause: MapWriteError | IdsExhausted) -> None:
        self.service = service
        self.cause = cause
        super().__init__(f"{service}: {cause}; the service keeps its previous programming")

    @property
    def full(self) -> bool:
        """Whether room ran out (a full map, or every id in use): freeing the service's departing backends first may
        let it through."""
        return isinstance(self.cause, IdsExhausted) or self.cause.errno == errno.E2BIG

    @property
    def reason(self) -> str:
        """A short label for metrics: the map that failed, or the kind of id that ran out."""
        return self.cause.what if isinstance(self.cause, IdsExhausted) else self.cause.map_name


class Reconciler:
    def __init__(self, writer: MapWriter) -> None:
        self.writer = writer
        self.frontends: dict[Address, AppliedFrontend] = {}
        self.by_service: dict[ServiceKey, set[Address]] = {}
        self.backends: dict[Address, BackendEntry] = {}
        self._backend_by_id: dict[int, Address] = {}
        self.backend_ids = IdAllocator(writer.capacity("backends4") + writer.capacity("backends6"), "backend ids")
        self.rev_nat_ids = IdAllocator(writer.capacity("rev_nat4") + writer.capacity("rev_nat6"), "rev_nat ids")
        self.ops_applied = 0
        self.restored_entries = 0  # map entries found at restore: when 0 there is nothing left over to prune
        self.gone_backends: set[Address] = set()  # state GONE, no reference: kept while tracked flows name them
        self.lingering_rev_nats: dict[int, tuple[str, int]] = {}  # removed TCP/SCTP frontends, kept likewise
        self.unclaimed: set[Address] = set()  # restored backends no slot names, until the first sync has run
        self.flow_ends = FlowEnds()  # since the agent last took them (take_flow_ends)
        self.ranged_frontends = 0  # frontends with loadBalancerSourceRanges: the socket hooks need source addresses

    def _backend_identity(self, backend_id: int) -> Address | None:
        return self._backend_by_id.get(backend_id)

    # ---- planning and applying one service ----

    def sync_service(self, service: ServiceKey, frontends: Sequence[Frontend]) -> SyncResult:
        """Make the maps hold exactly `frontends` for `service` (an empty list removes it)."""
        plan = _Plan(self)
        result = SyncResult()
        desired, conflicts = claim_frontends(service, frontends, self.frontends)
        result.conflicts += conflicts
        try:
            for f in desired.values():
                plan.upsert(service, f)
            for address in sorted(self.by_service.get(service, set()) - desired.keys()):
                plan.remove(address)
        except IdsExhausted as e:
            plan.abort()
            raise ServiceSyncError(service, e) from e
        result.ops = self._apply(service, plan)
        return result

    def remove_service(self, service: ServiceKey) -> SyncResult:
        return self.sync_service(service, [])

    # ---- the first sync into empty maps, in bulk ----

    def pristine(self) -> bool:
        """Nothing adopted and nothing applied: the maps hold nothing of ours, so the first sync may use load_all()."""
        return not (
            self.restored_entries
            or self.frontends
            or self.backends
            or self.lingering_rev_nats
            or self.backend_ids.used
            or self.rev_nat_ids.used
        )

    def load_all(self, services: Iterable[tuple[ServiceKey, Sequence[Frontend]]]) -> dict[ServiceKey, SyncResult]:
        """The first sync into maps that hold nothing: what sync_service() would do for each service in turn (same
        entries, same ids, same state afterwards, same conflicts), packed straight into one batch per map.

        `services` in the order sync_service() would have been called (each service once). Nothing is written
        unless every map has room for it; if a write fails anyway, what was written is deleted again and
        BulkLoadError raised with the state untouched: the caller then syncs service by service.
        Make before break holds across the whole load: backends, rev_nat, names, affinity and source ranges first,
        then every slot, then the internal scopes' masters, and the default scopes' masters last.
        """
        if not self.pristine():
            raise BulkLoadError("the maps or the state hold entries already")
        plan = BulkPlan(self)
        results = {service: plan.add(service, frontends) for service, frontends in services}
        plan.check_room()
        plan.write()
        plan.commit()
        return results

    def _apply(self, service: ServiceKey, plan: _Plan) -> int:
        ops = plan.ops()
        done: list[MapOp] = []
        try:
            for group in _runs(ops):
                if len(group) == 1 or group[0].value is None:
                    for op in group:
                        self._write(op)
                        done.append(op)
                    continue
                try:  # consecutive updates of one map: one system call, applied in order
                    self.writer.update_many(group[0].map, [op.key for op in group], [op.value for op in group])
                except MapWriteError as e:
                    done.extend(group[: e.done])
                    raise
                done.extend(group)
        except MapWriteError as e:
            for op in reversed(done):
                with contextlib.suppress(MapWriteError):  # the undo of a write that just worked
                    self._write(op.inverse())
            plan.abort()
            raise ServiceSyncError(service, e) from e
        plan.commit(service)
        self.ops_applied += len(ops)
        return len(ops)

    def _write(self, op: MapOp) -> None:
        if op.value is None:
            self.writer.delete(op.map, op.key)
        else:
            self.writer.update(op.map, op.key, op.value)

    # ---- restart: rebuild the view from the pinned maps ----

    def restore(self) -> RestoreReport:
        """Adopt what a previous agent left in the maps, so the first sync only writes differences."""
        report = RestoreReport()
        contents = {name: self.writer.items(name) for name in _STATE_MAPS}
        self.restored_entries = sum(len(entries) for entries in contents.values())
        if not self.restored_entries:
            return report
        names = {int(k.value): codec.decode_svc_name(v) for k, v in contents["svc_names"]}
        for fam in ("4", "6"):
            for k, v in contents[f"backends{fam}"]:
                b = codec.decode_backend(v)
                self.backends[b.address] = BackendEntry(int(k.value), b.state, b.node_local)
                self._backend_by_id[int(k.value)] = b.address
                self.backend_ids.reserve(int(k.value))
            for decoded in codec.decode_services(contents[f"services{fam}"]):
                default = decoded.scopes.get(abi.SCOPE_DEFAULT)
                if default is None:
                    continue  # an internal scope without its default entry: garbage for repair()
                name = names.get(default.rev_nat_id)
                scopes = {
                    scope: ScopeState([0 if b is None else b for b in m.slots], m.flags, m.affinity_timeout)
                    for scope, m in decoded.scopes.items()
                }
                owner = ServiceKey(name.namespace, name.name) if name else None
                fe = AppliedFrontend(
                    decoded.address,
                    owner,
                    name.port_name if name else "",
                    name.kind if name else "?",
                    default.rev_nat_id,
                    scopes,
                )
                self.frontends[decoded.address] = fe
                self.rev_nat_ids.reserve(default.rev_nat_id)
                if owner is not None:
                    self.by_service.setdefault(owner, set()).add(decoded.address)
                else:
                    report.orphans += 1
        in_use = {fe.rev_nat_id for fe in self.frontends.values()}
        for fam in ("4", "6"):
            for k, v in contents[f"rev_nat{fam}"]:
                if int(k.value) not in in_use:  # a removed frontend's, kept for its flows (or garbage: same fate)
                    self.lingering_rev_nats[int(k.value)] = codec.decode_rev_nat(v)
                    self.rev_nat_ids.reserve(int(k.value))
        ranges: dict[int, set[str]] = {}
        for fam in ("4", "6"):
            for k, _ in contents[f"src_ranges{fam}"]:
                rev_nat_id, cidr = codec.decode_src_range(k)
                ranges.setdefault(rev_nat_id, set()).add(cidr)
        for fe in self.frontends.values():
            fe.source_ranges = frozenset(ranges.get(fe.rev_nat_id, ()))
        self.ranged_frontends = sum(1 for fe in self.frontends.values() if fe.source_ranges)
        by_id = {e.id: e for e in self.backends.values()}
        for fe in self.frontends.values():
            for scope in fe.scopes.values():
                for backend_id in set(scope.slots):
                    if backend_id in by_id:
                        by_id[backend_id].refs += 1
        # A backend no slot names is standby (the maps do not say for which frontend), gone (kept for its flows), or
        # garbage. The first sync reclaims standby ones with their ids, so the flows on them keep their backend;
        # prune() then treats the rest as left.
        for identity, entry in self.backends.items():
            if entry.refs == 0:
                (self.gone_backends if entry.state == abi.BACKEND_GONE else self.unclaimed).add(identity)
        # Flows in conntrack may still name ids freed just before a restart: hand out new ids after theirs.
        for fam in ("4", "6"):
            for _, value in self.writer.items(f"ct{fam}"):
                self.backend_ids.skip_past(value.backend_id)
        report.frontends = len(self.frontends)
        report.backends = len(self.backends)
        report.services = len(self.by_service)
        return report

    def services(self) -> set[ServiceKey]:
        return set(self.by_service)

    def prune(self, live: Iterable[ServiceKey]) -> int:
        """After the first full sync: remove services that no longer exist, orphans and unexplained entries."""
        live_set = set(live)
        ops = 0
        for service in sorted(self.by_service.keys() - live_set):
            ops += self.remove_service(service).ops
        for address in [a for a, fe in self.frontends.items() if fe.service is None]:
            plan = _Plan(self)
            plan.remove(address)
            ops += self._apply(ServiceKey("", "(orphan)"), plan)
        ops += self.settle_unclaimed()
        if self.restored_entries:  # entries from before the restart that no service explains
            ops += self.repair(delete_only=True)
        return ops

    def settle_unclaimed(self) -> int:
        """Restored backends the first sync did not reclaim have left every slice: mark gone, or delete (UDP)."""
        ops = 0
        for identity in sorted(self.unclaimed):
            entry = self.backends.get(identity)
            if entry is None or entry.refs > 0:
                self.unclaimed.discard(identity)
                continue
            _, backends_map, _ = codec.maps_for(identity[0])
            try:
                if keeps_flows(identity[2]):
                    gone = BackendEntry(entry.id, abi.BACKEND_GONE, entry.node_local)
                    self.writer.update(backends_map, codec.u32(entry.id), gone.value(identity))
                    entry.state = abi.BACKEND_GONE
                    self.gone_backends.add(identity)
                else:
                    self.writer.delete(backends_map, codec.u32(entry.id))
                    self._forget_backend(identity, entry)
            except MapWriteError:
                continue  # kept as it is; the next settle tries again
            self.unclaimed.discard(identity)
            ops += 1
        self.ops_applied += ops
        return ops

    def _forget_backend(self, identity: Address, entry: BackendEntry) -> None:
        del self.backends[identity]
        self._backend_by_id.pop(entry.id, None)
        self.backend_ids.release(entry.id)
        if not keeps_flows(identity[2]) and entry.state <= abi.BACKEND_TERMINATING:  # it served until now
            self.flow_ends.udp_backends[entry.id] = identity

    # ---- flows: what outlives its endpoint, and until when ----

    def take_flow_ends(self) -> FlowEnds:
        ends, self.flow_ends = self.flow_ends, FlowEnds()
        return ends

    def lingering(self) -> tuple[set[int], set[int]]:
        """(backend ids, rev_nat ids) kept only because tracked flows may still name them."""
        return {self.backends[a].id for a in self.gone_backends}, set(self.lingering_rev_nats)

    def release_unused(self, backend_ids_in_use: set[int], rev_nat_ids_in_use: set[int]) -> int:
        """Delete the gone backends and removed frontends' rev_nat entries that no tracked flow names any more.

        `*_in_use` are read from conntrack after the state was taken: nothing new can start naming a gone backend or
        a removed frontend (neither is in any slot or master), so what is unused then stays unused.
        """
        ops = 0
        for identity in sorted(self.gone_backends):
            entry = self.backends[identity]
            if entry.id in backend_ids_in_use:
                continue
            _, backends_map, _ = codec.maps_for(identity[0])
            try:
                self.writer.delete(backends_map, codec.u32(entry.id))
            except MapWriteError:
                continue
            self.gone_backends.discard(identity)
            self._forget_backend(identity, entry)
            ops += 1
        for rev_nat_id, (addr, _) in sorted(self.lingering_rev_nats.items()):
            if rev_nat_id in rev_nat_ids_in_use:
                continue
            _, _, rev_nat_map = codec.maps_for(addr)
            try:
                self.writer.delete(rev_nat_map, codec.u32(rev_nat_id))
            except MapWriteError:
                continue
            del self.lingering_rev_nats[rev_nat_id]
            self.rev_nat_ids.release(rev_nat_id)
            ops += 1
        self.ops_applied += ops
        return ops

    # ---- drift: compare the maps with what the state says they hold ----

    def expected_entries(self) -> dict[str, dict[bytes, bytes]]:
        want: dict[str, dict[bytes, bytes]] = {name: {} for name in _STATE_MAPS}
        for identity, b in self.backends.items():
            _, backends_map, _ = codec.maps_for(identity[0])
            want[backends_map][bytes(codec.u32(b.id))] = bytes(b.value(identity))
        for rev_nat_id, (addr, port) in self.lingering_rev_nats.items():
            _, _, rev_nat_map = codec.maps_for(addr)
            want[rev_nat_map][bytes(codec.u32(rev_nat_id))] = bytes(codec.rev_nat_value(addr, port))
        for fe in self.frontends.values():
            for op in _Plan.frontend_entries(fe):
                assert op.value is not None
                want[op.map][bytes(op.key)] = bytes(op.value)
        return want

    def drift(self) -> dict[str, tuple[int, int, int]]:
        """Per map: (missing, different, unexpected) entry counts; all zero means the maps match the state."""
        out = {}
        for name, want in self.expected_entries().items():
            have = {bytes(k): bytes(v) for k, v in self.writer.items(name)}
            missing = sum(1 for k in want if k not in have)
            different = sum(1 for k, v in want.items() if k in have and have[k] != v)
            unexpected = sum(1 for k in have if k not in want)
            out[name] = (missing, different, unexpected)
        return out

    def repair(self, *, delete_only: bool = False) -> int:
        """Write what the state says is missing or different, then delete what it does not explain."""
        ops = 0
        expected = self.expected_entries()
        if not delete_only:
            for name in MAKE_ORDER:
                have = {bytes(k): bytes(v) for k, v in self.writer.items(name)}
                spec = abi.MAPS[name]
                entries = list(expected[name].items())
                if name.startswith("services"):
                    # make before break here too: slots before masters, the internal scope before the default one
                    entries = sorted(entries, key=lambda kv: _master_last(spec.key.from_buffer_copy(kv[0])))
                for raw_key, raw_value in entries:
                    if have.get(raw_key) != raw_value:
                        self.writer.update(
                            name, spec.key.from_buffer_copy(raw_key), spec.value.from_buffer_copy(raw_value)
                        )
                        ops += 1
        for name in reversed(MAKE_ORDER):
            for key, _ in self.writer.items(name):
                if bytes(key) not in expected[name]:
                    self.writer.delete(name, key)
                    ops += 1
        self.ops_applied += ops
        return ops


def _master_last(key: CData) -> tuple[bool, int]:
    return (key.slot == 0, -key.scope)


_STATE_MAPS = MAKE_ORDER


def _runs(ops: list[MapOp]) -> list[list[MapOp]]:
    """Split ops into runs of consecutive operations of the same kind (update or delete) on the same map."""
    runs: list[list[MapOp]] = []
    for op in ops:
        if runs and runs[-1][0].map == op.map and (runs[-1][0].value is None) == (op.value is None):
            runs[-1].append(op)
        else:
            runs.append([op])
    return runs


@dataclass(slots=True)
class RestoreReport:
    frontends: int = 0
    backends: int = 0
    services: int = 0
    orphans: int = 0


class _Plan:
    """The staged operations and state changes for one service; nothing touches the reconciler until commit()."""

    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.make_frontend: list[MapOp] = []  # rev_nat, svc_names of new frontends
        self.make_backend: list[MapOp] = []
        self.make_slots: list[MapOp] = []  # affinity_match, slots, masters (already ordered per frontend)
        self.break_slots: list[MapOp] = []
        self.break_frontend: list[MapOp] = []
        self.new_frontends: dict[Address, AppliedFrontend] = {}
        self.removed: list[Address] = []
        self.new_backends: dict[Address, BackendEntry] = {}  # created or attribute-changed, staged copies
        self.new_backend_ids: dict[int, Address] = {}
        self.ref_delta: dict[Address, int] = {}
        self.new_rev_nat_ids: list[int] = []
        self.lingering_rev_nats: dict[int, tuple[str, int]] = {}  # removed TCP/SCTP frontends' rev_nat entries
        self.flow_ends = FlowEnds()
        self.release_backends: list[MapOp] | None = None  # last of all; computed once the references are known

    def ops(self) -> list[MapOp]:
        if self.release_backends is None:
            self.release_backends = self._backend_releases()
        return (
            self.make_frontend
            + self.make_backend
            + self.make_slots
            + self.break_slots
            + self.break_frontend
            + self.release_backends
        )

    # -- backends --

    def _backend_id(self, b: Backend) -> int:
        """The id for `b`, creating or updating its entry (state, locality) when needed."""
        identity = (b.addr, b.port, b.protocol)
        staged = self.new_backends.get(identity)
        if staged is not None:
            return staged.id
        state = BACKEND_STATES[b.state]
        current = self.rec.backends.get(identity)
        if current is not None and current.state == state and current.node_local == b.node_local:
            return current.id
        if current is None:
            entry = BackendEntry(self.rec.backend_ids.allocate(), state, b.node_local)
            prev = None
        else:
            entry = BackendEntry(current.id, state, b.node_local, current.refs)
            prev = current.value(identity)
            if not keeps_flows(b.protocol) and current.state <= abi.BACKEND_TERMINATING < state:
                self.flow_ends.udp_backends[entry.id] = identity  # it stopped serving: its UDP flows move
        self.new_backends[identity] = entry
        self.new_backend_ids[entry.id] = identity
        backends_map = "backends6" if ":" in b.addr else "backends4"
        self.make_backend.append(MapOp(backends_map, U32(entry.id), entry.value(identity), prev))
        return entry.id

    def _identity_of(self, backend_id: int) -> Address | None:
        return self.new_backend_ids.get(backend_id) or self.rec._backend_identity(backend_id)

    def _backend_releases(self) -> list[MapOp]:
        """Backends no frontend holds any more: TCP/SCTP ones are marked gone (tracked flows may name them), UDP ones
        deleted."""
        ops = []
        for identity, delta in sorted(self.ref_delta.items()):
            if delta >= 0:
                continue
            current = self.rec.backends.get(identity)
            staged = self.new_backends.get(identity)
            entry = staged or current
            if entry is None or entry.refs + delta > 0:
                continue
            _, backends_map, _ = codec.maps_for(identity[0])
            prev = entry.value(identity)
            if keeps_flows(identity[2]):
                gone = BackendEntry(entry.id, abi.BACKEND_GONE, entry.node_local).value(identity)
                ops.append(MapOp(backends_map, codec.u32(entry.id), gone, prev))
            else:
                ops.append(MapOp(backends_map, codec.u32(entry.id), None, prev))
        return ops

    # -- frontends --

    def upsert(self, service: ServiceKey, f: Frontend) -> None:
        services_map, _, rev_nat_map = codec.maps_for(f.addr)
        old = self.rec.frontends.get(f.address)
        if old is None:
            rev_nat_id = self.rec.rev_nat_ids.allocate()
            self.new_rev_nat_ids.append(rev_nat_id)
            self.make_frontend.append(
                MapOp(rev_nat_map, codec.u32(rev_nat_id), codec.rev_nat_value(f.addr, f.port), None)
            )
            old_scopes: dict[int, ScopeState] = {}
        else:
            rev_nat_id = old.rev_nat_id
            old_scopes = old.scopes
        name = codec.svc_name_value(f.kind, service.namespace, service.name, f.port_name)
        if old is None or (old.service, old.port_name, old.kind) != (service, f.port_name, str(f.kind)):
            prev_name = (
                None
                if old is None or old.service is None
                else codec.svc_name_value(old.kind, old.service.namespace, old.service.name, old.port_name)
            )
            self.make_frontend.append(MapOp("svc_names", codec.u32(rev_nat_id), name, prev_name))

        new_scopes: dict[int, ScopeState] = {}
        for scope, (backends, flags) in scope_plan(f).items():
            ids = [self._backend_id(b) for b in backends]
            old_slots = old_scopes[scope].slots if scope in old_scopes else []
            new_scopes[scope] = ScopeState(assign_slots(old_slots, ids), flags, f.affinity_timeout)
        standby = frozenset(self._backend_id(b) for b in f.standby)

        fe = AppliedFrontend(
            f.address, service, f.port_name, str(f.kind), rev_nat_id, new_scopes, frozenset(f.source_ranges), standby
        )
        self._diff_frontend(services_map, old, fe)
        self.new_frontends[f.address] = fe

    def remove(self, address: Address) -> None:
        old = self.rec.frontends[address]
        services_map, _, rev_nat_map = codec.maps_for(address[0])
        self._diff_frontend(services_map, old, None)
        if keeps_flows(address[2]):  # replies of its tracked flows are still shown as coming from it
            self.lingering_rev_nats[old.rev_nat_id] = (address[0], address[1])
        else:
            self.break_frontend.append(
                MapOp(rev_nat_map, codec.u32(old.rev_nat_id), None, codec.rev_nat_value(address[0], address[1]))
            )
            self.flow_ends.udp_frontends[old.rev_nat_id] = address
        prev_name = (
            codec.svc_name_value(old.kind, old.service.namespace, old.service.name, old.port_name)
            if old.service is not None
            else None
        )
        self.break_frontend.append(MapOp("svc_names", codec.u32(old.rev_nat_id), None, prev_name))
        self.removed.append(address)

    def _diff_frontend(self, services_map: str, old: AppliedFrontend | None, new: AppliedFrontend | None) -> None:
        """Slot, master and affinity_match operations taking one frontend from `old` to `new`."""
        addr, port, protocol = (new or old).address  # type: ignore[union-attr]
        rev_nat_id = (new or old).rev_nat_id  # type: ignore[union-attr]
        old_scopes = old.scopes if old else {}
        new_scopes = new.scopes if new else {}

        key = codec.svc_key_maker(addr, port, protocol)

        def master(s: ScopeState) -> abi.SvcValue:
            return codec.svc_master(len(s.slots), rev_nat_id, s.flags, s.affinity_timeout)

        old_match = old.affinity_backends() if old else set()
        new_match = new.affinity_backends() if new else set()
        for backend_id in sorted(new_match - old_match):
            k = abi.AffinityMatchKey(backend_id=backend_id, rev_nat_id=rev_nat_id)
            self.make_slots.append(MapOp("affinity_match", k, abi.U8(1), None))
        # Allowed source ranges exist before the master's SOURCE_RANGES flag, and go after it is cleared.
        old_ranges = old.source_ranges if old else frozenset()
        new_ranges = new.source_ranges if new else frozenset()
        for cidr in sorted(new_ranges - old_ranges):
            self.make_slots.append(MapOp(*codec.src_range_entry(rev_nat_id, cidr), abi.U8(1), None))

        # Internal scope first: the default scope's TWO_SCOPES flag must never point at a missing entry.
        make_order = sorted(new_scopes, reverse=True)
        for scope in make_order:
            s = new_scopes[scope]
            was = old_scopes.get(scope)
            old_slots = was.slots if was else []
            for i, backend_id in enumerate(s.slots):
                if i >= len(old_slots) or old_slots[i] != backend_id:
                    prev = codec.svc_slot(old_slots[i]) if i < len(old_slots) else None
                    self.make_slots.append(MapOp(services_map, key(scope, i + 1), codec.svc_slot(backend_id), prev))
            if was is None or (len(was.slots), was.flags, was.affinity_timeout) != (
                len(s.slots),
                s.flags,
                s.affinity_timeout,
            ):
                prev = master(was) if was else None
                self.make_slots.append(MapOp(services_map, key(scope, 0), master(s), prev))

        # Break: the default scope (and its TWO_SCOPES flag) changed above, so surplus can go now.
        for scope in sorted(old_scopes):
            was = old_scopes[scope]
            kept = new_scopes.get(scope)
            keep = len(kept.slots) if kept else 0
            if kept is None:
                self.break_slots.append(MapOp(services_map, key(scope, 0), None, master(was)))
            for i in range(keep, len(was.slots)):
                self.break_slots.append(MapOp(services_map, key(scope, i + 1), None, codec.svc_slot(was.slots[i])))
        for backend_id in sorted(old_match - new_match):
            k = abi.AffinityMatchKey(backend_id=backend_id, rev_nat_id=rev_nat_id)
            self.break_slots.append(MapOp("affinity_match", k, None, abi.U8(1)))
        for cidr in sorted(old_ranges - new_ranges):
            self.break_slots.append(MapOp(*codec.src_range_entry(rev_nat_id, cidr), None, abi.U8(1)))

        # Reference counts: one per (frontend, scope) that holds a backend in its slots, one per frontend holding it
        # standby.
        old_held = [set(s.slots) for s in old_scopes.values()] + ([old.standby] if old else [])
        new_held = [set(s.slots) for s in new_scopes.values()] + ([new.standby] if new else [])
        for held, step in ((old_held, -1), (new_held, 1)):
            for ids in held:
                for backend_id in ids:
                    identity = self._identity_of(backend_id)
                    if identity is not None:
                        self.ref_delta[identity] = self.ref_delta.get(identity, 0) + step

    @staticmethod
    def frontend_entries(fe: AppliedFrontend) -> list[MapOp]:
        """Every map entry an applied frontend implies (for drift checks), as update operations."""
        addr, port, protocol = fe.address
        services_map, _, rev_nat_map = codec.maps_for(addr)
        out = [MapOp(rev_nat_map, codec.u32(fe.rev_nat_id), codec.rev_nat_value(addr, port), None)]
        if fe.service is not None:
            name = codec.svc_name_value(fe.kind, fe.service.namespace, fe.service.name, fe.port_name)
            out.append(MapOp("svc_names", codec.u32(fe.rev_nat_id), name, None))
        for scope, s in fe.scopes.items():
            value = codec.svc_master(len(s.slots), fe.rev_nat_id, s.flags, s.affinity_timeout)
            out.append(MapOp(services_map, codec.svc_key(addr, port, protocol, scope, 0), value, None))
            for i, backend_id in enumerate(s.slots):
                key = codec.svc_key(addr, port, protocol, scope, i + 1)
                out.append(MapOp(services_map, key, codec.svc_slot(backend_id), None))
        for backend_id in sorted(fe.affinity_backends()):
            k = abi.AffinityMatchKey(backend_id=backend_id, rev_nat_id=fe.rev_nat_id)
            out.append(MapOp("affinity_match", k, abi.U8(1), None))
        for cidr in sorted(fe.source_ranges):
            out.append(MapOp(*codec.src_range_entry(fe.rev_nat_id, cidr), abi.U8(1), None))
        return out

    # -- outcome --

    def commit(self, service: ServiceKey) -> None:
        rec = self.rec
        for identity, entry in self.new_backends.items():
            current = rec.backends.get(identity)
            entry.refs = current.refs if current else 0
            rec.backends[identity] = entry
            rec._backend_by_id[entry.id] = identity
            rec.gone_backends.discard(identity)  # back in a slice
            rec.unclaimed.discard(identity)
        rec.flow_ends.udp_backends.update(self.flow_ends.udp_backends)
        rec.flow_ends.udp_frontends.update(self.flow_ends.udp_frontends)
        for identity, delta in self.ref_delta.items():
            held = rec.backends.get(identity)
            if held is None:
                continue
            held.refs += delta
            if held.refs <= 0:
                held.refs = 0
                if keeps_flows(identity[2]):
                    held.state = abi.BACKEND_GONE
                    rec.gone_backends.add(identity)
                else:
                    rec._forget_backend(identity, held)
        for address in self.removed:
            fe = rec.frontends.pop(address)
            rec.ranged_frontends -= bool(fe.source_ranges)
            if fe.rev_nat_id in self.lingering_rev_nats:
                rec.lingering_rev_nats[fe.rev_nat_id] = self.lingering_rev_nats[fe.rev_nat_id]
            else:
                rec.rev_nat_ids.release(fe.rev_nat_id)
            if fe.service is not None:
                owned = rec.by_service.get(fe.service)
                if owned is not None:
                    owned.discard(address)
                    if not owned:
                        del rec.by_service[fe.service]
        for address, fe in self.new_frontends.items():
            old = rec.frontends.get(address)
            rec.ranged_frontends += bool(fe.source_ranges) - bool(old and old.source_ranges)
            rec.frontends[address] = fe
            rec.by_service.setdefault(service, set()).add(address)

    def abort(self) -> None:
        for identity, entry in self.new_backends.items():
            if identity not in self.rec.backends:
                self.rec.backend_ids.release(entry.id)
        for rev_nat_id in self.new_rev_nat_ids:
            self.rec.rev_nat_ids.release(rev_nat_id)
