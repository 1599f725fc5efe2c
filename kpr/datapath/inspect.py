"""Read the pinned maps into plain rows for `kpr services` and friends. Works without the agent running."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpr.datapath import abi, codec
from kpr.datapath.bpfsys import BpfError, Map
from kpr.datapath.flows import ct_expired
from kpr.datapath.writers import MapWriter, PinnedMapWriter


@dataclass
class BackendRow:
    id: int
    address: str
    state: str
    node_local: bool


@dataclass
class ScopeRow:
    scope: str
    flags: list[str]
    backends: list[BackendRow]
    problems: list[str] = field(default_factory=list)


@dataclass
class FrontendRow:
    service: str
    port_name: str
    kind: str
    frontend: str
    rev_nat_id: int
    affinity_timeout: int
    scopes: list[ScopeRow]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt_address(addr: str, port: int, protocol: str) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port}/{protocol}"


def _flags(flags: int) -> list[str]:
    names = {
        abi.SVC_F_AFFINITY: "affinity",
        abi.SVC_F_TWO_SCOPES: "two-scopes",
        abi.SVC_F_EMPTY_DROP: "empty-drop",
        abi.SVC_F_SOURCE_RANGES: "source-ranges",
        abi.SVC_F_EXTERNAL: "external",
    }
    return [name for bit, name in names.items() if flags & bit]


def read_services(bpffs_dir: Path) -> list[FrontendRow]:
    writer = PinnedMapWriter(bpffs_dir)
    try:
        return services_from(writer)
    finally:
        writer.close()


def services_from(writer: MapWriter) -> list[FrontendRow]:
    """Frontend rows from any map writer (the pinned maps, or in-memory ones in tests)."""
    names = {int(k.value): codec.decode_svc_name(v) for k, v in writer.items("svc_names")}
    rows = []
    for fam in ("4", "6"):
        backends = {int(k.value): codec.decode_backend(v) for k, v in writer.items(f"backends{fam}")}
        for fe in codec.decode_services(writer.items(f"services{fam}")):
            master = fe.scopes.get(abi.SCOPE_DEFAULT)
            if master is None:
                continue
            name = names.get(master.rev_nat_id)
            scopes = []
            for scope in (abi.SCOPE_DEFAULT, abi.SCOPE_INTERNAL):
                m = fe.scopes.get(scope)
                if m is None:
                    continue
                row = ScopeRow("default" if scope == abi.SCOPE_DEFAULT else "internal", _flags(m.flags), [])
                for slot, backend_id in enumerate(m.slots, 1):
                    if backend_id is None:
                        row.problems.append(f"slot {slot} missing")
                        continue
                    b = backends.get(backend_id)
                    if b is None:
                        row.problems.append(f"slot {slot}: backend {backend_id} missing")
                        continue
                    row.backends.append(
                        BackendRow(backend_id, fmt_address(b.addr, b.port, b.protocol), b.state_name, b.node_local)
                    )
                scopes.append(row)
            rows.append(
                FrontendRow(
                    service=f"{name.namespace}/{name.name}" if name else "(unknown)",
                    port_name=name.port_name if name else "",
                    kind=name.kind if name else "?",
                    frontend=fmt_address(fe.addr, fe.port, fe.protocol),
                    rev_nat_id=master.rev_nat_id,
                    affinity_timeout=master.affinity_timeout,
                    scopes=scopes,
                )
            )
    rows.sort(key=lambda r: (r.service, r.port_name, r.frontend))
    return rows


def read_counters(bpffs_dir: Path) -> dict[str, int]:
    """The datapath's per-CPU counters, summed over CPUs."""
    spec = abi.MAPS["counters"]
    try:
        m = Map(str(abi.map_pin(bpffs_dir, "counters")), spec.key, spec.value, percpu=True)
    except BpfError:
        return {}
    with m:
        return {name: sum(int(v.value) for v in m.lookup_percpu(abi.U32(idx))) for name, idx in abi.COUNTERS.items()}


