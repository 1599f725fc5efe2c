"""Service + its EndpointSlices + the node's facts → the frontends this node answers for. Pure: no I/O.

kube-proxy is the reference; each piece names the kube-proxy function it mirrors:
- which services are proxied at all: pkg/proxy/util ShouldSkipService + the service-proxy-name label filter;
- per family addresses: pkg/proxy/serviceport.go newBaseServiceInfo (externalIPs, LB ingress, source ranges are
  filtered by the IP family of the proxier, and a family exists only where the service has a cluster IP);
- merging slices: pkg/proxy/endpointslicecache.go endpointInfoByServicePort / addEndpoints;
- which endpoints are usable: pkg/proxy/topology.go CategorizeEndpoints / topologyModeFromHints /
  availableForTopology;
- REJECT versus DROP when a frontend has no usable endpoint: the iptables/nftables proxiers' syncProxyRules
  (no endpoint anywhere → REJECT; endpoints only elsewhere → DROP);
- what happens to flows already on an endpoint (the backend state): pkg/proxy/conntrack/cleanup.go (UDP entries go
  when their endpoint stops serving; TCP entries are never deleted);
- healthCheckNodePort's count: pkg/proxy/endpoints.go EndpointsMap.LocalReadyEndpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import ip_address, ip_network
from socket import AF_INET, AF_INET6, inet_pton
from typing import NamedTuple

from kpr.model.nodeports import WILDCARD
from kpr.model.types import (
    Backend,
    BackendState,
    Endpoint,
    EndpointSliceSpec,
    Frontend,
    FrontendKind,
    NodeInfo,
    ServicePort,
    ServiceSpec,
)

__all__ = [
    "Candidate",
    "Categories",
    "available_for_topology",
    "categorize_endpoints",
    "external_policy_local",
    "frontends_by_address",
    "internal_policy_local",
    "is_proxied",
    "local_ready_endpoints",
    "merge_endpoints",
    "needs_health_check",
    "node_eligible",
    "topology_mode_from_hints",
    "translate",
]

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"
_FAMILIES = ("IPv4", "IPv6")


class Candidate(NamedTuple):
    """One endpoint of one service port after merging the slices: kube-proxy's BaseEndpointInfo."""

    addr: str  # the endpoint's addresses[0]
    port: int
    endpoint: Endpoint
    is_local: bool  # endpoint.node_name is this node

    @property
    def ready(self) -> bool:
        return self.endpoint.ready

    @property
    def serving_terminating(self) -> bool:
        return self.endpoint.serving and self.endpoint.terminating


class Categories(NamedTuple):
    """kube-proxy CategorizeEndpoints' results (allReachableEndpoints is not needed here)."""

    cluster: tuple[Candidate, ...]
    local: tuple[Candidate, ...]
    has_any: bool


# --- which services, which addresses -------------------------------------------------------------------------------


def _family(addr: str) -> str:
    return "IPv6" if ":" in addr else "IPv4"


def is_proxied(service: ServiceSpec) -> bool:
    """Mirrors proxyutil.ShouldSkipService (negated) and kube-proxy's service-proxy-name label selector."""
    return not (service.headless or service.type == "ExternalName" or service.proxy_name or not service.cluster_ips)


def external_policy_local(service: ServiceSpec) -> bool:
    """Mirrors apiservice.ExternalPolicyLocal: ETP only counts for externally accessible services."""
    accessible = service.type in ("NodePort", "LoadBalancer") or (
        service.type == "ClusterIP" and bool(service.external_ips)
    )
    return accessible and service.external_traffic_policy == "Local"


def internal_policy_local(service: ServiceSpec) -> bool:
    """Mirrors apiservice.InternalPolicyLocal."""
    return service.internal_traffic_policy == "Local"


def _service_families(service: ServiceSpec) -> list[str]:
    """The IP families kpr proxies the service in: those of its cluster IPs (one kube-proxy proxier each)."""
    return [family for family in _FAMILIES if any(_family(ip) == family for ip in service.cluster_ips)]


def _service_slices(service: ServiceSpec, slices: Iterable[EndpointSliceSpec]) -> dict[str, list[EndpointSliceSpec]]:
    """The service's IPv4 and IPv6 slices, each list in slice-name order (FQDN slices and other services' dropped)."""
    by_family: dict[str, list[EndpointSliceSpec]] = {family: [] for family in _FAMILIES}
    for es in slices:
        if (
            es.service_name == service.key.name
            and es.namespace == service.key.namespace
            and es.address_type in by_family
        ):
            by_family[es.address_type].append(es)
    for family_slices in by_family.values():
        family_slices.sort(key=lambda es: es.name)
    return by_family


