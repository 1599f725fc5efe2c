"""Benchmarks: kpr against kube-proxy's iptables and nftables dataplanes and against the pod IP, in one run.

    python bench/run.py [--quick]        (as root; `make bench` runs it)

Builds a lab of network namespaces (kpr.lab) and measures, side by side and interleaved round by round:

Datapath, at 0, 1k, 10k and 50k Services (--quick: 0, 1k, 10k, shorter runs), from a client pod to a Service whose
one endpoint is a server pod on the same node (a C echo server, bench/loadgen.c):
  - TCP connection rate (connect, read the server's one line, close; many in flight) and connect + first byte
    latency (p50/p99, one connection at a time);
  - UDP request/response rate (connected sockets, many requests in flight);
  - bulk TCP throughput on one connection (iperf3).
Each on four lab nodes that differ only in what handles the ClusterIP: kpr (the real agent, fed by an API server
holding the Services), kube-proxy's iptables rules (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, loaded with
iptables-restore), kube-proxy's nftables table (loaded with nft -f), and nothing at all, the client dialling the
pod IP (the physical limit). The connection-rate case also dials the pod IP on the iptables and kpr nodes, to show
what the rules cost traffic that is not for a Service.

Control plane, at 10k Services x 10 endpoints: cold programming time (kpr from the API objects to the maps, vs
iptables-restore and nft -f of kube-proxy's equivalent rules), the time to apply one endpoint change (kpr, vs
kube-proxy's full iptables-restore, its partial --noflush restore and its nft transaction), and the agent's memory.

Writes docs/benchmarks/results.json, then bench/report.py turns it into docs/benchmarks/README.md and the plots.
Everything runs inside lab namespaces; the root namespace gets no rule, route or interface.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import kubeproxy as kp  # noqa: E402
from bench.controlplane import endpoint_ip, log_times, rss_mib, service_obj, slice_obj, vip  # noqa: E402
from kpr.datapath import abi, codec  # noqa: E402
from kpr.datapath.bpfsys import Map  # noqa: E402
from kpr.datapath.inspect import read_counters  # noqa: E402
from kpr.lab import Lab, Node, Pod  # noqa: E402
from kpr.lab.cluster import LabAgent, endpoint, endpoint_slice, listen_in, service, wait_until  # noqa: E402
from tests.e2e.fake_apiserver import FakeApiServer  # noqa: E402

OUT_DIR = ROOT / "docs" / "benchmarks"
VIP = "10.100.0.10"  # the measured Service; the filler Services are 10.96.x.y (bench/controlplane.vip)
HTTP_PORT, DNS_PORT, IPERF_PORT, SERVER_PORT = 80, 53, 5201, 8080
MEASURED_PORTS = [("iperf", IPERF_PORT, IPERF_PORT, "TCP"), ("http", HTTP_PORT, SERVER_PORT, "TCP"),
                  ("dns", DNS_PORT, SERVER_PORT, "UDP")]  # fmt: skip
MEASURED_SLICE_PORTS = [("iperf", IPERF_PORT, "TCP"), ("http", SERVER_PORT, "TCP"), ("dns", SERVER_PORT, "UDP")]
FILLER_ENDPOINTS = 2  # per filler Service in the datapath cases: kube-proxy's rule count, kpr's slot count
IPTABLES_RESTORE = ["iptables-legacy-restore", "-w", "--noflush", "--counters"]  # what kube-proxy runs (see README)
SITES = {"kpr": "kpr", "iptables": "ipt", "nftables": "nft", "direct": "bare"}  # site -> lab node name


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    site: str
    via_cluster_ip: bool
    second_client: bool = False  # a client pod of its own (see Site.client2)


VARIANTS = [
    Variant("kpr", "kpr", "kpr", True),
    Variant("iptables", "kube-proxy iptables", "iptables", True),
    Variant("nftables", "kube-proxy nftables", "nftables", True),
    Variant("direct", "pod IP, no proxy", "direct", False),
    Variant("direct_iptables", "pod IP, node with the iptables rules", "iptables", False, second_client=True),
    Variant("direct_kpr", "pod IP, node with kpr", "kpr", False, second_client=True),
]
MAIN_VARIANTS = ("kpr", "iptables", "nftables", "direct")
TESTS = ("crr", "latency", "udp", "bulk")


@dataclass
class Config:
    quick: bool
    sizes: list[int]
    repeats: int  # rounds; the connection-rate case runs in every round
    repeats_other: int  # rounds with the latency and UDP cases (spread over the rounds)
    repeats_bulk: int  # rounds with the bulk case (it does not depend on the number of Services)
    warmup: float
    crr_seconds: float
    latency_seconds: float
    udp_seconds: float
    bulk_seconds: int
    crr_concurrency: int
    udp_concurrency: int
    client_threads: int
    server_threads: int
    nft_max_services: int  # above this the nftables site is not measured (its ruleset does not load in time)
    cp_services: int
    cp_endpoints: int
    cp_cold_repeats: int
    cp_nftables: bool  # nft -f cold (minutes at 10k Services, see README) and changes; --quick leaves them out
    cp_kpr_changes: int
    cp_iptables_changes: int  # of which every cp_full_every-th is a full restore, the others partial
    cp_full_every: int
    cp_nft_changes: int
    cp_backend_check: bool  # time iptables-nft vs iptables-legacy loading kube-proxy's rules (why legacy is used)


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        cfg = Config(
            quick=True, sizes=[0, 1000, 10000], repeats=3, repeats_other=2, repeats_bulk=1, warmup=0.2,
            crr_seconds=1.0, latency_seconds=0.6,
            udp_seconds=0.8, bulk_seconds=1, crr_concurrency=32, udp_concurrency=16, client_threads=2,
            server_threads=2, nft_max_services=10000, cp_services=10000, cp_endpoints=10, cp_cold_repeats=1,
            cp_nftables=False, cp_kpr_changes=50, cp_iptables_changes=6, cp_full_every=6, cp_nft_changes=0,
            cp_backend_check=False,
        )  # fmt: skip
    else:
        cfg = Config(
            quick=False, sizes=[0, 1000, 10000, 50000], repeats=5, repeats_other=3, repeats_bulk=2, warmup=0.2,
            crr_seconds=1.0,
            latency_seconds=0.6, udp_seconds=0.8, bulk_seconds=1, crr_concurrency=32, udp_concurrency=16,
            client_threads=2, server_threads=2, nft_max_services=10000, cp_services=10000, cp_endpoints=10,
            cp_cold_repeats=2, cp_nftables=True, cp_kpr_changes=200, cp_iptables_changes=10, cp_full_every=5,
            cp_nft_changes=6, cp_backend_check=True,
        )  # fmt: skip
    for name in ("sizes", "repeats", "crr_concurrency", "client_threads", "server_threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
    distro = "unknown"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        distro = next((line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("PRETTY_NAME=")), "")
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "distribution": distro,
        "python": platform.python_version(),
        "iptables": first_line(["iptables-legacy", "--version"]),
        "nft": first_line(["nft", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "gcc": first_line(["gcc", "--version"]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def compile_loadgen(directory: Path) -> Path:
    binary = directory / "loadgen"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(ROOT / "bench" / "loadgen.c")],
        check=True,
        capture_output=True,
        text=True,
    )
    return binary


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[int, int, int]:
    """(total, idle, steal) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:8]), values[3] + values[4], values[7]


