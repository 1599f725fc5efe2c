"""The first sync into maps that hold nothing, in bulk (Reconciler.load_all): the state sync_service() would build
service after service, and every map entry packed straight into one buffer per map, written with one batch call per
map in make-before-break order, and deleted again if a write fails."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kpr.datapath import abi, codec
from kpr.datapath.writers import MapWriteError
from kpr.model.types import Backend, Frontend, ServiceKey
from kpr.reconcile.state import (
    BACKEND_STATES,
    MAKE_ORDER,
    Address,
    AppliedFrontend,
    BackendEntry,
    BulkLoadError,
    ScopeState,
    SyncResult,
    claim_frontends,
    keeps_flows,
    scope_plan,
)

if TYPE_CHECKING:
    from kpr.reconcile.reconciler import Reconciler


class BulkPlan:
    """load_all()'s work: the state sync_service() would build service after service, and every map entry packed
    into one buffer per map, written at the end in make-before-break order."""

    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.frontends: dict[Address, AppliedFrontend] = {}
        self.by_service: dict[ServiceKey, set[Address]] = {}
        self.backends: dict[Address, BackendEntry] = {}
        self.backend_by_id: dict[int, Address] = {}
        self.rev_nat_ids: list[int] = []
        self.next_backend_id = rec.backend_ids.next
        self.backend_id_limit = rec.backend_ids.limit
        self.next_rev_nat_id = rec.rev_nat_ids.next
        self.udp_backend_ends: dict[int, Address] = {}
        self.ops = 0
        self.packed: list[tuple[str, bytes, bytes, int]] | None = None  # _ordered(), once all services are in
        # map -> (keys, values), packed back to back; the services maps' slots, internal masters and default masters
        # apart, for ordering
        self.entries: dict[str, tuple[bytearray, bytearray]] = {name: (bytearray(), bytearray()) for name in MAKE_ORDER}
        self.masters: dict[tuple[str, int], tuple[bytearray, bytearray]] = {
            (name, scope): (bytearray(), bytearray()) for name in ("services4", "services6") for scope in (0, 1)
        }

    def _backend(self, b: Backend, staged: dict[Address, BackendEntry]) -> BackendEntry:
        """_Plan._backend_id's outcome: the entry of `b` as of this service (created, or its state changed)."""
        identity = (b.addr, b.port, b.protocol)
        entry = staged.get(identity)
        if entry is not None:
            return entry
        state = BACKEND_STATES[b.state]
        entry = self.backends.get(identity)
        if entry is not None and entry.state == state and entry.node_local == b.node_local:
            return entry  # as an earlier service left it: not staged, as in _Plan
        if entry is None:
            limit = self.backend_id_limit
            if len(self.backends) >= limit:
                raise BulkLoadError(f"backend ids: all {limit} ids would be in use")
            backend_id = self.next_backend_id
            self.next_backend_id = backend_id % limit + 1
            entry = BackendEntry(backend_id, state, b.node_local)
            self.backends[identity] = entry
            self.backend_by_id[backend_id] = identity
        else:  # another service saw the endpoint in another state: the later service's word stands, as in _Plan
            if not keeps_flows(b.protocol) and entry.state <= abi.BACKEND_TERMINATING < state:
                self.udp_backend_ends[entry.id] = identity
            entry.state, entry.node_local = state, b.node_local
        staged[identity] = entry
        self.ops += 1
        return entry

    def add(self, service: ServiceKey, frontends: Sequence[Frontend]) -> SyncResult:
        """One service, as sync_service() would program it after the services added before it."""
        result = SyncResult()
        desired, conflicts = claim_frontends(service, frontends, self.frontends)
        result.conflicts += conflicts
        if service in self.by_service:
            raise ValueError(f"{service} given twice")
        ops_before = self.ops
        staged: dict[Address, BackendEntry] = {}
        names: dict[tuple[str, str], bytes] = {}
        entries, masters = self.entries, self.masters
        limit = self.rec.rev_nat_ids.limit
        for f in desired.values():
            family = 6 if ":" in f.addr else 4
            services_map, rev_nat_map = f"services{family}", f"rev_nat{family}"
            if len(self.rev_nat_ids) >= limit:
                raise BulkLoadError(f"rev_nat ids: all {limit} ids would be in use")
            rev_nat_id = self.next_rev_nat_id
            self.next_rev_nat_id = rev_nat_id % limit + 1
            self.rev_nat_ids.append(rev_nat_id)
            packed_id = codec.pack_u32(rev_nat_id)
            kind = str(f.kind)
            name = names.get((f.port_name, kind))
            if name is None:
                name = names[(f.port_name, kind)] = codec.pack_svc_name(
                    kind, service.namespace, service.name, f.port_name
                )
            keys, values = entries[rev_nat_map]
            keys += packed_id
            values += codec.pack_rev_nat(f.addr, f.port)
            keys, values = entries["svc_names"]
            keys += packed_id
            values += name

            scopes: dict[int, ScopeState] = {}
            held: list[list[BackendEntry]] = []
            for scope, (scope_backends, flags) in scope_plan(f).items():
                scope_entries = [self._backend(b, staged) for b in scope_backends]
                held.append(scope_entries)
                scopes[scope] = ScopeState([e.id for e in scope_entries], flags, f.affinity_timeout)
            standby_entries = [self._backend(b, staged) for b in f.standby]
            held.append(standby_entries)
            fe = AppliedFrontend(
                f.address,
                service,
                f.port_name,
                kind,
                rev_nat_id,
                scopes,
                frozenset(f.source_ranges),
                frozenset(e.id for e in standby_entries),
            )
            for group in held:  # one reference per (frontend, scope) holding it, one per frontend holding it standby
                if len({e.id for e in group}) < len(group):
                    group = list({e.id: e for e in group}.values())
                for e in group:
                    e.refs += 1

            keys, values = entries["affinity_match"]
            for backend_id in fe.affinity_backends():
                keys += codec.pack_affinity_match(backend_id, rev_nat_id)
                values += codec.U8_ONE
            for cidr in fe.source_ranges:
                src_map, key = codec.pack_src_range(rev_nat_id, cidr)
                entries[src_map][0].extend(key)
                entries[src_map][1].extend(codec.U8_ONE)
            slot_keys, slot_values = entries[services_map]
            prefix = codec.svc_key_prefix(*f.address)
            for scope, state in scopes.items():
                suffixes = codec.svc_key_suffixes(scope, len(state.slots) + 1)
                if len(suffixes) > 1:  # prefix + slot 1's suffix + prefix + slot 2's ... in one go
                    slot_keys += prefix
                    slot_keys += prefix.join(suffixes[1:])
                slot_values += b"".join(map(codec.pack_svc_slot, state.slots))
                keys, values = masters[(services_map, scope)]
                keys += prefix
                keys += suffixes[0]
                values += codec.pack_svc_master(len(state.slots), rev_nat_id, state.flags, state.affinity_timeout)
            self.ops += (
                2 + len(fe.affinity_backends()) + len(fe.source_ranges) + sum(len(s.slots) + 1 for s in scopes.values())
            )
            self.frontends[f.address] = fe
        if desired:
            self.by_service[service] = set(desired)
        result.ops = self.ops - ops_before
        return result

    def _ordered(self) -> list[tuple[str, bytes, bytes, int]]:
        """(map, keys, values, count) in the order they are written."""
        if self.packed is not None:
            return self.packed
        for (addr, port, protocol), entry in self.backends.items():  # in their final state, once each
            keys, values = self.entries["backends6" if ":" in addr else "backends4"]
            keys += codec.pack_u32(entry.id)
            values += codec.pack_backend(addr, port, protocol, state=entry.state, node_local=entry.node_local)
        out = []
        for name in MAKE_ORDER:
            keys, values = self.entries[name]
            parts = [(keys, values)]
            if name.startswith("services"):  # slots, then internal scopes' masters, then the default scopes'
                parts += [self.masters[(name, scope)] for scope in (abi.SCOPE_INTERNAL, abi.SCOPE_DEFAULT)]
            all_keys = b"".join(k for k, _ in parts)
            if all_keys:
                out.append((name, all_keys, b"".join(v for _, v in parts), len(all_keys) // codec.key_size(name)))
        self.packed = out
        self.entries.clear()  # what the map buffers are joined from
        self.masters.clear()
        return out

    def check_room(self) -> None:
        for name, keys, _, count in self._ordered():
            need = count
            if name.startswith("src_ranges"):  # CIDRs may share a key
                need = len(set(codec.split_packed(keys, codec.key_size(name))))
            room = self.rec.writer.capacity(name)
            if need > room:
                raise BulkLoadError(f"{name} would need {need} entries and has room for {room}")

    def write(self) -> None:
        writer = self.rec.writer
        written: list[tuple[str, bytes]] = []
        for name, keys, values, count in self._ordered():
            try:
                writer.update_packed(name, keys, values, count)
            except Exception as e:  # a full map above all; whatever it was, what was written is taken back
                done = e.done if isinstance(e, MapWriteError) else count  # unknown: try to delete them all
                written.append((name, keys[: done * codec.key_size(name)]))
                left = self._undo(written)
                raise BulkLoadError(
                    f"writing {count} entries into {name} failed after {done}: {e}; "
                    + (f"{left} written entries could not be deleted" if left else "everything written was deleted")
                ) from e
            written.append((name, keys))

    def _undo(self, written: list[tuple[str, bytes]]) -> int:
        """Delete what was written, newest first (masters before slots before backends); returns how many deletions
        failed. Those entries stay for prune() to remove (restored_entries makes it check the maps)."""
        left = 0
        for name, keys in reversed(written):
            key_type = abi.MAPS[name].key
            for key in reversed(codec.split_packed(keys, codec.key_size(name))):
                try:
                    self.rec.writer.delete(name, key_type.from_buffer_copy(key))
                except MapWriteError:
                    left += 1
        self.rec.restored_entries += left
        return left

    def commit(self) -> None:
        rec = self.rec
        rec.frontends = self.frontends
        rec.by_service = self.by_service
        rec.backends = self.backends
        rec._backend_by_id = self.backend_by_id
        rec.backend_ids.take_run(self.backend_by_id.keys(), self.next_backend_id)
        rec.rev_nat_ids.take_run(self.rev_nat_ids, self.next_rev_nat_id)
        rec.ranged_frontends = sum(1 for fe in self.frontends.values() if fe.source_ranges)
        rec.flow_ends.udp_backends.update(self.udp_backend_ends)
        rec.ops_applied += self.ops