# --- merging slices ------------------------------------------------------------------------------------------------


def merge_endpoints(
    slices: Sequence[EndpointSliceSpec], port: ServicePort, family: str, node_name: str
) -> list[Candidate]:
    """The endpoints of one service port and family, merged from every slice and de-duplicated by (addr, port).

    Mirrors EndpointSliceCache.endpointInfoByServicePort + addEndpoints: a slice port counts for the service port
    whose name and protocol it carries (this is how a named targetPort is resolved); only addresses[0] is used; an
    address of the wrong family is ignored. On a duplicate address:port a ready endpoint wins over a not-ready one,
    otherwise the first seen (slices in name order) wins. kube-proxy keeps the first copy in map-iteration order
    unless a later one is local, which is not a stable order to copy; ours is.
    """
    merged: dict[tuple[str, int], Candidate] = {}
    v6 = family == "IPv6"
    for es in slices:
        for ep_port in es.ports:
            if ep_port.name != port.name or ep_port.protocol != port.protocol:
                continue
            for ep in es.endpoints:
                if not ep.addresses or (":" in ep.addresses[0]) != v6:
                    continue
                key = (ep.addresses[0], ep_port.port)
                seen = merged.get(key)
                if seen is None or (ep.ready and not seen.endpoint.ready):
                    merged[key] = Candidate(key[0], key[1], ep, bool(node_name) and ep.node_name == node_name)
    return list(merged.values())


# --- which endpoints are usable ------------------------------------------------------------------------------------


def topology_mode_from_hints(candidates: Sequence[Candidate], node: NodeInfo) -> str:
    """Mirrors topology.go topologyModeFromHints (with the PreferSameTrafficDistribution gate on).

    PreferSameNode when every ready endpoint has a node hint and one is hinted for this node; else PreferSameZone
    when every ready endpoint has a zone hint and one is hinted for this node's zone (a node without a zone label
    never matches); else "" (no topology filtering). Newer kube-proxy reads only the hints, not the Service's
    trafficDistribution or topology-mode annotation: the EndpointSlice controller sets hints only when asked to.
    """
    ready = [c.endpoint for c in candidates if c.endpoint.ready]
    if not ready:
        return ""
    if node.name and all(ep.hint_nodes for ep in ready) and any(node.name in ep.hint_nodes for ep in ready):
        return PREFER_SAME_NODE
    if node.zone and all(ep.hint_zones for ep in ready) and any(node.zone in ep.hint_zones for ep in ready):
        return PREFER_SAME_ZONE
    return ""


def available_for_topology(candidate: Candidate, mode: str, node: NodeInfo) -> bool:
    """Mirrors topology.go availableForTopology."""
    if mode == PREFER_SAME_NODE:
        return node.name in candidate.endpoint.hint_nodes
    if mode == PREFER_SAME_ZONE:
        return node.zone in candidate.endpoint.hint_zones
    return True


def categorize_endpoints(candidates: Sequence[Candidate], node: NodeInfo) -> Categories:
    """Mirrors topology.go CategorizeEndpoints.

    cluster: ready endpoints, topology-filtered; if none, serving-and-terminating ones (topology not applied to the
    fallback). local: ready local endpoints; if none, serving-and-terminating local ones (never topology-filtered).
    has_any: some endpoint anywhere is ready or serving-and-terminating.
    """
    mode = topology_mode_from_hints(candidates, node)
    if mode:
        cluster = tuple(c for c in candidates if c.endpoint.ready and available_for_topology(c, mode, node))
    else:
        cluster = tuple(c for c in candidates if c.endpoint.ready)
    if not cluster:
        cluster = tuple(c for c in candidates if c.serving_terminating)
    local = tuple(c for c in candidates if c.is_local and c.endpoint.ready)
    if not local:
        local = tuple(c for c in candidates if c.is_local and c.serving_terminating)
    # Some endpoint is ready or serving-and-terminating: the cluster set holds one, or topology left out a ready one.
    has_any = bool(cluster) or any(c.endpoint.ready for c in candidates)
    return Categories(cluster, local, has_any)


def backend_state(endpoint: Endpoint) -> BackendState:
    """Ready, else serving (terminating), else neither: what kube-proxy's IsReady / IsServing say of it."""
    if endpoint.ready:
        return BackendState.ACTIVE
    return BackendState.TERMINATING if endpoint.serving else BackendState.NOT_SERVING


