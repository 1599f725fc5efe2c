"""What sources tell the agent: an object changed, an object went, or "this is now the whole set" (a (re)list);
and what the agent asks of a source (`Source`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

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
    namespace: str = ""  # the object concerned, where there is one (an invalid object): reports go to it
    name: str = ""


Event = Upsert | Delete | Replace | SourceError


@runtime_checkable
class Source(Protocol):
    """A source of events (kpr.k8s.watch.ApiSource, kpr.sources.manifests.ManifestPoller, the tests' fakes): it puts
    Events on the queue it was given, from its own threads."""

    def start(self) -> None:
        """Begin delivering events; may deliver the first ones before it returns."""

    def close(self) -> None:
        """Stop delivering events (the threads end on their own; nothing is joined)."""

    def state(self) -> dict[str, dict[str, Any]]:
        """Per kind, what `kpr status` shows of the source (the API watches); {} when there is nothing to show."""

    def problem(self, stalled_after: float) -> str:
        """Why the source may not be followed any more (a dead or stalled reader), or "" when it is well."""

    def report(self, kind: Kind, namespace: str, name: str, reason: str, message: str) -> None:
        """Tell the object's owners that kpr could not use or program it (the API source: a Warning Event on it,
        aggregated and rate-limited; the manifest source: nothing beyond the agent's log line). Returns at once and
        never raises: the agent calls it from its loop."""
