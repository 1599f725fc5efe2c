"""Read the pinned maps into plain rows for `kpr services` and friends. Works without the agent running."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpr.datapath import abi, codec
from kpr.datapath.bpfsys import BpfError, Map
from kpr.datapath.writers import PinnedMapWriter


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


def _fmt(addr: str, port: int, protocol: str) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port}/{protocol}"


def _flags(flags: int) -> list[str]:
    names = {abi.SVC_F_AFFINITY: "affinity", abi.SVC_F_TWO_SCOPES: "two-scopes", abi.SVC_F_EMPTY_DROP: "empty-drop"}
    return [name for bit, name in names.items() if flags & bit]


def read_services(bpffs_dir: Path) -> list[FrontendRow]:
    writer = PinnedMapWriter(bpffs_dir)
    try:
        names = {int(k.value): codec.decode_svc_name(v) for k, v in writer.items("svc_names")}
        rows = []
        for fam in ("4", "6"):
            backends = {int(k.value): codec.decode_backend(v) for k, v in writer.items(f"backends{fam}")}
            entries = {codec.decode_svc_key(k): v for k, v in writer.items(f"services{fam}")}
            masters = sorted(
                (k for k in entries if k.slot == 0 and k.scope == abi.SCOPE_DEFAULT),
                key=lambda k: (k.addr, k.port, k.protocol),
            )
            for key in masters:
                master = entries[key]
                name = names.get(master.rev_nat_id)
                scopes = []
                for scope in (abi.SCOPE_DEFAULT, abi.SCOPE_INTERNAL):
                    skey = codec.DecodedSvcKey(key.addr, key.port, key.protocol, scope, 0)
                    m = entries.get(skey)
                    if m is None:
                        continue
                    row = ScopeRow("default" if scope == abi.SCOPE_DEFAULT else "internal", _flags(m.flags), [])
                    for slot in range(1, m.count + 1):
                        s = entries.get(codec.DecodedSvcKey(key.addr, key.port, key.protocol, scope, slot))
                        if s is None:
                            row.problems.append(f"slot {slot} missing")
                            continue
                        b = backends.get(s.backend_id)
                        if b is None:
                            row.problems.append(f"slot {slot}: backend {s.backend_id} missing")
                            continue
                        row.backends.append(
                            BackendRow(
                                s.backend_id,
                                _fmt(b.addr, b.port, b.protocol),
                                "terminating" if b.terminating else "active",
                                b.node_local,
                            )
                        )
                    scopes.append(row)
                rows.append(
                    FrontendRow(
                        service=f"{name.namespace}/{name.name}" if name else "(unknown)",
                        port_name=name.port_name if name else "",
                        kind=name.kind if name else "?",
                        frontend=_fmt(key.addr, key.port, key.protocol),
                        rev_nat_id=master.rev_nat_id,
                        affinity_timeout=master.affinity_timeout,
                        scopes=scopes,
                    )
                )
        rows.sort(key=lambda r: (r.service, r.port_name, r.frontend))
        return rows
    finally:
        writer.close()


def read_counters(bpffs_dir: Path) -> dict[str, int]:
    """The datapath's per-CPU counters, summed over CPUs."""
    spec = abi.MAPS["counters"]
    try:
        m = Map(str(bpffs_dir / "counters"), spec.key, spec.value, percpu=True)
    except BpfError:
        return {}
    with m:
        return {name: sum(int(v.value) for v in m.lookup_percpu(abi.U32(idx))) for name, idx in abi.COUNTERS.items()}