def spread(n: int, rounds: int, avoid: set[int] | None = None) -> set[int]:
    """n round numbers out of range(rounds), evenly spread, preferring rounds not in `avoid`."""
    pool = [r for r in range(rounds) if r not in (avoid or set())]
    if len(pool) < n:
        pool = list(range(rounds))
    if n <= 1:
        return set(pool[len(pool) // 2 : len(pool) // 2 + n])
    return {pool[round(k * (len(pool) - 1) / (n - 1))] for k in range(n)}


def wait_idle(busy_below: float = 0.3, timeout: float = 10.0) -> dict[str, float]:
    """Wait until the machine is quiet (the agent done digesting a change, the kernel done freeing old rules), at
    most `timeout` seconds: a shared machine may never be quiet, and then the measurements start anyway."""
    started = time.monotonic()
    busy = float("nan")
    while time.monotonic() - started < timeout:
        tot0, idle0, _ = machine_cpu()
        time.sleep(0.5)
        tot1, idle1, _ = machine_cpu()
        busy = (1 - (idle1 - idle0) / max(1, tot1 - tot0)) * (os.cpu_count() or 1)
        if busy < busy_below:
            break
    return {"waited_for_idle_seconds": round(time.monotonic() - started, 1), "busy_cores_before": round(busy, 2)}


TIMER = r"""
import json, subprocess, sys, time
times = []
for argv, path in json.loads(sys.argv[1]):
    with open(path, "rb") as f:
        started = time.perf_counter()
        done = subprocess.run(argv, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - started)
    if done.returncode:
        sys.stderr.write(" ".join(argv) + " < " + path + ": " + done.stderr.decode(errors="replace")[-3000:])
        sys.exit(1)
print(json.dumps(times))
"""
"""Runs programs inside a node's namespace and times each from fork to exit, as kube-proxy experiences them (the
timer itself starts before and is not counted)."""


def timed_in(lab: Lab, node: Node, jobs: Sequence[tuple[Sequence[str], str]], timeout: float = 1800) -> list[float]:
    """Run (argv, input text) jobs one after the other in the node's network namespace; their wall times."""
    with tempfile.TemporaryDirectory(prefix="kpr-bench-", dir=lab.run_dir) as tmp:
        spec = []
        for n, (argv, text) in enumerate(jobs):
            path = Path(tmp) / f"input{n}"
            path.write_text(text)
            spec.append((list(argv), str(path)))
        result = lab.run(node, [sys.executable, "-I", "-S", "-c", TIMER, json.dumps(spec)], timeout=timeout)
    times: list[float] = json.loads(result.stdout)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class KprMaps:
    """Reads frontends' master entries from a node's pinned services map."""

    def __init__(self, bpffs_dir: Path) -> None:
        spec = abi.MAPS["services4"]
        self.map = Map(str(abi.map_pin(bpffs_dir, "services4")), spec.key, spec.value)

    def count(self, ip: str, port: int, protocol: str = "TCP") -> int | None:
        master = self.map.lookup(codec.svc_key(ip, port, protocol, abi.SCOPE_DEFAULT, 0))
        return None if master is None else int(master.count)

    def close(self) -> None:
        self.map.close()


def measured_objects(server: Pod) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        service("measured", [VIP], MEASURED_PORTS, namespace="bench"),
        endpoint_slice("measured", [endpoint(server.ipv4, server.node)], MEASURED_SLICE_PORTS, namespace="bench"),
    )


def measured_ports(server: Pod) -> list[kp.ServicePort]:
    svc, eps = measured_objects(server)
    return kp.service_ports([svc], [eps])


def node_object(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": {"addresses": []}}


# --------------------------------------------------------------------------------------------------------------------
# datapath


@dataclass
class Site:
    name: str
    node: Node
    client: Pod
    # Dials the pod IP on the iptables and kpr nodes. A pod of its own, because the server cannot tell a DNATed
    # connection from a direct one with the same 4-tuple: TIME_WAIT entries left by one kind would reject the other
    # kind's SYNs (their initial sequence numbers come from different tuples on the client) and stall it for a
    # retransmission timeout.
    client2: Pod
    server: Pod
    echo_pid: int
    iperf_pid: int

    def client_for(self, v: Variant) -> Pod:
        return self.client2 if v.second_client else self.client


CHECK = r"""
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=3)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, port))
    s.send(b"check")
print(s.recv(200).decode().split()[0])
"""


class Datapath:
    def __init__(self, cfg: Config, lab: Lab, loadgen: Path) -> None:
        self.cfg = cfg
        self.lab = lab
        self.loadgen = loadgen
        self.sites: dict[str, Site] = {}
        self.runs: list[dict[str, Any]] = []
        self.setup: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, str]] = {}
        self.counters: dict[str, dict[str, int]] = {}
        self.api: FakeApiServer | None = None
        self.agent: LabAgent | None = None
        self.maps: KprMaps | None = None
        self.filler_ports: list[kp.ServicePort] = []
        self.size = 0
        self.nft_loaded = 0  # filler services in the nftables site's table
        self.iptables_jumps = False
        self.nft_base = False

    # ---- building

    def build(self) -> None:
        for site, node_name in SITES.items():
            node = self.lab.add_node(node_name)
            server = self.lab.add_pod(node, f"{node_name}-server", echo=False)
            client = self.lab.add_pod(node, f"{node_name}-client", echo=False)
            client2 = self.lab.add_pod(node, f"{node_name}-client2", echo=False)
            echo = self.lab.spawn(
                server,
                [self.loadgen, "serve", "--name", f"{site}-server", "--tcp", str(SERVER_PORT), "--udp",
                 str(SERVER_PORT), "--threads", str(self.cfg.server_threads)],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the echo server in {server.name} did not start")
            iperf = self.lab.spawn(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
            wait_until(
                lambda s=server: self.lab.run(s, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(),
                10,
                f"iperf3 to listen in {server.name}",
            )
            self.sites[site] = Site(site, node, client, client2, server, echo.pid, iperf.pid)
        # kpr: the real agent, following an API server that holds the Services (in the node's namespace).
        kpr = self.sites["kpr"]
        self.api = FakeApiServer(listen_in(kpr.node.netns), bookmark_interval=30)
        self.api.apply(node_object(kpr.node.name))
        for obj in measured_objects(kpr.server):
            self.api.apply(obj)
        self.api.start()
        self.agent = LabAgent(
            self.lab,
            kpr.node,
            kubeconfig=self.api.kubeconfig(self.lab.run_dir / "kubeconfig"),
            extra_args=["--metrics-bind-address", "", "--healthz-bind-address", "", "--log-level", "info"],
        ).start()
        self.agent.wait_started(timeout=180)
        self.maps = KprMaps(kpr.node.bpffs_dir)
        wait_until(lambda: self.maps and self.maps.count(VIP, HTTP_PORT) == 1, 30, "kpr to program the Service")
        # the same filler Services for every site
        biggest = max(self.cfg.sizes)
        self.filler_ports = kp.service_ports(
            [service_obj(i) for i in range(biggest)], [slice_obj(i, FILLER_ENDPOINTS) for i in range(biggest)]
        )

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
        if self.agent is not None and self.agent.proc is not None:
            kpr = self.sites["kpr"]
            self.agent.stop()
            self.agent.kpr("cleanup", "--cgroup-root", str(kpr.node.cgroup), "--bpffs-dir", str(kpr.node.bpffs_dir))
        if self.api is not None:
            self.api.stop()

    # ---- programming every site for a number of filler Services

    def grow(self, size: int) -> None:
        """Add filler Services up to `size` on every site (in parallel: this part is not measured)."""
        assert self.api is not None and self.maps is not None
        before = self.size
        info: dict[str, Any] = {}
        errors: list[BaseException] = []

        def iptables() -> None:
            site = self.sites["iptables"]
            ports = self.filler_ports[:size] + measured_ports(site.server)  # the measured Service comes last
            text = kp.IptablesRuleset(ports).restore_input()
            jobs: list[tuple[Sequence[str], str]] = [(IPTABLES_RESTORE, text)]
            if not self.iptables_jumps:
                jobs.append((IPTABLES_RESTORE, kp.IPTABLES_JUMPS))
            times = timed_in(self.lab, site.node, jobs)
            self.iptables_jumps = True
            info["iptables_full_restore_seconds"] = round(times[0], 3)
            info["iptables_restore_input_bytes"] = len(text)

        def nftables() -> None:
            site = self.sites["nftables"]
            if size > self.cfg.nft_max_services:
                info["nftables"] = f"not loaded: more than {self.cfg.nft_max_services} Services (see README)"
                return
            chunks: list[str] = []
            if not self.nft_base:
                chunks += kp.nft_input_chunks(measured_ports(site.server))  # position is irrelevant: a hash lookup
                self.nft_base = True
            chunks += kp.nft_input_chunks(self.filler_ports[self.nft_loaded : size], base=False)
            times = timed_in(self.lab, site.node, [(["nft", "-f", "-"], c) for c in chunks]) if chunks else []
            self.nft_loaded = size
            info["nftables_load_seconds_chunked"] = round(sum(times), 3)

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except BaseException as e:
                    errors.append(e)

            return run

        threads = [threading.Thread(target=guarded(fn)) for fn in (iptables, nftables)]
        for t in threads:
            t.start()
        started = time.monotonic()
        for i in range(before, size):
            self.api.apply(service_obj(i))
            self.api.apply(slice_obj(i, FILLER_ENDPOINTS))
        if size > before:
            sample = [size - 1, *random.Random(size).sample(range(size), min(100, size))]
            maps = self.maps
            wait_until(
                lambda: all(maps.count(vip(i), 80) == FILLER_ENDPOINTS for i in sample),
                900,
                f"kpr to program {size} Services",
                interval=0.2,
            )
        info["kpr_programming_seconds"] = round(time.monotonic() - started, 3)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        assert self.agent is not None and self.agent.proc is not None
        info["agent_rss_mib"] = round(rss_mib(self.agent.proc.pid), 1)
        info["note"] = "kpr, iptables and nftables were programmed at the same time (not a measurement)"
        self.setup[str(size)] = info
        self.size = size

    # ---- measuring

    def variants(self, test: str) -> list[Variant]:
        keys = [v.key for v in VARIANTS] if test == "crr" else list(MAIN_VARIANTS)
        out = [v for v in VARIANTS if v.key in keys]
        if self.size > self.cfg.nft_max_services:
            out = [v for v in out if v.site != "nftables"]
        return out

    def target(self, v: Variant, port: str) -> tuple[str, int]:
        site = self.sites[v.site]
        if v.via_cluster_ip:
            return VIP, {"http": HTTP_PORT, "dns": DNS_PORT, "iperf": IPERF_PORT}[port]
        return site.server.ipv4, {"http": SERVER_PORT, "dns": SERVER_PORT, "iperf": IPERF_PORT}[port]

    def check(self) -> None:
        """Before measuring: every variant reaches its own node's server (TCP and UDP)."""
        seen: dict[str, str] = {}
        for v in self.variants("crr"):
            for proto, port in (("tcp", "http"), ("udp", "dns")):
                host, p = self.target(v, port)
                out = self.lab.run(self.sites[v.site].client_for(v), [sys.executable, "-I", "-S", "-c", CHECK, host,
                                                                str(p), proto], timeout=20)  # fmt: skip
                name = out.stdout.strip()
                if name != f"{v.site}-server":
                    raise RuntimeError(f"{v.key}: {proto} to {host}:{p} answered by {name!r}")
                seen[f"{v.key}/{proto}"] = f"{host}:{p} -> {name}"
        self.checks[str(self.size)] = seen

    def measure(self, v: Variant, test: str) -> dict[str, Any]:
        cfg = self.cfg
        site = self.sites[v.site]
        client_args = ["--warmup", str(cfg.warmup), "--threads", str(cfg.client_threads)]
        if test in ("crr", "latency"):
            host, port = self.target(v, "http")
            seconds, conc = (cfg.crr_seconds, cfg.crr_concurrency) if test == "crr" else (cfg.latency_seconds, 1)
            if test == "latency":
                client_args = ["--warmup", str(cfg.warmup), "--threads", "1"]
            argv = [str(self.loadgen), "crr", "--target", f"{host}:{port}", "--duration", str(seconds)]
            argv += ["--conc", str(conc), *client_args]
            server_pid = site.echo_pid
        elif test == "udp":
            host, port = self.target(v, "dns")
            argv = [str(self.loadgen), "udprr", "--target", f"{host}:{port}", "--duration", str(cfg.udp_seconds)]
            argv += ["--conc", str(cfg.udp_concurrency), *client_args]
            server_pid = site.echo_pid
        else:
            host, port = self.target(v, "iperf")
            argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(cfg.bulk_seconds), "-O", "1", "-J"]
            server_pid = site.iperf_pid
        cpu0, (tot0, idle0, steal0), t0 = process_cpu_seconds(server_pid), machine_cpu(), time.monotonic()
        done = self.lab.run(site.client_for(v), argv, timeout=120, check=False)
        wall = time.monotonic() - t0
        cpu1, (tot1, idle1, steal1) = process_cpu_seconds(server_pid), machine_cpu()
        if done.returncode != 0:
            raise RuntimeError(f"{test} {v.key}: {' '.join(argv)} failed: {done.stderr or done.stdout}")
        result: dict[str, Any]
        if test == "bulk":
            j = json.loads(done.stdout)
            result = {
                "gbit_per_second": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": j["end"]["sum_sent"].get("retransmits"),
                "client_cpu_percent": j["end"]["cpu_utilization_percent"]["host_total"],
                "server_cpu_percent": j["end"]["cpu_utilization_percent"]["remote_total"],
            }
        else:
            result = json.loads(done.stdout)
        jiffies = max(1, tot1 - tot0)
        result["server_cpu_cores"] = round((cpu1 - cpu0) / wall, 3)
        result["machine_busy_cores"] = round((jiffies - (idle1 - idle0)) / jiffies * (os.cpu_count() or 1), 3)
        result["machine_steal_share"] = round((steal1 - steal0) / jiffies, 4)
        return result

    def run_size(self, size: int) -> None:
        log(f"datapath: programming {size} filler Services on every node")
        self.grow(size)
        self.setup[str(size)].update(wait_idle())
        log(f"  {json.dumps(self.setup[str(size)])}")
        self.check()
        kpr = self.sites["kpr"]
        counters0 = read_counters(kpr.node.bpffs_dir)
        cfg = self.cfg
        schedule = {
            "crr": set(range(cfg.repeats)),
            "latency": spread(cfg.repeats_other, cfg.repeats),
            "udp": spread(cfg.repeats_other, cfg.repeats),
            "bulk": spread(cfg.repeats_bulk, cfg.repeats, avoid=spread(cfg.repeats_other, cfg.repeats)),
        }
        for r in range(self.cfg.repeats):
            for test in TESTS:
                if r not in schedule[test]:
                    continue
                vs = self.variants(test)
                k = r % len(vs)
                for v in vs[k:] + vs[:k]:  # a different variant goes first in every round
                    result = self.measure(v, test)
                    self.runs.append({"size": size, "round": r, "test": test, "variant": v.key, **result})
            summary = ", ".join(
                f"{run['variant']} {run['rate']:.0f}/s"
                for run in self.runs
                if run["size"] == size and run["round"] == r and run["test"] == "crr"
            )
            log(f"  {size} Services, round {r + 1}/{self.cfg.repeats}: connections {summary}")
        counters1 = read_counters(kpr.node.bpffs_dir)
        self.counters[str(size)] = {k: counters1.get(k, 0) - counters0.get(k, 0) for k in counters1}

    def results(self) -> dict[str, Any]:
        return {
            "sizes": [s for s in self.cfg.sizes],
            "filler_endpoints_per_service": FILLER_ENDPOINTS,
            "measured_service": {"cluster_ip": VIP, "ports": MEASURED_PORTS, "endpoints": 1},
            "variants": {
                v.key: {"label": v.label, "site": v.site, "via_cluster_ip": v.via_cluster_ip} for v in VARIANTS
            },
            "setup": self.setup,
            "checks": self.checks,
            "kpr_counters": self.counters,
            "runs": self.runs,
        }


def run_datapath(cfg: Config, loadgen: Path) -> dict[str, Any]:
    with Lab() as lab:
        dp = Datapath(cfg, lab, loadgen)
        try:
            dp.build()
            for size in sorted(cfg.sizes):
                dp.run_size(size)
            lab.assert_host_isolated()
        finally:
            dp.close()
        return dp.results()


# --------------------------------------------------------------------------------------------------------------------
# control plane


def run_controlplane(cfg: Config) -> dict[str, Any]:
    n_services, per = cfg.cp_services, cfg.cp_endpoints
    services = [service_obj(i) for i in range(n_services)]
    slices = [slice_obj(i, per) for i in range(n_services)]
    ruleset = kp.IptablesRuleset(kp.service_ports(services, slices))
    cold_iptables = ruleset.restore_input() + kp.IPTABLES_JUMPS
    cold_nft = kp.nft_input(ruleset.ports)
    out: dict[str, Any] = {
        "services": n_services,
        "endpoints_per_service": per,
        "cold_seconds": {"kpr_agent_sync": [], "kpr_end_to_end": [], "iptables_restore": [], "nft": []},
        "change_ms": {"kpr": [], "iptables_full": [], "iptables_partial": [], "nftables": []},
        "input_bytes": {"iptables_cold": len(cold_iptables), "nft_cold": len(cold_nft)},
    }
    with Lab() as lab:
        node = lab.add_node("node1")  # bench/controlplane.slice_obj puts every endpoint on "node1"
        api = FakeApiServer(listen_in(node.netns), bookmark_interval=30)
        api.apply(node_object("node1"))
        for s, sl in zip(services, slices, strict=True):
            api.apply(s)
            api.apply(sl)
        api.start()
        agent = LabAgent(
            lab,
            node,
            kubeconfig=api.kubeconfig(lab.run_dir / "kubeconfig"),
            extra_args=["--min-sync-period", "0", "--log-level", "info", "--metrics-bind-address", "",
                        "--healthz-bind-address", ""],
        )  # fmt: skip
        ipt_node = nft_node = None
        try:
            for r in range(cfg.cp_cold_repeats):
                log(f"control plane: cold programming, round {r + 1}/{cfg.cp_cold_repeats}")
                if r > 0:
                    agent.stop()
                    agent.kpr("cleanup", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir))
                agent.start()
                agent.wait_started(timeout=600)
                times = log_times(agent)
                first_sync = next(
                    json.loads(line)["seconds"]
                    for line in agent.log(this_run=True).splitlines()
                    if '"first full sync done"' in line
                )
                out["cold_seconds"]["kpr_agent_sync"].append(first_sync)
                out["cold_seconds"]["kpr_end_to_end"].append(
                    round(times["first full sync done"] - times["watching the Kubernetes API"], 3)
                )
                assert agent.proc is not None
                out["agent_rss_mib_after_cold_sync"] = round(rss_mib(agent.proc.pid), 1)
                ipt_node = lab.add_node(f"ipt{r}")
                out["cold_seconds"]["iptables_restore"] += timed_in(lab, ipt_node, [(IPTABLES_RESTORE, cold_iptables)])
                restore = out["cold_seconds"]["iptables_restore"][-1]
                log(f"  kpr {first_sync:.2f} s (agent's first sync), iptables-restore {restore:.2f} s")
            nft_node = None
            if cfg.cp_nftables:
                log("control plane: nft -f of kube-proxy's table for the same Services (one transaction)")
                nft_node = lab.add_node("nft")
                out["cold_seconds"]["nft"] += timed_in(lab, nft_node, [(["nft", "-f", "-"], cold_nft)], timeout=3600)
                log(f"  nft -f {out['cold_seconds']['nft'][-1]:.1f} s")
            assert ipt_node is not None
            if cfg.cp_backend_check:
                out["iptables_backends"] = backend_check(lab)
            changes(cfg, lab, api, node, ipt_node, nft_node, ruleset, out)
            assert agent.proc is not None
            out["agent_rss_mib_after_changes"] = round(rss_mib(agent.proc.pid), 1)
            lab.assert_host_isolated()
        finally:
            if agent.proc is not None:
                agent.stop()
                agent.kpr("cleanup", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir))
            api.stop()
    return out


