"""What the reconciler knows of the maps, shared by its two ways of writing them: service by service
(reconciler.py) and the first sync into empty maps in bulk (bulk.py).

The applied state per frontend and backend, a map operation and its inverse, what a sync reports, the order in
which the maps are made (make before break: deletions run it in reverse) and the scopes a frontend needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kpr.datapath import abi, codec
from kpr.datapath.abi import CData
from kpr.model.types import Backend, BackendState, Frontend, FrontendKind, ServiceKey

Address = tuple[str, int, str]  # (addr, port, protocol)

# The model's endpoint states as backend.state; BACKEND_GONE has no model state (the reconciler sets it).
BACKEND_STATES = {
    BackendState.ACTIVE: abi.BACKEND_ACTIVE,
    BackendState.TERMINATING: abi.BACKEND_TERMINATING,
    BackendState.NOT_SERVING: abi.BACKEND_NOT_SERVING,
}


class MapOp(NamedTuple):  # a tuple: a full sync builds hundreds of thousands of these
    map: str
    key: CData
    value: CData | None  # None: delete
    prev: CData | None  # what the entry held before (None: absent), to undo

    def inverse(self) -> MapOp:
        return MapOp(self.map, self.key, self.prev, self.value)


@dataclass(slots=True)
class ScopeState:
    slots: list[int]  # backend ids; slot n is slots[n - 1]
    flags: int
    affinity_timeout: int


@dataclass(slots=True)
class AppliedFrontend:
    address: Address
    service: ServiceKey | None  # None: restored without a name (an orphan until pruned)
    port_name: str
    kind: str
    rev_nat_id: int
    scopes: dict[int, ScopeState]
    source_ranges: frozenset[str] = frozenset()  # loadBalancerSourceRanges CIDRs, canonical
    standby: frozenset[int] = frozenset()  # backend ids of the other endpoints (no map entry of their own)

    def affinity_backends(self) -> set[int]:
        if not self.scopes[abi.SCOPE_DEFAULT].flags & abi.SVC_F_AFFINITY:
            return set()
        return {b for scope in self.scopes.values() for b in scope.slots}


@dataclass(slots=True)
class BackendEntry:
    id: int
    state: int  # abi.BACKEND_*
    node_local: bool
    refs: int = 0  # (frontend, scope) pairs whose slots hold it, plus frontends that hold it standby

    def value(self, identity: Address) -> CData:
        return codec.backend_value(*identity, state=self.state, node_local=self.node_local)


def keeps_flows(protocol: str) -> bool:
    """Whether flows outlive their endpoint: TCP and SCTP, whose conntrack entries kube-proxy never deletes."""
    return protocol != "UDP"


@dataclass(slots=True)
class FlowEnds:
    """What the agent must end after a sync: the flows and connected sockets of UDP backends that stopped serving or
    left (id -> backend address) and of UDP frontends that went (rev_nat id -> frontend address)."""

    udp_backends: dict[int, Address] = field(default_factory=dict)
    udp_frontends: dict[int, Address] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.udp_backends or self.udp_frontends)


class BulkLoadError(Exception):
    """load_all() could not program the maps (no room, or a write failed and was undone): the state is untouched, and
    nothing of it is left in the maps but entries whose deletion failed too (counted as restored_entries, which the
    first sync's prune() then removes)."""


@dataclass(slots=True)
class SyncResult:
    ops: int = 0
    conflicts: list[str] = field(default_factory=list)


# The maps whose whole content the reconciler owns, in make-before-break order (deletions run in reverse).
MAKE_ORDER = [
    "backends4",
    "backends6",
    "rev_nat4",
    "rev_nat6",
    "svc_names",
    "affinity_match",
    "src_ranges4",
    "src_ranges6",
    "services4",
    "services6",
]


def scope_plan(f: Frontend) -> dict[int, tuple[tuple[Backend, ...], int]]:
    """The backend set and flags each scope of `f` should have."""
    affinity = abi.SVC_F_AFFINITY if f.affinity_timeout else 0
    default_flags = affinity
    if f.internal_backends is not None:
        default_flags |= abi.SVC_F_TWO_SCOPES
    if f.empty_drop and not f.backends:
        default_flags |= abi.SVC_F_EMPTY_DROP
    if f.kind != FrontendKind.CLUSTER_IP:
        default_flags |= abi.SVC_F_EXTERNAL  # the tc path serves it for traffic from outside the node
    if f.source_ranges:
        default_flags |= abi.SVC_F_SOURCE_RANGES
    scopes = {abi.SCOPE_DEFAULT: (f.backends, default_flags)}
    if f.internal_backends is not None:
        scopes[abi.SCOPE_INTERNAL] = (f.internal_backends, affinity)
    return scopes


def claim_frontends(
    service: ServiceKey, frontends: Sequence[Frontend], applied: Mapping[Address, AppliedFrontend]
) -> tuple[dict[Address, Frontend], list[str]]:
    """The frontends `service` may have, by address, and a message for each another service holds already (the
    first holder keeps an address; one restored without a name, an orphan, is anyone's)."""
    desired: dict[Address, Frontend] = {}
    conflicts: list[str] = []
    for f in frontends:
        owner = applied.get(f.address)
        if owner is not None and owner.service not in (service, None):
            conflicts.append(f"{f.addr}:{f.port}/{f.protocol} is already served for {owner.service}; not programmed")
            continue
        desired[f.address] = f
    return desired, conflicts
