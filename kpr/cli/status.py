"""What `kpr status` gathers: the agent's /status (when it answers), the pinned maps, the attached programs and the
kernel facts kpr depends on. Rendering lives in render.py; this module only collects plain data.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kpr.datapath import abi, bpfsys
from kpr.datapath.inspect import backends_from, read_counters, read_nodeport_addresses, read_services
from kpr.datapath.loader import (
    PROGRAM_PREFIX,
    SOCKET_HOOKS,
    DatapathError,
    attached_programs,
    fs_magic,
)
from kpr.datapath.statfs import BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC
from kpr.datapath.toolchain import find_kernel_headers
from kpr.datapath.writers import PinnedMapWriter

FULL_WARNING = 0.9  # a map this full is flagged
RECENT = 600.0  # seconds an ended exhaustion episode stays in the warnings


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


@dataclass
class MapFill:
    name: str
    entries: int
    max_entries: int

    @property
    def fill(self) -> float:
        return self.entries / self.max_entries if self.max_entries else 0.0


@dataclass
class Status:
    agent: dict[str, Any] | None  # the agent's /status, None when it does not answer
    agent_error: str
    bpffs_dir: str
    cgroup: str
    maps: list[MapFill] = field(default_factory=list)
    programs: list[dict[str, Any]] = field(default_factory=list)
    missing_hooks: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)  # per state, plus "flows_off_slots" (tc flows draining)
    nodeport_addresses: dict[str, bool] = field(default_factory=dict)  # address -> loopback-only
    sctp_frontends: int = 0  # served at tc only: the kernel runs no socket hooks for SCTP
    kernel: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["maps"] = [dict(asdict(m), fill=round(m.fill, 4)) for m in self.maps]
        return out


def fetch_agent_status(address: str, timeout: float = 2.0) -> tuple[dict[str, Any] | None, str]:
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read()), ""
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"no answer from {url}: {getattr(e, 'reason', e)}"


def map_fill(bpffs_dir: Path) -> list[MapFill]:
    fills = []
    for name, spec in abi.MAPS.items():
        if spec.percpu or spec.programs or spec.array or not abi.map_pin(bpffs_dir, name).exists():
            continue
        with bpfsys.Map(str(abi.map_pin(bpffs_dir, name)), spec.key, spec.value) as m:
            fills.append(MapFill(name, len(m.items()), m.info.max_entries))
    return fills


def backend_states(bpffs_dir: Path) -> dict[str, int]:
    """How many backends are in each state, and how many tracked flows sit on backends new flows no longer use."""
    writer = PinnedMapWriter(bpffs_dir)
    try:
        listing = backends_from(writer)
    finally:
        writer.close()
    counts = dict.fromkeys(abi.BACKEND_STATE_NAMES.values(), 0)
    for b in listing:
        counts[b.state] = counts.get(b.state, 0) + 1
    counts["flows_off_slots"] = sum(b.flows for b in listing if not b.frontends)
    return counts


def kernel_facts(bpffs_dir: Path, cgroup: Path) -> dict[str, Any]:
    release = os.uname().release
    major, minor = (int(x) for x in release.split(".")[:2])

    def magic_is(path: Path, magic: int) -> bool:
        try:
            return fs_magic(path) == magic
        except DatapathError:
            return False

    return {
        "release": release,
        "btf": Path("/sys/kernel/btf/vmlinux").exists(),
        "kernel_headers_for_bcc": _kernel_headers(release),
        "bpffs": magic_is(bpffs_dir if bpffs_dir.exists() else bpffs_dir.parent, BPF_FS_MAGIC),
        "cgroup2": magic_is(cgroup, CGROUP2_SUPER_MAGIC),
        # bpf_set_retval (a refused connect() gets ECONNREFUSED) arrived in 5.18; batch map ops in 5.6.
        "bpf_set_retval": (major, minor) >= (5, 18),
        "batch_map_ops": (major, minor) >= (5, 6),
    }


def _kernel_headers(release: str) -> str:
    """The headers tree BCC would try first, in the loader's order ($BCC_KERNEL_SOURCE, the node's, kheaders, the
    image's), as this process sees them; the tree the agent really used is in its "BPF programs compiled" line (the
    loader passes over one that does not compile)."""
    found, _ = find_kernel_headers(release)
    return f"{found[0].source} ({found[0].path})" if found else ""


def collect(bpffs_dir: Path, cgroup: Path, agent_address: str) -> Status:
    agent, agent_error = fetch_agent_status(agent_address) if agent_address else (None, "not asked")
    status = Status(agent, agent_error, str(bpffs_dir), str(cgroup))
    status.kernel = kernel_facts(bpffs_dir, cgroup)
    if bpffs_dir.exists():
        status.maps = map_fill(bpffs_dir)
        status.counters = read_counters(bpffs_dir)
        if {m.name for m in status.maps} >= {"backends4", "ct4"}:
            status.backends = backend_states(bpffs_dir)
        if {m.name for m in status.maps} >= {"nodeport_addrs4", "nodeport_addrs6"}:
            status.nodeport_addresses = read_nodeport_addresses(bpffs_dir)
        if {m.name for m in status.maps} >= {"services4", "services6", "svc_names"}:
            status.sctp_frontends = sum(r.frontend.endswith("/SCTP") for r in read_services(bpffs_dir))
    else:
        status.warnings.append(f"{bpffs_dir} does not exist: kpr has not run here (or was cleaned up)")
    if cgroup.exists():
        ours = [p for p in attached_programs(cgroup) if p.name.startswith(PROGRAM_PREFIX)]
        status.programs = [asdict(p) for p in ours]
        status.missing_hooks = [hook for hook in SOCKET_HOOKS if hook not in {p.hook for p in ours}]
    for m in status.maps:
        if m.fill >= FULL_WARNING:
            status.warnings.append(
                f"map {m.name} is {m.fill:.0%} full ({m.entries}/{m.max_entries}); raise it with --map-size"
            )
    if status.programs and status.missing_hooks:
        status.warnings.append(f"socket hooks without a kpr program: {', '.join(status.missing_hooks)}")
    if agent is not None and not agent.get("healthy"):
        status.warnings.append(f"agent unhealthy: {agent.get('health')}")
    for resource, episode in ((agent or {}).get("exhaustion") or {}).items():
        if episode["active"] or time.time() - episode["last"] < RECENT:
            when = "now" if episode["active"] else f"until {_clock(episode['last'])}"
            status.warnings.append(
                f"{resource} exhausted since {_clock(episode['since'])} ({when}): {episode['dropped']} new flow(s) "
                f"dropped; {episode['advice']}"
            )
    for service, conflicts in ((agent or {}).get("conflicts") or {}).items():
        status.warnings.append(f"{service} waits for a frontend another Service holds: {'; '.join(conflicts)}")
    for kind, watch in ((agent or {}).get("source", {}).get("watches") or {}).items():
        if watch.get("state") == "forbidden":
            status.warnings.append(
                f"the API server refuses to let kpr list {kind}s ({watch.get('problem')}); "
                "bind deploy/clusterrole.yaml to the agent's ServiceAccount"
            )
    if agent is None and status.maps:
        status.warnings.append("the agent does not answer; the maps keep serving what they hold")
    for name, value in status.counters.items():
        if name.startswith("err_") and value:
            status.warnings.append(f"datapath counter {name} = {value} (should stay 0; see `kpr status -v`)")
    return status
