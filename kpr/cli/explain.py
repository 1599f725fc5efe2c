"""`kpr explain SRC DST:PORT/PROTO`: what kpr's datapath would do with a new flow, from the live maps, in words.

Pure: it works on the rows read from the maps (kpr.datapath.inspect.services_from), so tests drive it with
in-memory maps. The decision mirrors bpf/sock.c: frontend lookup at the default scope, the internal scope for
in-cluster clients when the frontend has two, then a random slot (or the client's affine backend), or a refusal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from kpr.datapath import abi
from kpr.datapath.inspect import FrontendRow, ScopeRow, fmt_address
from kpr.datapath.loader import DatapathSettings
from kpr.model.nodeports import WILDCARD

PROTOCOLS = ("TCP", "UDP", "SCTP")


class BadTarget(ValueError):
    pass


@dataclass
class Explanation:
    source: str
    destination: str
    path: str  # socket: from this node or one of its pods | external: arriving on a node device
    verdict: str  # not-a-frontend | load-balanced | refused | dropped
    service: str = ""
    kind: str = ""
    scope: str = ""
    candidates: list[str] = field(default_factory=list)
    affinity_timeout: int = 0
    steps: list[str] = field(default_factory=list)
    frontend: str = ""  # the frontend entry that matched (a NodePort's is at the wildcard address)
    draining: list[str] = field(default_factory=list)  # backends outside the slots still carrying tracked flows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_destination(text: str) -> tuple[str, int, str]:
    """ "10.96.0.10:80/TCP", "[fd00::10]:53/udp" (protocol defaults to TCP) -> (addr, port, PROTO)."""
    target, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in PROTOCOLS:
        raise BadTarget(f"{text}: protocol must be one of {', '.join(PROTOCOLS)}")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadTarget(f"{text}: expected ADDRESS:PORT[/PROTO], e.g. 10.96.0.10:80/TCP or [fd00::10]:53/UDP")
    try:
        addr = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError as e:
        raise BadTarget(f"{text}: {host!r} is not an IP address") from e
    return addr, int(port), proto


def explain(
    rows: list[FrontendRow],
    source: str,
    destination: str,
    *,
    external: bool = False,
    draining: dict[str, list[str]] | None = None,
    nodeport_addresses: dict[str, bool] | None = None,
    settings: DatapathSettings | None = None,
) -> Explanation:
    """`draining` (kpr.datapath.inspect.draining_flows) names the backends outside the slots that tracked flows of
    each frontend still use; `nodeport_addresses` (inspect.read_nodeport_addresses) are the node addresses NodePorts
    answer on, each with whether it serves the node's own sockets only (loopback); `settings` the agent's datapath
    flags (loader.read_config: --external-cluster-ip, --cluster-cidr)."""
    ex = _explain(rows, source, destination, external, nodeport_addresses or {}, settings or DatapathSettings())
    held = (draining or {}).get(ex.frontend)
    if held and ex.verdict != "not-a-frontend":
        ex.draining = held
        ex.steps.append(
            "Flows already tracked on backends that take no new flows stay on them until they end, as kube-proxy's "
            "conntrack keeps them (UDP ones only while the backend serves): " + ", ".join(held) + "."
        )
    return ex


def _explain(
    rows: list[FrontendRow],
    source: str,
    destination: str,
    external: bool,
    nodeport_addresses: dict[str, bool],
    settings: DatapathSettings,
) -> Explanation:
    addr, port, proto = parse_destination(destination)
    try:
        src = str(ipaddress.ip_address(source))
    except ValueError as e:
        raise BadTarget(f"{source!r} is not an IP address") from e
    dst = fmt_address(addr, port, proto)
    path = "external" if external else "socket"
    ex = Explanation(src, dst, path, "not-a-frontend")
    where = "arrives on a node device" if external else "starts on this node (a pod or the host)"
    ex.steps.append(f"The flow {where}; kpr looks up {dst} in services{'6' if ':' in addr else '4'}.")

    row = next((r for r in rows if r.frontend == dst), None)
    wildcard = fmt_address(WILDCARD[6 if ":" in addr else 4], port, proto)
    nodeport = next((r for r in rows if r.frontend == wildcard), None) if row is None else None
    if nodeport is not None and addr in nodeport_addresses:
        loopback_only = nodeport_addresses[addr]
        if loopback_only and external:
            nodeport = None
        else:
            row = nodeport
            ex.steps.append(
                f"No frontend has this exact address, but {addr} is one of the node addresses NodePorts answer on"
                + (" (loopback: for the node's own sockets only)" if loopback_only else "")
                + f", so the NodePort frontend {wildcard} serves it."
            )
    if row is None:
        host = dst.rsplit(":", 1)[0]
        others = [r.frontend for r in rows if r.frontend.rsplit(":", 1)[0] == host]
        hint = f" (this address is a frontend on {', '.join(sorted(others))})" if others else ""
        if nodeport is not None:
            hint = f" (NodePort {port}/{proto} answers on {', '.join(sorted(nodeport_addresses)) or 'no address'} only)"
        ex.steps.append(f"No frontend matches{hint}: kpr leaves the flow alone and it goes where routing sends it.")
        return ex

    ex.frontend = row.frontend
    ex.service = row.service + (f":{row.port_name}" if row.port_name else "")
    ex.kind = row.kind
    ex.affinity_timeout = row.affinity_timeout
    ex.steps.append(f"It matches the {row.kind} frontend of {ex.service}.")
    default = next(s for s in row.scopes if s.scope == "default")
    if external:
        return _explain_external(ex, row, default, settings)
    scope = default
    if "two-scopes" in default.flags:
        internal = next((s for s in row.scopes if s.scope == "internal"), None)
        if internal is not None:
            scope = internal
            ex.steps.append(
                "The frontend keeps a separate backend set for in-cluster clients (externalTrafficPolicy=Local "
                "applies to external clients only), so the internal scope is used."
            )
        else:
            ex.steps.append("The internal scope is flagged but missing; the datapath falls back to the default one.")
    ex.scope = scope.scope
    ex.candidates = [b.address for b in scope.backends]
    for problem in scope.problems:
        ex.steps.append(f"Inconsistent map: {problem}.")

    if not scope.backends:
        if "empty-drop" in scope.flags:
            ex.verdict = "dropped"
            ex.steps.append(
                "It has no backend on this node while the service has endpoints on others (a Local traffic "
                "policy): connect()/sendmsg() fail at once with EHOSTUNREACH, where kube-proxy would drop packets."
            )
        else:
            ex.verdict = "refused"
            ex.steps.append(
                "It has no usable backend at all: connect()/sendmsg() fail at once with ECONNREFUSED, "
                "as kube-proxy's REJECT rule makes them."
            )
        return ex

    ex.verdict = "load-balanced"
    share = 100 / len(scope.backends)
    ex.steps.append(
        f"One of {len(scope.backends)} backend(s) is picked at random ({share:.0f}% each): "
        + ", ".join(ex.candidates)
        + "."
    )
    if "affinity" in scope.flags:
        ex.steps.append(
            f"sessionAffinity ClientIP: a client keeps the backend it got while it reconnects within "
            f"{row.affinity_timeout}s; at the socket layer the client is its network namespace."
        )
    ex.steps.append(
        "The destination is rewritten at connect() (or per sendmsg() for unconnected UDP) before any packet exists: "
        "no NAT, the backend sees the client's own address, and getpeername()/recvmsg() show the frontend."
    )
    return ex


def _is_pod(source: str, settings: DatapathSettings) -> bool:
    ip = ipaddress.ip_address(source)
    return any(ip in ipaddress.ip_network(cidr) for cidr in settings.cluster_cidrs)


def _explain_external(ex: Explanation, row: FrontendRow, default: ScopeRow, settings: DatapathSettings) -> Explanation:
    """The tc path (bpf/tc.c new_flow4/6): external frontends, ClusterIPs with --external-cluster-ip, the internal
    scope for pods (--cluster-cidr) when there are two, masquerade for backends on other nodes."""
    if "external" not in default.flags:
        if not settings.external_cluster_ip:
            ex.verdict = "not-a-frontend"
            ex.steps.append(
                "kpr serves ClusterIPs to clients on the node and in pods only; a ClusterIP packet arriving from "
                "outside is left to routing (kube-proxy would DNAT it: start the agent with --external-cluster-ip)."
            )
            return ex
        ex.steps.append("--external-cluster-ip: ClusterIPs are served to packets arriving from outside too.")
    scope = default
    if "source-ranges" in default.flags:
        ex.steps.append("loadBalancerSourceRanges apply: a source outside them is dropped.")
    if "two-scopes" in default.flags and _is_pod(ex.source, settings):
        internal = next((s for s in row.scopes if s.scope == "internal"), None)
        if internal is not None:
            scope = internal
            ex.steps.append(
                f"The source is in --cluster-cidr ({', '.join(settings.cluster_cidrs)}), one of the cluster's pods: "
                "as kube-proxy's detect-local, externalTrafficPolicy=Local does not apply and every endpoint "
                "(the internal scope) is used."
            )
    ex.scope = scope.scope
    ex.candidates = [b.address for b in scope.backends]
    if not scope.backends:
        if "empty-drop" in scope.flags and "external" not in default.flags:
            ex.verdict = "dropped"
            ex.steps.append(
                "internalTrafficPolicy=Local and no endpoint on this node: the packet is dropped, as kube-proxy does."
            )
        elif "empty-drop" in scope.flags:
            ex.verdict = "dropped"
            ex.steps.append(
                "externalTrafficPolicy=Local and no endpoint on this node: the packet is dropped, as "
                "kube-proxy does (the load balancer's health check sends traffic elsewhere)."
            )
        else:
            ex.verdict = "refused"
            ex.steps.append(
                "No usable backend: TCP is answered with a reset and UDP with ICMP port unreachable "
                "(kube-proxy's REJECT)."
            )
        return ex
    ex.verdict = "load-balanced"
    local = [b.address for b in scope.backends if b.node_local]
    remote = [b.address for b in scope.backends if not b.node_local]
    ex.steps.append(
        f"One of {len(scope.backends)} backend(s) is picked at random and the flow is recorded in "
        "conntrack; later packets and replies follow that entry."
    )
    if local:
        ex.steps.append(
            f"On this node ({', '.join(local)}): DNAT only; the backend sees the client's own address and "
            "its replies are shown as coming from the frontend as they leave."
        )
    if remote:
        ex.steps.append(
            f"On other nodes ({', '.join(remote)}): DNAT and masquerade to this node's address with a "
            f"source port from {abi.SNAT_PORT_MIN}-{abi.SNAT_PORT_MAX}, so replies come back through here."
        )
    if "affinity" in scope.flags:
        ex.steps.append(
            f"sessionAffinity ClientIP: the client's address keeps its backend for {row.affinity_timeout}s "
            "after its last new connection."
        )
    return ex


def explanation_text(ex: Explanation) -> str:
    lines = [f"{ex.source} -> {ex.destination}: {ex.verdict}"]
    lines += [f"  {i}. {step}" for i, step in enumerate(ex.steps, 1)]
    return "\n".join(lines)