def backend_check(lab: Lab, sizes: Sequence[int] = (1000, 2000, 4000)) -> list[dict[str, Any]]:
    """Cold iptables-restore of kube-proxy's rules (2 endpoints per Service) with both iptables backends."""
    log("control plane: iptables-nft vs iptables-legacy loading kube-proxy's rules at " + ", ".join(map(str, sizes)))
    rows = []
    for n in sizes:
        ports = kp.service_ports([service_obj(i) for i in range(n)], [slice_obj(i, 2) for i in range(n)])
        text = kp.IptablesRuleset(ports).restore_input()
        row: dict[str, Any] = {"services": n, "endpoints_per_service": 2}
        for backend in ("nft", "legacy"):
            node = lab.add_node(f"{backend[:3]}{n}")
            argv = [f"iptables-{backend}-restore", "-w", "--noflush", "--counters"]
            row[f"iptables_{backend}_seconds"] = round(timed_in(lab, node, [(argv, text)])[0], 3)
        log(f"  {json.dumps(row)}")
        rows.append(row)
    return rows


SETTLE = 0.3
"""Seconds of quiet before each interleaved control-plane measurement: each is timed on a settled machine, not in
the wake of the previous one (a full iptables-restore leaves the kernel freeing 100k chains)."""


def toggle(counts: dict[int, int], i: int, per: int) -> tuple[int, int]:
    """Service i's endpoint count before and after its next change (per -> per-1 -> per ...)."""
    have = counts.get(i, per)
    counts[i] = want = per - 1 if have == per else per
    return have, want