@dataclass
class BackendListing:
    id: int
    address: str
    state: str  # active | terminating | not-serving | gone
    node_local: bool
    frontends: list[str]  # "ns/name:port frontend" of every frontend with a slot on it
    flows: int = 0  # live tc-path flows on it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_backends(bpffs_dir: Path) -> list[BackendListing]:
    """Every backend entry, with the frontends whose slots point at it and the tc flows still on it.

    A backend in no slot is standby (terminating, not ready, or not for this node's policy or zone: flows already on
    it keep it) or gone (in no EndpointSlice any more, kept while tracked TCP flows use it).
    """
    writer = PinnedMapWriter(bpffs_dir)
    try:
        return backends_from(writer)
    finally:
        writer.close()


def backends_from(writer: MapWriter, now_ns: int | None = None) -> list[BackendListing]:
    users: dict[int, list[str]] = {}
    for row in services_from(writer):
        for scope in row.scopes:
            for b in scope.backends:
                label = f"{row.service} {row.frontend}"
                if label not in users.setdefault(b.id, []):
                    users[b.id].append(label)
    flows = flows_per_backend(writer, now_ns)
    out = []
    for fam in ("4", "6"):
        for k, v in writer.items(f"backends{fam}"):
            decoded = codec.decode_backend(v)
            backend_id = int(k.value)
            out.append(
                BackendListing(
                    backend_id,
                    fmt_address(decoded.addr, decoded.port, decoded.protocol),
                    decoded.state_name,
                    decoded.node_local,
                    users.get(backend_id, []),
                    flows.get(backend_id, 0),
                )
            )
    return sorted(out, key=lambda listing: listing.id)


def flows_per_backend(writer: MapWriter, now_ns: int | None = None) -> dict[int, int]:
    """Live tc-path flows (their original-direction entries) per backend id."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    counts: dict[int, int] = {}
    for name in ("ct4", "ct6"):
        for key, value in writer.items(name):
            if key.dir == abi.CT_ORIGINAL and not ct_expired(value, key.proto, now):
                counts[value.backend_id] = counts.get(value.backend_id, 0) + 1
    return counts


def filter_services(
    rows: list[FrontendRow], namespace: str | None = None, service: str | None = None, address: str | None = None
) -> list[FrontendRow]:
    """Rows of one namespace, one service (NAME or NS/NAME) and/or touching an address (frontend or backend)."""
    out = []
    for r in rows:
        ns, _, name = r.service.partition("/")
        if namespace and ns != namespace:
            continue
        if service and service not in (r.service, name):
            continue
        if address and not (
            _host(r.frontend) == address or any(_host(b.address) == address for s in r.scopes for b in s.backends)
        ):
            continue
        out.append(r)
    return out


def _host(formatted: str) -> str:
    """The address part of "a.b.c.d:port/PROTO" or "[v6]:port/PROTO"."""
    host = formatted.rsplit(":", 1)[0]
    return host.strip("[]")


@dataclass
class FlowRow:
    protocol: str
    direction: str  # original (client -> frontend) | reply (backend -> client or node)
    source: str
    destination: str
    frontend: str
    backend: str
    masquerade: str  # original: the node address:port used; reply: the client it stands for
    closing: bool
    idle_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_conntrack(bpffs_dir: Path) -> list[FlowRow]:
    """The tc path's flows (ct4/ct6), newest first, with their frontend and backend resolved."""
    writer = PinnedMapWriter(bpffs_dir, ["ct4", "ct6", "backends4", "backends6"])
    now = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC too
    try:
        rows = []
        for fam in ("4", "6"):
            backends = {int(k.value): codec.decode_backend(v) for k, v in writer.items(f"backends{fam}")}
            for key, value in writer.items(f"ct{fam}"):
                protocol = abi.PROTOCOL_NAMES.get(key.proto, str(key.proto))
                src = fmt_address(codec.addr_of(key.src), abi.port_of_be16(key.sport), protocol)
                dst = fmt_address(codec.addr_of(key.dst), abi.port_of_be16(key.dport), protocol)
                fe = (codec.addr_of(value.fe_addr), abi.port_of_be16(value.fe_port))  # what the client dialled
                be = backends.get(value.backend_id)
                nat = ""
                if value.flags & abi.CT_F_SNAT:
                    nat = fmt_address(codec.addr_of(value.addr), abi.port_of_be16(value.port), protocol)
                rows.append(
                    FlowRow(
                        protocol,
                        "reply" if key.dir == abi.CT_REPLY else "original",
                        src.rsplit("/", 1)[0],
                        dst.rsplit("/", 1)[0],
                        fmt_address(fe[0], fe[1], protocol),
                        fmt_address(be.addr, be.port, be.protocol) if be else f"(gone: {value.backend_id})",
                        nat.rsplit("/", 1)[0],
                        bool(value.flags & abi.CT_F_CLOSING),
                        round(max(0, now - value.last_seen_ns) / 1e9, 1),
                    )
                )
        return sorted(rows, key=lambda r: (r.idle_seconds, r.protocol, r.source))
    finally:
        writer.close()


