"""Raw Kubernetes objects (dicts from YAML or the API's JSON, camelCase keys) → the plain dataclasses of kpr.model.

Tolerant of what may be absent (missing keys, explicit nulls), strict on what would program something wrong: an
impossible port, an address that is not an IP, an unknown protocol or policy raise `InvalidObject`, whose message
names the object and the field ("Service default/web: spec.ports[1].port 70000 is out of range 1-65535").

Plain dict access only: this runs over the raw JSON of a full list (10k+ objects), so no kubernetes client models.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Any

from kpr.model.types import (
    DEFAULT_AFFINITY_TIMEOUT,
    PROTOCOLS,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    ZONE_LABEL,
    Endpoint,
    EndpointPort,
    EndpointSliceSpec,
    NodeInfo,
    ServiceKey,
    ServicePort,
    ServiceSpec,
)

__all__ = [
    "TRIGGER_TIME_ANNOTATION",
    "InvalidObject",
    "canonical_ip",
    "endpoint_slice_from_dict",
    "gc_paused",
    "node_from_dict",
    "object_kind",
    "parse_cidrs",
    "parse_trigger_time",
    "service_from_dict",
]

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
TRAFFIC_POLICIES = ("Cluster", "Local")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")
MAX_AFFINITY_TIMEOUT = 86400  # Kubernetes' MaxClientIPServiceAffinitySeconds
_NODE_IP_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
_EMPTY: Mapping[str, Any] = {}
_SLOPPY_IPV4 = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside, for converting or programming a full list (reference counting still
    frees everything; the objects made are plain data, in no cycle). Each collection pass scans every tracked object,
    and making hundreds of thousands of new ones triggers pass after pass over all of them: a third of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class InvalidObject(ValueError):
    """A Kubernetes object kpr refuses to program; the message names the object and the field."""


# --- small readers -------------------------------------------------------------------------------------------------


def _map(value: Any) -> Mapping[str, Any]:
    """A mapping, or an empty one for None / anything absent (dict first: the abc check is slow)."""
    return value if isinstance(value, dict | Mapping) else _EMPTY


def _seq(value: Any) -> Sequence[Any]:
    """A list, or an empty one for None / anything absent."""
    return value if isinstance(value, list | tuple) else ()


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _label(kind: str, meta: Mapping[str, Any], namespaced: bool = True) -> str:
    name = _str(meta.get("name")) or "<unnamed>"
    if not namespaced:
        return f"{kind} {name}"
    return f"{kind} {_str(meta.get('namespace')) or 'default'}/{name}"


# The forms the API server lets names take (it checks stricter ones per kind: a Service's name is a DNS-1035 label):
# a manifest may hold any text, and a name that is not one of these is refused rather than written into svc_names.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _dns_name(obj: str, path: str, value: str, label: bool = False) -> str:
    """`value` if it is a DNS-1123 label (63 characters at most) or subdomain (253), else InvalidObject."""
    pattern, limit = (_DNS1123_LABEL, 63) if label else (_DNS1123_SUBDOMAIN, 253)
    if len(value) > limit or not pattern.fullmatch(value):
        kind = "label" if label else "subdomain"
        raise InvalidObject(f"{obj}: {path} {value!r} is not a DNS-1123 {kind} (lowercase letters, digits, '-')")
    return value


def _object_name(obj: str, meta: Mapping[str, Any]) -> str:
    """metadata.name: present, and a DNS-1123 subdomain."""
    name = _str(meta.get("name"))
    if not name:
        raise InvalidObject(f"{obj}: metadata.name is missing")
    return _dns_name(obj, "metadata.name", name)


def _port_name(obj: str, path: str, value: Any) -> str:
    """A port's name: empty, or a DNS-1123 label."""
    name = _str(value)
    return _dns_name(obj, path, name, label=True) if name else ""