def _backends(candidates: Iterable[Candidate], protocol: str) -> tuple[Backend, ...]:
    backends = [
        Backend(c.addr, c.port, protocol, node_local=c.is_local, state=backend_state(c.endpoint)) for c in candidates
    ]
    backends.sort(key=_backend_order)
    return tuple(backends)


def _subset(known: tuple[Backend, ...], chosen: Sequence[Candidate], candidates: int) -> tuple[Backend, ...]:
    """The backends of the `chosen` candidates, taken from `known` (the backends of every candidate, in order)."""
    if len(chosen) == candidates:  # every candidate (the categories never repeat one): the very same tuple
        return known
    wanted = {(c.addr, c.port) for c in chosen}
    return tuple(b for b in known if (b.addr, b.port) in wanted)


def _addr_order(addr: str) -> tuple[int, bytes]:
    """Numeric address order, IPv4 before IPv6 (inet_pton: many times faster than ipaddress)."""
    return (6, inet_pton(AF_INET6, addr)) if ":" in addr else (4, inet_pton(AF_INET, addr))


def _backend_order(backend: Backend) -> tuple[tuple[int, bytes], int, str]:
    return (_addr_order(backend.addr), backend.port, backend.protocol)


# --- frontends -----------------------------------------------------------------------------------------------------


def _family_frontends(
    service: ServiceSpec,
    port: ServicePort,
    family: str,
    candidates: Sequence[Candidate],
    cats: Categories,
    node: NodeInfo,
) -> list[Frontend]:
    """The frontends of one service port in one IP family (kube-proxy's per-family proxier's syncProxyRules)."""
    # One Backend per endpoint, in backend order; the categories are subsets of it (often all of it: one object).
    known = _backends(candidates, port.protocol)
    cluster = _subset(known, cats.cluster, len(candidates))
    local = _subset(known, cats.local, len(candidates))

    # ClusterIP: the internal traffic policy picks the set (kube-proxy's internalPolicyChain).
    internal = local if internal_policy_local(service) else cluster
    # NodePort / externalIPs / LoadBalancer: the external traffic policy picks the set (externalPolicyChain); with
    # Local, pods and the node itself are short-circuited to the cluster set (the iptables proxier sends
    # "pod traffic for external destinations" and --src-type LOCAL to the cluster policy chain).
    etp_local = external_policy_local(service)
    external = local if etp_local else cluster
    external_internal = cluster if etp_local and cluster != local else None

    def frontend(
        kind: FrontendKind,
        addr: str,
        number: int,
        backends: tuple[Backend, ...],
        internal_backends: tuple[Backend, ...] | None = None,
        source_ranges: tuple[str, ...] = (),
    ) -> Frontend:
        # Every other endpoint of the port stays known, so the flows it already carries keep it.
        if backends is known or internal_backends is known:
            standby: tuple[Backend, ...] = ()
        else:
            in_slots = {b.identity for b in backends} | {b.identity for b in internal_backends or ()}
            standby = tuple(b for b in known if b.identity not in in_slots)
        return Frontend(
            service=service.key,
            port_name=port.name,
            kind=kind,
            addr=addr,
            port=number,
            protocol=port.protocol,
            backends=backends,
            internal_backends=internal_backends,
            # kube-proxy: no usable endpoint anywhere → REJECT; usable endpoints, none for this policy → DROP.
            empty_drop=not backends and cats.has_any,
            affinity_timeout=service.affinity_timeout,
            source_ranges=source_ranges,
            standby=standby,
        )

    out = [
        frontend(FrontendKind.CLUSTER_IP, ip, port.port, internal)
        for ip in service.cluster_ips
        if _family(ip) == family
    ]
    out += [
        frontend(FrontendKind.EXTERNAL_IP, ip, port.port, external, internal_backends=external_internal)
        for ip in service.external_ips
        if _family(ip) == family
    ]
    if service.type == "LoadBalancer":
        ranges = _firewall_sources(service, family, node)
        out += [
            frontend(
                FrontendKind.LOAD_BALANCER,
                ip,
                port.port,
                external,
                internal_backends=external_internal,
                source_ranges=ranges,
            )
            for ip in service.load_balancer_ips
            if _family(ip) == family
        ]
    if service.type in ("NodePort", "LoadBalancer") and port.node_port:
        # One frontend at the family's wildcard address: the datapath serves it on every node address NodePorts
        # answer on (nodeport_addrs4/6, kept by the agent from --nodeport-addresses and the node's addresses).
        wildcard = WILDCARD[6 if family == "IPv6" else 4]
        out.append(
            frontend(FrontendKind.NODE_PORT, wildcard, port.node_port, external, internal_backends=external_internal)
        )
    return out