def read_nodeport_addresses(bpffs_dir: Path) -> dict[str, bool]:
    """The node addresses NodePorts answer on (nodeport_addrs4/6), each with whether it is loopback-only."""
    writer = PinnedMapWriter(bpffs_dir, ["nodeport_addrs4", "nodeport_addrs6"])
    try:
        return nodeport_addresses_from(writer)
    finally:
        writer.close()


def nodeport_addresses_from(writer: MapWriter) -> dict[str, bool]:
    out = {
        abi.ipv4_of_be32(int(k.value)): bool(v.value & abi.NODEPORT_F_LOOPBACK)
        for k, v in writer.items("nodeport_addrs4")
    }
    out |= {
        abi.ipv6_of_be32x4(k.addr): bool(v.value & abi.NODEPORT_F_LOOPBACK) for k, v in writer.items("nodeport_addrs6")
    }
    return dict(sorted(out.items()))


def read_draining_flows(bpffs_dir: Path) -> dict[str, list[str]]:
    writer = PinnedMapWriter(bpffs_dir)
    try:
        return draining_flows(writer)
    finally:
        writer.close()


def draining_flows(writer: MapWriter, now_ns: int | None = None) -> dict[str, list[str]]:
    """Per frontend ("addr:port/PROTO"), the backends outside its slots that live tc flows still use, in words:
    "10.244.1.12:8080/TCP (terminating): 3 flows"."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    in_slots = {(r.rev_nat_id, b.id) for r in services_from(writer) for s in r.scopes for b in s.backends}
    out: dict[str, list[str]] = {}
    for fam in ("4", "6"):
        frontends = {int(k.value): codec.decode_rev_nat(v) for k, v in writer.items(f"rev_nat{fam}")}
        backends = {int(k.value): codec.decode_backend(v) for k, v in writer.items(f"backends{fam}")}
        counts: dict[tuple[int, int, int], int] = {}
        for key, value in writer.items(f"ct{fam}"):
            if key.dir != abi.CT_ORIGINAL or ct_expired(value, key.proto, now):
                continue
            if (value.rev_nat_id, value.backend_id) not in in_slots:
                flow = (value.rev_nat_id, value.backend_id, key.proto)
                counts[flow] = counts.get(flow, 0) + 1
        for (rev_nat_id, backend_id, proto), n in sorted(counts.items()):
            protocol = abi.PROTOCOL_NAMES.get(proto, str(proto))
            fe = frontends.get(rev_nat_id)
            be = backends.get(backend_id)
            if fe is None:
                continue
            label = f"{fmt_address(be.addr, be.port, be.protocol)} ({be.state_name})" if be else f"(id {backend_id})"
            out.setdefault(fmt_address(fe[0], fe[1], protocol), []).append(f"{label}: {n} flow{'s' * (n != 1)}")
    return out
