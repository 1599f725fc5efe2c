"""What sources tell the agent: an object changed, an object went, or "this is now the whole set" (a (re)list)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kpr.model.types import EndpointSliceSpec, NodeInfo, ServiceSpec

Kind = Literal["Service", "EndpointSlice", "Node"]
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")
Object = ServiceSpec | EndpointSliceSpec | NodeInfo


@dataclass(frozen=True, slots=True)
class Upsert:
    kind: Kind
    obj: Object


@dataclass(frozen=True, slots=True)
class Delete:
    kind: Kind
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Replace:
    """The complete current set of one kind; anything the store holds beyond it was deleted."""

    kind: Kind
    objects: tuple[Object, ...]
    keep: frozenset[tuple[str, str]] = frozenset()  # (namespace, name) of invalid objects: keep their last good version


@dataclass(frozen=True, slots=True)
class SourceError:
    """Something a source could not use (an invalid object, a failed list); for logs and metrics."""

    kind: Kind | None
    message: str
    reason: str  # a short metric label: invalid, list_failed, watch_failed ...


Event = Upsert | Delete | Replace | SourceError