def _firewall_sources(service: ServiceSpec, family: str, node: NodeInfo) -> tuple[str, ...]:
    """The sources loadBalancerSourceRanges allows, as kube-proxy's firewall chain (iptables and nftables proxiers'
    syncProxyRules): the ranges of the family; and when one contains the node's IP, the LoadBalancer IPs themselves
    (a VIP-style load balancer whose IP is local to the node loops the node's own requests back from that IP)."""
    ranges = tuple(cidr for cidr in service.load_balancer_source_ranges if _family(cidr) == family)
    primary = next((ip for ip in node.primary_ips if _family(ip) == family), None)
    host = 32 if family == "IPv4" else 128
    if primary and any(ip_address(primary) in ip_network(cidr) for cidr in ranges):
        ranges += tuple(f"{ip}/{host}" for ip in service.load_balancer_ips if _family(ip) == family)
    return ranges


def _frontend_order(fe: Frontend) -> tuple[tuple[int, bytes], int, str]:
    return (_addr_order(fe.addr), fe.port, fe.protocol)


def translate(service: ServiceSpec, slices: Iterable[EndpointSliceSpec], node: NodeInfo) -> list[Frontend]:
    """Every frontend of `service` on `node`, each with its backends and flags, sorted by (family, addr, port, proto).

    `slices` may hold any slices (other services', FQDN ones): only this service's IPv4/IPv6 slices count. When two
    frontends of the service share an address:port/protocol (an externalIP that is also a LoadBalancer IP, say), the
    first one made wins, in the order ClusterIP, ExternalIP, LoadBalancer, NodePort.
    """
    if not is_proxied(service):
        return []
    slices_by_family = _service_slices(service, slices)
    frontends: dict[tuple[str, int, str], Frontend] = {}
    for port in service.ports:
        for family in _service_families(service):
            candidates = merge_endpoints(slices_by_family[family], port, family, node.name)
            cats = categorize_endpoints(candidates, node)
            for fe in _family_frontends(service, port, family, candidates, cats, node):
                frontends.setdefault(fe.address, fe)
    return sorted(frontends.values(), key=_frontend_order)


def needs_health_check(service: ServiceSpec) -> bool:
    """Mirrors apiservice.NeedsHealthCheck: a LoadBalancer with externalTrafficPolicy=Local (and its allocated port).

    It holds whether or not this node programs any frontend of the service (allocateLoadBalancerNodePorts: false, an
    ingress not assigned yet, ipMode: Proxy): the load balancer probes every node all the same.
    """
    return (
        is_proxied(service)
        and service.type == "LoadBalancer"
        and external_policy_local(service)
        and bool(service.health_check_node_port)
    )


def local_ready_endpoints(service: ServiceSpec, slices: Iterable[EndpointSliceSpec], node: NodeInfo) -> dict[str, int]:
    """healthCheckNodePort's localEndpoints per IP family of the service: mirrors EndpointsMap.LocalReadyEndpoints.

    The distinct addresses of ready endpoints on this node, over every service port (kube-proxy squashes by IP: a pod
    serving two ports is one endpoint). Terminating and not-ready ones never count, so a node whose last local
    endpoint terminates answers 503 and the load balancer drains it. kube-proxy runs one proxier, with its own health
    server, per IP family: a probe over IPv4 reports the IPv4 endpoints, one over IPv6 the IPv6 ones.
    """
    slices_by_family = _service_slices(service, slices)
    counts = {}
    for family in _service_families(service):
        addresses = {
            c.addr
            for port in service.ports
            for c in merge_endpoints(slices_by_family[family], port, family, node.name)
            if c.is_local and c.ready
        }
        counts[family] = len(addresses)
    return counts


TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_eligible(node: NodeInfo) -> bool:
    """Mirrors ProxyHealthServer.NodeEligible: a node being deleted, or that the cluster autoscaler is about to delete,
    fails /healthz so load balancers stop sending it new connections. A node kpr has no Node object for (the manifests
    source without one) counts as eligible; kube-proxy always has one."""
    return not node.being_deleted and TO_BE_DELETED_TAINT not in node.taints


def frontends_by_address(frontends: Iterable[Frontend]) -> dict[tuple[str, int, str], Frontend]:
    """Index frontends by (addr, port, protocol); the first one wins when two services claim the same address."""
    index: dict[tuple[str, int, str], Frontend] = {}
    for fe in frontends:
        index.setdefault(fe.address, fe)
    return index
