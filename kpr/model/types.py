"""Plain data that flows between the sources, the model and the reconciler.

Kubernetes objects are turned into these frozen dataclasses at the edge (kpr/objects/convert.py); nothing past that edge
sees a kubernetes client model or a raw dict. Addresses are canonical strings (ipaddress' compressed form), ports
are host-order ints, protocols are the Kubernetes names ("TCP", "UDP", "SCTP").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# The Service protocols Kubernetes knows (their IP protocol numbers are the datapath's: kpr.datapath.abi).
PROTOCOLS = ("TCP", "UDP", "SCTP")

# The label by which a Service says that another proxy implementation owns it (kube-proxy ignores such services).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
# The label by which an EndpointSlice names its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, Kubernetes' default for sessionAffinity ClientIP


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" for the single unnamed port
    protocol: str
    port: int
    target_port: int | str = 0  # a number, or the name of a container port (resolved through the slices)
    node_port: int = 0  # 0: none allocated


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    key: ServiceKey
    type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[str, ...] = ()  # spec.clusterIPs; empty for headless ("None") and ExternalName
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip, except ipMode: Proxy
    load_balancer_source_ranges: tuple[str, ...] = ()  # CIDRs, canonical
    affinity_timeout: int = 0  # seconds of sessionAffinity ClientIP; 0 = no affinity
    internal_traffic_policy: str = "Cluster"  # Cluster | Local
    external_traffic_policy: str = "Cluster"  # Cluster | Local
    health_check_node_port: int = 0
    traffic_distribution: str = ""  # "" | PreferClose (or another value, which is ignored)
    headless: bool = False
    proxy_name: str = ""  # the service-proxy-name label; non-empty means another proxy owns the service
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str  # equals the Service port's name ("" for an unnamed port)
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]  # kube-proxy uses only the first one
    ready: bool = True  # conditions.ready; an absent condition means ready
    serving: bool = True  # conditions.serving; absent means serving (kube-proxy: Serving == nil || *Serving)
    terminating: bool = False  # conditions.terminating; absent means false
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] = ()  # hints.forZones[].name
    hint_nodes: tuple[str, ...] = ()  # hints.forNodes[].name


@dataclass(frozen=True, slots=True)
class EndpointSliceSpec:
    namespace: str
    name: str
    service_name: str  # from the kubernetes.io/service-name label; "" when missing (such slices are ignored)
    address_type: str  # IPv4 | IPv6 | FQDN
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    trigger_time: float | None = None  # endpoints.kubernetes.io/last-change-trigger-time, seconds since the epoch
    resource_version: str = ""

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The facts about the agent's own node that translation needs."""

    name: str
    zone: str = ""  # the topology.kubernetes.io/zone label
    primary_ips: tuple[str, ...] = ()  # the node IP of each family (kube-proxy's nodeIPs): first InternalIP, else
    # first ExternalIP of the Node object
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    being_deleted: bool = False  # metadata.deletionTimestamp is set
    taints: tuple[str, ...] = ()  # spec.taints[].key

    def translation_facts(self) -> tuple[str, str, tuple[str, ...]]:
        """What translate() reads of the node: a change elsewhere (taints, deletion) re-programs nothing."""
        return (self.name, self.zone, self.primary_ips)


class BackendState(StrEnum):
    """What an endpoint's conditions allow, as kube-proxy reads them (pkg/proxy/endpointslicecache.go).

    Which backends new flows may pick is decided per frontend (its slots); the state says what happens to flows that
    are already on a backend: kube-proxy never deletes TCP conntrack entries, and deletes UDP ones only for endpoints
    that stop serving or leave.
    """

    ACTIVE = "active"  # ready
    TERMINATING = "terminating"  # serving but not ready (terminating): its flows stay, new ones avoid it
    NOT_SERVING = "not-serving"  # neither ready nor serving: its TCP flows stay, its UDP flows move


class FrontendKind(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One endpoint address:port as the datapath sees it. Identity is (addr, port, protocol)."""

    addr: str
    port: int
    protocol: str
    node_local: bool = False
    state: BackendState = BackendState.ACTIVE

    @property
    def identity(self) -> tuple[str, int, str]:
        return (self.addr, self.port, self.protocol)


@dataclass(frozen=True, slots=True)
class Frontend:
    """An address:port/protocol that kpr answers for, with the backends new flows may be sent to.

    `backends` is the set every lookup starts from. `internal_backends` is the set for traffic that starts inside the
    cluster (pods, the node itself) when it differs from `backends`: externalTrafficPolicy=Local keeps node-local
    backends for external clients but all backends for in-cluster clients, as kube-proxy does. `empty_drop` says what
    to do when `backends` is empty: True means drop (a Local policy with endpoints elsewhere only), False means reject
    (the service has no usable endpoint at all). `standby` holds the service's other endpoints (not ready,
    terminating, another node's under a Local policy, another zone's under topology hints): new flows never pick them,
    but flows already on them keep them.
    """

    service: ServiceKey
    port_name: str
    kind: FrontendKind
    addr: str
    port: int
    protocol: str
    backends: tuple[Backend, ...]
    internal_backends: tuple[Backend, ...] | None = None
    empty_drop: bool = False
    affinity_timeout: int = 0
    source_ranges: tuple[str, ...] = ()  # LoadBalancer frontends only; empty: every source allowed
    standby: tuple[Backend, ...] = ()

    @property
    def address(self) -> tuple[str, int, str]:
        return (self.addr, self.port, self.protocol)

    @property
    def family(self) -> int:
        return 6 if ":" in self.addr else 4
