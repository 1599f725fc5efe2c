"""The agent's view of the cluster: Services, EndpointSlices and its Node, and which services a change touches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kpr.model.types import EndpointSliceSpec, NodeInfo, ServiceKey, ServiceSpec
from kpr.objects.events import Delete, Replace, Upsert

SliceKey = tuple[str, str]  # (namespace, name)


@dataclass
class Store:
    node: NodeInfo
    services: dict[ServiceKey, ServiceSpec] = field(default_factory=dict)
    slices: dict[SliceKey, EndpointSliceSpec] = field(default_factory=dict)
    slices_by_service: dict[ServiceKey, set[SliceKey]] = field(default_factory=dict)

    def slices_of(self, service: ServiceKey) -> list[EndpointSliceSpec]:
        return [self.slices[k] for k in sorted(self.slices_by_service.get(service, ()))]

    def upsert_service(self, spec: ServiceSpec) -> set[ServiceKey]:
        if self.services.get(spec.key) == spec:
            return set()
        self.services[spec.key] = spec
        return {spec.key}

    def delete_service(self, key: ServiceKey) -> set[ServiceKey]:
        return {key} if self.services.pop(key, None) is not None else set()

    def upsert_slice(self, spec: EndpointSliceSpec) -> set[ServiceKey]:
        key = (spec.namespace, spec.name)
        old = self.slices.get(key)
        if old == spec:
            return set()
        touched = self._unindex(key, old)
        self.slices[key] = spec
        if spec.service_name:
            self.slices_by_service.setdefault(spec.service_key, set()).add(key)
            touched.add(spec.service_key)
        return touched

    def delete_slice(self, key: SliceKey) -> set[ServiceKey]:
        old = self.slices.pop(key, None)
        return self._unindex(key, old)

    def _unindex(self, key: SliceKey, old: EndpointSliceSpec | None) -> set[ServiceKey]:
        if old is None or not old.service_name:
            return set()
        members = self.slices_by_service.get(old.service_key)
        if members is not None:
            members.discard(key)
            if not members:
                del self.slices_by_service[old.service_key]
        return {old.service_key}

    def set_node(self, node: NodeInfo) -> set[ServiceKey]:
        """A node change (zone, addresses) can change every service's frontends; its health facts change none."""
        old, self.node = self.node, node
        return set() if old.translation_facts() == node.translation_facts() else set(self.services)

    def replace_services(
        self, services: Iterable[ServiceSpec], keep: frozenset[tuple[str, str]] = frozenset()
    ) -> set[ServiceKey]:
        """Make the store hold exactly these Services (a relist), except that `keep` (invalid now) keep their last
        good version; returns the services that changed."""
        touched: set[ServiceKey] = set()
        new = {s.key: s for s in services}
        for key in set(self.services) - set(new) - {ServiceKey(ns, name) for ns, name in keep}:
            touched |= self.delete_service(key)
        for spec in new.values():
            touched |= self.upsert_service(spec)
        return touched

    def replace_slices(
        self, slices: Iterable[EndpointSliceSpec], keep: frozenset[tuple[str, str]] = frozenset()
    ) -> set[ServiceKey]:
        """Make the store hold exactly these EndpointSlices, `keep` aside; returns the services that changed."""
        touched: set[ServiceKey] = set()
        new = {(s.namespace, s.name): s for s in slices}
        for key in set(self.slices) - set(new) - keep:
            touched |= self.delete_slice(key)
        for spec in new.values():
            touched |= self.upsert_slice(spec)
        return touched

    def apply(self, event: Upsert | Delete | Replace) -> set[ServiceKey]:
        """Apply one source event; returns the services whose inputs changed."""
        if isinstance(event, Replace):
            if event.kind == "Service":
                return self.replace_services((o for o in event.objects if isinstance(o, ServiceSpec)), event.keep)
            if event.kind == "EndpointSlice":
                return self.replace_slices((o for o in event.objects if isinstance(o, EndpointSliceSpec)), event.keep)
            nodes = [o for o in event.objects if isinstance(o, NodeInfo) and o.name == self.node.name]
            return self.set_node(nodes[0] if nodes else NodeInfo(self.node.name))
        if isinstance(event, Upsert):
            obj = event.obj
            if isinstance(obj, ServiceSpec):
                return self.upsert_service(obj)
            if isinstance(obj, EndpointSliceSpec):
                return self.upsert_slice(obj)
            return self.set_node(obj) if obj.name == self.node.name else set()
        if event.kind == "Service":
            return self.delete_service(ServiceKey(event.namespace, event.name))
        if event.kind == "EndpointSlice":
            return self.delete_slice((event.namespace, event.name))
        return self.set_node(NodeInfo(self.node.name)) if event.name == self.node.name else set()
