"""The agent's view of the cluster: Services, EndpointSlices and its Node, and which services a change touches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kpr.model.types import EndpointSliceSpec, NodeInfo, ServiceKey, ServiceSpec

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
        """A node change (zone, addresses) can change every service's frontends."""
        if node == self.node:
            return set()
        self.node = node
        return set(self.services)

    def replace_all(
        self, services: Iterable[ServiceSpec], slices: Iterable[EndpointSliceSpec], node: NodeInfo | None
    ) -> set[ServiceKey]:
        """Make the store hold exactly these objects (a relist); returns every service whose inputs changed."""
        touched: set[ServiceKey] = set()
        if node is not None:
            touched |= self.set_node(node)
        new_services = {s.key: s for s in services}
        for service_key in set(self.services) - set(new_services):
            touched |= self.delete_service(service_key)
        for service in new_services.values():
            touched |= self.upsert_service(service)
        new_slices = {(s.namespace, s.name): s for s in slices}
        for slice_key in set(self.slices) - set(new_slices):
            touched |= self.delete_slice(slice_key)
        for endpoint_slice in new_slices.values():
            touched |= self.upsert_slice(endpoint_slice)
        return touched