def _int(obj: str, path: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(f"{obj}: {path} {value!r} is not an integer")
    if not low <= value <= high:
        raise InvalidObject(f"{obj}: {path} {value} is out of range {low}-{high}")
    return value


def _optional_port(obj: str, path: str, value: Any) -> int:
    """nodePort / healthCheckNodePort: None or 0 means none allocated."""
    if value is None or value == 0:
        return 0
    return _int(obj, path, value, 1, 65535)


def _protocol(obj: str, path: str, value: Any) -> str:
    if value is None or value == "":
        return "TCP"
    if value not in PROTOCOLS:
        raise InvalidObject(f"{obj}: {path} {value!r} is not one of TCP, UDP, SCTP")
    return str(value)


def _one_of(obj: str, path: str, value: Any, allowed: tuple[str, ...], default: str) -> str:
    if value is None or value == "":
        return default
    if value not in allowed:
        raise InvalidObject(f"{obj}: {path} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def canonical_ip(value: Any) -> str | None:
    """The canonical (ipaddress' compressed) form of an IP address string, or None when it is not one.

    inet_pton/inet_ntop are the fast path (a few hundred thousand endpoints go through here on a full list); they
    agree with ipaddress except for dotted IPv6 forms (::ffff:1.2.3.4), which take the slow path.
    """
    if not isinstance(value, str):
        return None
    try:
        if ":" in value:
            text = inet_ntop(AF_INET6, inet_pton(AF_INET6, value))
            if "." not in text:
                return text
        else:
            inet_pton(AF_INET, value)  # strict dotted quad, no leading zeros: already canonical
            return value
    except OSError:
        pass
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        # Kubernetes parses legacy IPv4 with leading zeros as decimal (netutils.ParseIPSloppy); so do we.
        if _SLOPPY_IPV4.match(value) and all(int(octet) < 256 for octet in value.split(".")):
            return ".".join(str(int(octet)) for octet in value.split("."))
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        return None  # a zone index ("fe80::1%eth0") is no address a Service can use
    return str(addr)


def _ip(obj: str, path: str, value: Any) -> str:
    """canonical_ip, or InvalidObject naming the field."""
    ip = canonical_ip(value)
    if ip is None:
        raise InvalidObject(f"{obj}: {path} {value!r} is not a valid IP address")
    return ip


def _family_of(addr: str) -> str:
    return "IPv6" if ":" in addr else "IPv4"


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_cidrs(values: Iterable[str], obj: str = "configuration", path: str = "CIDRs") -> tuple[str, ...]:
    """Canonical CIDR strings (host bits cleared, as net.ParseCIDR does), de-duplicated, in order."""
    out: list[str] = []
    for i, value in enumerate(values):
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except (ValueError, AttributeError, TypeError):
            raise InvalidObject(f"{obj}: {path}[{i}] {value!r} is not a valid CIDR") from None
    return _unique(out)


# --- kind ----------------------------------------------------------------------------------------------------------


def object_kind(d: Mapping[str, Any]) -> str:
    """The object's kind: its `kind` field, or guessed from its shape for list items (which carry no kind).

    Returns "" when it cannot tell.
    """
    kind = d.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    if "addressType" in d:
        return "EndpointSlice"
    spec = _map(d.get("spec"))
    status = _map(d.get("status"))
    if "addresses" in status or "nodeInfo" in status or "podCIDR" in spec or "podCIDRs" in spec:
        return "Node"
    if any(k in spec for k in ("clusterIP", "clusterIPs", "ports", "type", "externalName", "selector")):
        return "Service"
    return ""


# --- Service -------------------------------------------------------------------------------------------------------


def service_from_dict(d: Mapping[str, Any]) -> ServiceSpec:
    """A v1 Service as kpr sees it (see ServiceSpec). Raises InvalidObject."""
    meta = _map(d.get("metadata"))
    spec = _map(d.get("spec"))
    status = _map(d.get("status"))
    labels = _map(meta.get("labels"))
    obj = _label("Service", meta)
    name = _object_name(obj, meta)
    namespace = _dns_name(obj, "metadata.namespace", _str(meta.get("namespace")) or "default", label=True)

    svc_type = _one_of(obj, "spec.type", spec.get("type"), SERVICE_TYPES, "ClusterIP")
    cluster_ips, headless = _cluster_ips(obj, spec, svc_type)
    return ServiceSpec(
        key=ServiceKey(namespace, name),
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=_service_ports(obj, spec),
        external_ips=_unique(
            _ip(obj, f"spec.externalIPs[{i}]", ip) for i, ip in enumerate(_seq(spec.get("externalIPs")))
        ),
        load_balancer_ips=_load_balancer_ips(obj, status),
        load_balancer_source_ranges=parse_cidrs(
            _seq(spec.get("loadBalancerSourceRanges")), obj, "spec.loadBalancerSourceRanges"
        ),
        affinity_timeout=_affinity_timeout(obj, spec),
        internal_traffic_policy=_one_of(
            obj, "spec.internalTrafficPolicy", spec.get("internalTrafficPolicy"), TRAFFIC_POLICIES, "Cluster"
        ),
        external_traffic_policy=_one_of(
            obj, "spec.externalTrafficPolicy", spec.get("externalTrafficPolicy"), TRAFFIC_POLICIES, "Cluster"
        ),
        health_check_node_port=_optional_port(obj, "spec.healthCheckNodePort", spec.get("healthCheckNodePort")),
        traffic_distribution=_str(spec.get("trafficDistribution")),
        headless=headless,
        proxy_name=_str(labels.get(SERVICE_PROXY_NAME_LABEL)),
        resource_version=_str(meta.get("resourceVersion")),
    )


def _cluster_ips(obj: str, spec: Mapping[str, Any], svc_type: str) -> tuple[tuple[str, ...], bool]:
    """spec.clusterIPs (or the older spec.clusterIP): ("None" → headless, "" → none allocated)."""
    if svc_type == "ExternalName":
        return (), False
    raw = _seq(spec.get("clusterIPs"))
    paths = [f"spec.clusterIPs[{i}]" for i in range(len(raw))]
    if not raw:
        single = spec.get("clusterIP")
        raw = [single] if single else []
        paths = ["spec.clusterIP"]
    if not raw or not raw[0]:
        return (), False
    if raw[0] == "None":
        return (), True
    ips: list[str] = []
    for path, value in zip(paths, raw, strict=True):
        ip = _ip(obj, path, value)
        if any(_family_of(other) == _family_of(ip) for other in ips):
            raise InvalidObject(f"{obj}: {path} {ip} is a second {_family_of(ip)} cluster IP (after {ips[0]})")
        ips.append(ip)
    return tuple(ips), False


def _service_ports(obj: str, spec: Mapping[str, Any]) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    for i, raw in enumerate(_seq(spec.get("ports"))):
        p = _map(raw)
        path = f"spec.ports[{i}]"
        port = _int(obj, f"{path}.port", p.get("port"), 1, 65535)
        target: int | str = port
        raw_target = p.get("targetPort")
        if isinstance(raw_target, str) and raw_target:
            target = raw_target
        elif raw_target is not None and raw_target != 0:
            target = _int(obj, f"{path}.targetPort", raw_target, 1, 65535)
        ports.append(
            ServicePort(
                name=_port_name(obj, f"{path}.name", p.get("name")),
                protocol=_protocol(obj, f"{path}.protocol", p.get("protocol")),
                port=port,
                target_port=target,
                node_port=_optional_port(obj, f"{path}.nodePort", p.get("nodePort")),
            )
        )
    return tuple(ports)


def _load_balancer_ips(obj: str, status: Mapping[str, Any]) -> tuple[str, ...]:
    """status.loadBalancer.ingress[].ip, skipping ipMode Proxy (kube-proxy's proxyutil.IsVIPMode)."""
    ips: list[str] = []
    for i, raw in enumerate(_seq(_map(status.get("loadBalancer")).get("ingress"))):
        ing = _map(raw)
        ip = ing.get("ip")
        if not ip or ing.get("ipMode") == "Proxy":
            continue
        ips.append(_ip(obj, f"status.loadBalancer.ingress[{i}].ip", ip))
    return _unique(ips)


def _affinity_timeout(obj: str, spec: Mapping[str, Any]) -> int:
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = _map(_map(spec.get("sessionAffinityConfig")).get("clientIP")).get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return _int(obj, path, timeout, 1, MAX_AFFINITY_TIMEOUT)


# --- EndpointSlice -------------------------------------------------------------------------------------------------


def endpoint_slice_from_dict(d: Mapping[str, Any]) -> EndpointSliceSpec:
    """A discovery.k8s.io/v1 EndpointSlice as kpr sees it (see EndpointSliceSpec). Raises InvalidObject."""
    meta = _map(d.get("metadata"))
    labels = _map(meta.get("labels"))
    annotations = _map(meta.get("annotations"))
    obj = _label("EndpointSlice", meta)
    name = _object_name(obj, meta)
    address_type = d.get("addressType")
    if address_type not in ADDRESS_TYPES:
        raise InvalidObject(f"{obj}: addressType {address_type!r} is not one of {', '.join(ADDRESS_TYPES)}")
    return EndpointSliceSpec(
        namespace=_dns_name(obj, "metadata.namespace", _str(meta.get("namespace")) or "default", label=True),
        name=name,
        service_name=_str(labels.get(SERVICE_NAME_LABEL)),
        address_type=address_type,
        endpoints=tuple(_endpoint(obj, i, _map(raw), address_type) for i, raw in enumerate(_seq(d.get("endpoints")))),
        ports=_endpoint_ports(obj, d),
        trigger_time=parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
        resource_version=_str(meta.get("resourceVersion")),
    )


def _endpoint(obj: str, index: int, e: Mapping[str, Any], address_type: str) -> Endpoint:
    raw_addresses = _seq(e.get("addresses"))
    if address_type == "FQDN":
        addresses = tuple(_str(a) for a in raw_addresses)
    else:
        canonical: list[str] = []
        for j, raw in enumerate(raw_addresses):
            addr = canonical_ip(raw)
            if addr is None:
                raise InvalidObject(f"{obj}: endpoints[{index}].addresses[{j}] {raw!r} is not a valid IP address")
            if _family_of(addr) != address_type:
                raise InvalidObject(f"{obj}: endpoints[{index}].addresses[{j}] {addr} is not an {address_type} address")
            canonical.append(addr)
        addresses = tuple(canonical)
    conditions = _map(e.get("conditions"))
    ready_raw = _condition(obj, index, conditions, "ready")
    serving_raw = _condition(obj, index, conditions, "serving")
    terminating_raw = _condition(obj, index, conditions, "terminating")
    ready = ready_raw is None or ready_raw
    hints = e.get("hints")
    return Endpoint(
        addresses=addresses,
        ready=ready,
        serving=serving_raw is None or serving_raw,  # kube-proxy: Serving == nil || *Serving, whatever Ready says
        terminating=bool(terminating_raw),
        node_name=_str(e.get("nodeName")),
        zone=_str(e.get("zone")),
        hint_zones=_hint_names(hints, "forZones"),
        hint_nodes=_hint_names(hints, "forNodes"),
    )


def _condition(obj: str, index: int, conditions: Mapping[str, Any], key: str) -> bool | None:
    """A condition: true, false or absent (None). Anything else ("false" as a string, say) is refused."""
    value = conditions.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidObject(f"{obj}: endpoints[{index}].conditions.{key} {value!r} is not a boolean")


def _hint_names(hints: Any, key: str) -> tuple[str, ...]:
    if not hints:
        return ()
    return _unique(_str(_map(h).get("name")) for h in _seq(_map(hints).get(key)))


def _endpoint_ports(obj: str, d: Mapping[str, Any]) -> tuple[EndpointPort, ...]:
    ports: list[EndpointPort] = []
    for i, raw in enumerate(_seq(d.get("ports"))):
        p = _map(raw)
        port = p.get("port")
        if port is None or port == 0:
            continue  # kube-proxy ignores slice ports without a number (EndpointSliceCache.endpointInfoByServicePort)
        ports.append(
            EndpointPort(
                name=_port_name(obj, f"ports[{i}].name", p.get("name")),
                protocol=_protocol(obj, f"ports[{i}].protocol", p.get("protocol")),
                port=_int(obj, f"ports[{i}].port", port, 1, 65535),
            )
        )
    return tuple(ports)


def parse_trigger_time(value: Any) -> float | None:
    """An RFC 3339 timestamp as seconds since the epoch; None when absent or unparsable (a naive time is UTC)."""
    if isinstance(value, datetime):  # an unquoted timestamp in YAML
        when = value
    elif isinstance(value, str) and value:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# --- Node ----------------------------------------------------------------------------------------------------------


def node_from_dict(d: Mapping[str, Any]) -> NodeInfo:
    """The agent's own node: name, zone, its node IP per family (from its InternalIP and ExternalIP addresses),
    whether it is being deleted and its taints."""
    meta = _map(d.get("metadata"))
    obj = _label("Node", meta, namespaced=False)
    name = _object_name(obj, meta)
    labels = {str(k): str(v) for k, v in _map(meta.get("labels")).items()}
    by_type: dict[str, list[str]] = {kind: [] for kind in _NODE_IP_ADDRESS_TYPES}
    for i, raw in enumerate(_seq(_map(d.get("status")).get("addresses"))):
        a = _map(raw)
        if a.get("type") in _NODE_IP_ADDRESS_TYPES:
            by_type[str(a.get("type"))].append(_ip(obj, f"status.addresses[{i}].address", a.get("address")))
    # kube-proxy's node IP per family (utilnode.GetNodeHostIPs): the first InternalIP, else the first ExternalIP
    primary = [
        next((ip for kind in _NODE_IP_ADDRESS_TYPES for ip in by_type[kind] if (":" in ip) == v6), "")
        for v6 in (False, True)
    ]
    taints = tuple(str(_map(t).get("key") or "") for t in _seq(_map(d.get("spec")).get("taints")))
    return NodeInfo(
        name=name,
        zone=labels.get(ZONE_LABEL, ""),
        primary_ips=tuple(ip for ip in primary if ip),
        labels=labels,
        being_deleted=bool(meta.get("deletionTimestamp")),
        taints=tuple(t for t in taints if t),
    )