def endpoints(i: int, count: int, per: int) -> list[tuple[str, int]]:
    """The first `count` endpoints of filler Service i, as bench/controlplane.slice_obj makes them."""
    return [(endpoint_ip(i, e, per), 8080) for e in range(count)]


def changes(
    cfg: Config,
    lab: Lab,
    api: FakeApiServer,
    node: Node,
    ipt_node: Node,
    nft_node: Node | None,
    ruleset: kp.IptablesRuleset,
    out: dict[str, Any],
) -> None:
    """One endpoint removed from (or put back into) one Service at a time, spread over the whole set: kpr through the
    API server (to the map write), kube-proxy's iptables-restore (full or partial) and nft transaction."""
    n_services, per = cfg.cp_services, cfg.cp_endpoints
    log(
        f"control plane: one endpoint change at a time ({cfg.cp_kpr_changes} kpr, {cfg.cp_iptables_changes} iptables,"
        f" {cfg.cp_nft_changes} nftables), interleaved"
    )
    kpr_count: dict[int, int] = {}
    ipt_count: dict[int, int] = {}
    nft_count: dict[int, int] = {}
    maps = KprMaps(node.bpffs_dir)
    try:
        for n in range(max(cfg.cp_kpr_changes, cfg.cp_iptables_changes, cfg.cp_nft_changes)):
            i = (n * 7919) % n_services
            name = ("bench", f"svc{i}")

            interleaved = n < max(cfg.cp_iptables_changes, cfg.cp_nft_changes)
            if n < cfg.cp_kpr_changes:
                if interleaved:
                    time.sleep(SETTLE)
                _, want = toggle(kpr_count, i, per)
                started = time.perf_counter()
                api.apply(slice_obj(i, per, want))
                while maps.count(vip(i), 80) != want:
                    if time.perf_counter() - started > 10:
                        raise TimeoutError(f"kpr: change {n} of svc{i} not in the map after 10 s")
                    time.sleep(0.0001)  # lets the API server's threads in this process have the GIL
                out["change_ms"]["kpr"].append((time.perf_counter() - started) * 1000)
            if n < cfg.cp_iptables_changes:
                time.sleep(SETTLE)
                _, want = toggle(ipt_count, i, per)
                ruleset.replace(i, kp.with_endpoints(ruleset.ports[i], endpoints(i, want, per)))
                full = n % cfg.cp_full_every == 0
                text = ruleset.restore_input() if full else ruleset.restore_input(changed={name})
                seconds = timed_in(lab, ipt_node, [(IPTABLES_RESTORE, text)])[0]
                out["change_ms"]["iptables_full" if full else "iptables_partial"].append(seconds * 1000)
                out["input_bytes"]["iptables_full_change" if full else "iptables_partial_change"] = len(text)
            if n < cfg.cp_nft_changes and nft_node is not None:
                time.sleep(SETTLE)
                have, want = toggle(nft_count, i, per)
                old = kp.with_endpoints(ruleset.ports[i], endpoints(i, have, per))
                text = kp.nft_endpoint_change(old, kp.with_endpoints(old, endpoints(i, want, per)))
                seconds = timed_in(lab, nft_node, [(["nft", "-f", "-"], text)])[0]
                out["change_ms"]["nftables"].append(seconds * 1000)
                out["input_bytes"]["nft_change"] = len(text)
    finally:
        maps.close()


# --------------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0, 1k and 10k Services, shorter runs (a few minutes)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 0,1000,10000")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--crr-concurrency", type=int)
    parser.add_argument("--client-threads", type=int)
    parser.add_argument("--server-threads", type=int)
    parser.add_argument("--skip-datapath", action="store_true")
    parser.add_argument("--skip-controlplane", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every lab is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = make_config(args)
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg)}
    log(f"kpr benchmark ({'quick' if cfg.quick else 'full'}): {json.dumps(results['machine'])}")
    with tempfile.TemporaryDirectory(prefix="kpr-loadgen-") as tmp:
        loadgen = compile_loadgen(Path(tmp))
        if not args.skip_datapath:
            results["datapath"] = run_datapath(cfg, loadgen)
        if not args.skip_controlplane:
            results["controlplane"] = run_controlplane(cfg)
    results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results written to {path} after {results['elapsed_seconds']:.0f} s")
    from bench import report

    report.write(results, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
