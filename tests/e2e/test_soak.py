"""Chaos soak (issue "reliability"): steady traffic that must never fail while a seeded driver injects faults.

One lab node runs the agent under test against tests/e2e/fake_apiserver.py (listening inside the node); a second
node only hosts pods. For the whole run:

- east-west: a pod on node1 loops short TCP connections and UDP datagrams to the "steady" ClusterIP (socket LB);
- north-south: an external client holds TCP connections and a connected UDP socket to node1's NodePorts of
  "steady-np" (tc path: conntrack, DNAT, masquerade to node2's pod);

all to endpoints that never change, and none of it may fail. Meanwhile the driver picks a fault at random each round
(each kind once first, in random order, then any): the agent SIGKILLed right after a batch of endpoint changes and
restarted; the API cut for a few seconds and back with the same history; the API restored with a new history (410
Gone, relist); a burst of endpoint changes on the "churn" Services; a north-south burst to the "burst" NodePort that
fills the conntrack table (new flows dropped, counted and logged once per episode; the held flows kept). After every
fault the maps must converge within CONVERGENCE_BOUND to what the API holds (frontends and backends of every
Service), the held flows must still be in conntrack and busy, a churn ClusterIP must serve only its usable
endpoints, and the agent's RSS, threads and file descriptors are sampled.

The seed is printed (--soak-seed or $KPR_SOAK_SEED replays a run's choices); --soak-seconds (or $KPR_SOAK_SECONDS)
sets how long faults are injected, 60 s by default, 1800 s in `make soak`. The run ends with a markdown table of the
faults injected and survived and a summary of the steady traffic and the agent's resources.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kpr.datapath import abi
from kpr.datapath.inspect import read_backends, read_conntrack, read_counters, read_services
from kpr.datapath.writers import PinnedMapWriter
from kpr.lab import CLIENT_PATH, External, Lab, Node, Pod
from kpr.lab.cluster import (
    LabAgent,
    endpoint_slice,
    finish_client_loop,
    finish_holder,
    listen_in,
    pod_endpoints,
    pods_in_states,
    remove_manifest,
    service,
    start_client_loop,
    start_holder,
    wait_until,
    write_manifest,
)
from tests.e2e.fake_apiserver import FakeApiServer

pytestmark = [pytest.mark.e2e, pytest.mark.datapath, pytest.mark.slow, pytest.mark.soak]

Obj = dict[str, Any]

DEFAULT_SECONDS = 60.0
CT_ENTRIES = 8192  # --map-size ct=: 4096 flows (a flow takes an original and a reply entry); room for every
# masquerade port (SNAT_PORTS) taken at once
CONVERGENCE_BOUND = 30.0  # seconds after a fault for the maps to hold what the API holds
HELD_CONNECTIONS = 6
RSS_LIMIT_MIB, RSS_GROWTH_MIB, THREADS_LIMIT, FDS_LIMIT = 400, 64, 64, 256
SEGMENT = 5.0  # seconds per steady client loop; the next starts SEGMENT_OVERLAP before one ends
SEGMENT_OVERLAP = 0.5
BURST_EXCESS = 40  # flows a conntrack burst tries beyond the table's free room
BURST_TIMEOUT = 0.05  # a dropped SYN costs its client this long; a lab connection takes a millisecond
BURST_CLIENTS = 2  # parallel client processes of a burst
BULK = 60  # Services a kill's batch creates, re-points or deletes at once
EXHAUSTED_EVENTS = ("conntrack", "masquerade ports")  # the agent's "<resource> exhausted" warnings
EPISODE_QUIET = 60.0  # the agent logs an exhaustion episode at most once a minute (kpr/agent/agent.py)

SNAT_PORTS = abi.SNAT_PORT_MAX - abi.SNAT_PORT_MIN + 1
SNAT_BURST = 60  # flows a masquerade-port burst tries: about half of them to the remote backend
STEADY_VIP, STEADY_NP_VIP, BURST_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
NP_STREAM, NP_DNS, NP_BURST = 30900, 30953, 30800
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
CHURN_STATES = ("starting", "ready", "ready", "ready", "unready", "terminating", "stopping", "gone")

FAULTS = {  # kind -> how the table names it
    "kill": "agent SIGKILLed after a batch of changes, restarted",
    "api-cut": "API cut 1.5-3 s (503s, connections dropped), same history",
    "compact": "API restored with a new history (410 Gone, relist)",
    "churn": "20-50 rapid endpoint changes on the churn Services",
    "ct-full": "conntrack filled by a north-south burst",
    "snat-full": "every masquerade port toward a remote backend taken",
    "manifests": "node2's manifests rewritten: in place and slowly, broken then fixed, removed and re-added",
}
MANIFEST_VIP, MANIFEST_CHURN_VIP = "10.97.0.10", "10.97.0.11"
MANIFEST_WRITES = ("slow in place", "broken then fixed", "removed and re-added", "atomic rename")


# ---- records and the report -----------------------------------------------------------------------------------


@dataclass
class Round:
    kind: str
    started: float  # wall clock (time.time(), as the traffic tools record it)
    injected: float = 0.0  # wall clock when the fault was fully applied
    ended: float = 0.0
    convergence: float | None = None  # seconds from `injected` until the maps held what the API holds
    error: str | None = None
    traffic: list[str] = field(default_factory=list)  # steady traffic failures dated within this round
    detail: str = ""  # where a kill landed, how a 410 was told
    writes: int = 0  # API writes to the churn Services during the round
    dropped: int = 0  # new flows the full conntrack table dropped
    bursts: int = 0  # bursts it took to fill the table (collection may make room during one)

    @property
    def survived(self) -> bool:
        return self.error is None and not self.traffic


@dataclass(frozen=True)
class Sample:
    at: float
    pid: int
    rss_kib: int
    threads: int
    fds: int


def fault_table(rounds: Sequence[Round]) -> str:
    """A markdown table, one row per fault kind: injected, survived, the slowest convergence and what varied."""
    lines = [
        "| fault | injected | survived | max convergence | details |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, title in FAULTS.items():
        mine = [r for r in rounds if r.kind == kind]
        times = [r.convergence for r in mine if r.convergence is not None]
        worst = f"{max(times):.2f} s" if times else "-"
        details = ", ".join(f"{what}: {n}" for what, n in sorted(Counter(r.detail for r in mine if r.detail).items()))
        if kind == "ct-full" and mine:
            details = f"{sum(r.dropped for r in mine)} new flows dropped in {sum(r.bursts for r in mine)} bursts"
        elif kind == "manifests" and mine:
            details = ", ".join(f"{how}: {n}" for how, n in sorted(Counter(r.detail for r in mine).items()))
        elif kind == "snat-full" and mine:
            details = f"{sum(r.dropped for r in mine)} new flows dropped, all served again once the ports expired"
        elif kind in ("churn", "api-cut") and mine:
            details = f"{sum(r.writes for r in mine)} API writes in all"
        lines.append(f"| {title} | {len(mine)} | {sum(r.survived for r in mine)} | {worst} | {details} |")
    return "\n".join(lines)


def resource_summary(samples: Sequence[Sample]) -> str:
    if not samples:
        return "agent resources: no samples"
    rss = [s.rss_kib / 1024 for s in samples]
    threads = [s.threads for s in samples]
    fds = [s.fds for s in samples]
    return (
        f"agent resources over {len(samples)} samples of {len({s.pid for s in samples})} agent processes: "
        f"RSS {min(rss):.1f}-{max(rss):.1f} MiB (limit {RSS_LIMIT_MIB}), threads {min(threads)}-{max(threads)} "
        f"(limit {THREADS_LIMIT}), open files {min(fds)}-{max(fds)} (limit {FDS_LIMIT})"
    )


def traffic_summary(east_west: dict[str, Segments], held: dict[str, Any]) -> str:
    lines = []
    for what, segments in east_west.items():
        attempts = sum(s.result["attempts"] for s in segments)
        ok = sum(s.result["ok"] for s in segments)
        errors: Counter[str] = Counter()
        for s in segments:
            errors.update(s.result["errors"])
        lines.append(
            f"east-west {what}: {attempts} attempts in {len(segments)} loops, "
            f"{attempts - ok} failed {dict(errors) or ''}".rstrip()
        )
    conns = held.get("tcp", [])
    pings = sum(c["ok"] for c in conns)
    ended = [c for c in conns if c["end"] is not None or c["pod"] is None]
    lines.append(
        f"north-south held TCP to the NodePort: {len(conns)} connections, {pings} pings answered, {len(ended)} ended"
    )
    udp = held.get("udp", {})
    lines.append(
        f"north-south UDP to the NodePort: {len(udp.get('answers', []))} answers, {len(udp.get('failures', []))} "
        f"failures, longest silence {largest_gap(udp):.2f} s"
    )
    return "\n".join(lines)


def largest_gap(udp: dict[str, Any]) -> float:
    times = [when for when, _ in udp.get("answers", [])]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# ---- what the maps must hold ------------------------------------------------------------------------------------

Programmed = dict[str, tuple[str, frozenset[str]]]  # frontend -> (service, backend addresses of the default scope)
Injected = tuple[float, str, Callable[[], None] | None]  # (wall time, detail, check after convergence)


def expected_frontends(services: Sequence[Obj], slices: Sequence[Obj]) -> Programmed:
    """What node1's maps must hold for these objects, by kube-proxy's rules for the shapes this soak uses (IPv4,
    ClusterIP and NodePort with Cluster traffic policies, numeric target ports): a frontend per ClusterIP port and
    one at 0.0.0.0 per NodePort, backed by the ready endpoints, or the serving terminating ones when none is ready."""
    by_service: dict[tuple[str, str], list[Obj]] = defaultdict(list)
    for sl in slices:
        meta = sl["metadata"]
        by_service[(meta["namespace"], meta["labels"]["kubernetes.io/service-name"])].append(sl)
    out: Programmed = {}
    for svc in services:
        namespace, name, spec = svc["metadata"]["namespace"], svc["metadata"]["name"], svc["spec"]
        for port in spec["ports"]:
            proto = port["protocol"]
            ready: set[str] = set()
            fallback: set[str] = set()
            for sl in by_service[(namespace, name)]:
                number = next(
                    (p["port"] for p in sl["ports"] if (p["name"], p["protocol"]) == (port["name"], proto)), 0
                )
                for ep in sl["endpoints"] if number else []:
                    cond = ep["conditions"]
                    for addr in ep["addresses"]:
                        if cond["ready"]:
                            ready.add(f"{addr}:{number}/{proto}")
                        elif cond["serving"] and cond["terminating"]:
                            fallback.add(f"{addr}:{number}/{proto}")
            want = (f"{namespace}/{name}", frozenset(ready or fallback))
            out[f"{spec['clusterIP']}:{port['port']}/{proto}"] = want
            if spec.get("type") == "NodePort":
                out[f"0.0.0.0:{port['nodePort']}/{proto}"] = want
    return out


def tc_drops(node: Node) -> dict[str, int]:
    """The tc path's drop counters (every TC_ACT_SHOT is counted under one)."""
    return {name: n for name, n in read_counters(node.bpffs_dir).items() if name.startswith("tc_drop_")}


def programmed(node: Node) -> Programmed:
    out: Programmed = {}
    for row in read_services(node.bpffs_dir):
        problems = [p for scope in row.scopes for p in scope.problems]
        backends = frozenset(b.address for b in row.scopes[0].backends) if row.scopes else frozenset()
        out[row.frontend] = (row.service if not problems else f"{row.service} PROBLEMS {problems}", backends)
    return out


def difference(have: Programmed, want: Programmed) -> str:
    lines = []
    for fe in sorted(set(have) | set(want)):
        if have.get(fe) != want.get(fe):
            lines.append(f"  {fe}: maps {_fmt(have.get(fe))}, API {_fmt(want.get(fe))}")
    return "\n".join(lines) or "  (none)"


def _fmt(entry: tuple[str, frozenset[str]] | None) -> str:
    return "absent" if entry is None else f"{entry[0]} -> {sorted(entry[1])}"


# ---- the churn Services ------------------------------------------------------------------------------------------


@dataclass
class ChurnService:
    name: str
    vip: str
    node_ports: tuple[int, int] | None  # (http, dns) NodePorts, or a ClusterIP Service
    split: bool  # one EndpointSlice per node instead of a single one
    port: int = 80  # its http port; a churn step may move it
    present: bool = True
    states: dict[str, str] = field(default_factory=dict)  # churn pod name -> state of POD_CONDITIONS

    def service_object(self) -> Obj:
        ports: list[Any] = [("http", self.port, 8080, "TCP"), ("dns", 53, 8080, "UDP")]
        if self.node_ports is None:
            return service(self.name, [self.vip], ports)
        ports = [(*p, n) for p, n in zip(ports, self.node_ports, strict=True)]
        return service(self.name, [self.vip], ports, type="NodePort")

    def slice_name(self, pod: Pod) -> str:
        return f"{self.name}-{pod.node}" if self.split else f"{self.name}-v4"

    def slice_objects(self, pods: dict[str, Pod], only: str | None = None) -> list[Obj]:
        names = sorted({self.slice_name(p) for p in pods.values()})
        out = []
        for slice_name in names if only is None else [only]:
            members = {pods[n]: s for n, s in sorted(self.states.items()) if self.slice_name(pods[n]) == slice_name}
            out.append(endpoint_slice(self.name, pods_in_states(members), SLICE_PORTS, name=slice_name))
        return out


# ---- steady east-west loops, dated ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    started: float
    ended: float
    result: dict[str, Any]


Segments = list[Segment]


class SteadyLoops:
    """start_client_loop runs of SEGMENT seconds back to back, each starting before the previous one ends, so the
    traffic never pauses and a failure can be dated to within a few seconds."""

    def __init__(self, lab: Lab, where: Pod, host: str, port: int, proto: str) -> None:
        self.lab, self.where, self.host, self.port, self.proto = lab, where, host, port, proto
        self.segments: Segments = []
        self.problems: list[str] = []
        self._running: list[tuple[float, subprocess.Popen[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"steady-{proto}", daemon=True)

    def start(self) -> SteadyLoops:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_start = time.monotonic()
        while not self._stop.is_set():
            try:
                proc = start_client_loop(
                    self.lab,
                    self.where,
                    self.host,
                    self.port,
                    SEGMENT + SEGMENT_OVERLAP,
                    interval=0.02,
                    timeout=3.0,
                    proto=self.proto,
                )
            except Exception as e:  # the lab is closing
                self.problems.append(f"cannot start a loop: {e}")
                return
            self._running.append((time.time(), proc))
            next_start += SEGMENT
            while not self._stop.wait(min(0.2, max(0.0, next_start - time.monotonic()))):
                self._collect(block=False)
                if time.monotonic() >= next_start:
                    break
        self._collect(block=True)

    def _collect(self, block: bool) -> None:
        for started, proc in list(self._running):
            if not block and proc.poll() is None:
                continue
            try:
                result = finish_client_loop(proc, timeout=SEGMENT + 30)
            except Exception as e:
                self.problems.append(f"a loop started at {started:.1f} gave no result: {e}")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            else:
                self.segments.append(Segment(started, time.time(), result))
            self._running.remove((started, proc))

    def finish(self) -> Segments:
        self._stop.set()
        self._thread.join(SEGMENT + 60)
        return sorted(self.segments, key=lambda s: s.started)


# ---- the soak -------------------------------------------------------------------------------------------------


@dataclass
class Soak:
    lab: Lab
    api: FakeApiServer
    agent: LabAgent
    node1: Node
    client: Pod
    ext: External
    churn_pods: dict[str, Pod]
    churn: list[ChurnService]
    burst_remote: Pod  # the burst NodePort's backend on node2: its flows are masqueraded
    node2: Node  # its agent follows a directory of manifests
    manifests: Path
    client2: Pod  # on node2
    seed: int
    rng: random.Random = field(init=False)
    rounds: list[Round] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    changes: int = 0  # API writes made by churn steps
    # resource ("conntrack", "masquerade ports") -> (earliest, latest) wall time of its last "exhausted" line
    exhausted_log: dict[str, tuple[float, float]] = field(default_factory=dict)
    restarted_since_log: set[str] = field(default_factory=set)  # resources whose episode a restart forgot
    round: Round | None = None  # the one running
    bulk_present: bool = False  # whether the BULK Services exist

    manifest_churn: ChurnService = field(init=False)  # the Service of node2's churn file

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.manifest_churn = ChurnService("churn-m", MANIFEST_CHURN_VIP, None, split=False)
        self.manifest_churn.states = {name: "ready" for name in sorted(self.churn_pods)[:3]}

    def manifest_objects(self) -> tuple[list[Obj], list[Obj]]:
        """(steady file, churn file): what node2's agent must follow."""
        steady = [
            service("steady-m", [MANIFEST_VIP], [("http", 80, 8080, "TCP")]),
            endpoint_slice("steady-m", pod_endpoints(self.steady_pods), [("http", 8080, "TCP")]),
        ]
        churn = [self.manifest_churn.service_object(), *self.manifest_churn.slice_objects(self.churn_pods)]
        return steady, churn

    @property
    def steady_pods(self) -> list[Pod]:
        return [self.lab.pods[name] for name in ("st-1", "st-2", "st-3")]

    def manifest_expected(self) -> Programmed:
        steady, churn = self.manifest_objects()
        objects = steady + churn
        return expected_frontends(
            [o for o in objects if o["kind"] == "Service"], [o for o in objects if o["kind"] == "EndpointSlice"]
        )

    def manifest_converge(self, since: float, want: Programmed | None = None) -> float:
        want = self.manifest_expected() if want is None else want
        try:
            wait_until(lambda: programmed(self.node2) == want, CONVERGENCE_BOUND, "node2's maps to converge", 0.1)
        except TimeoutError:
            raise AssertionError(
                f"node2's maps not converged after {CONVERGENCE_BOUND}s:\n{difference(programmed(self.node2), want)}"
            ) from None
        return time.time() - since

    # ---- state

    def expected(self) -> Programmed:
        return expected_frontends(self.api.objects("Service"), self.api.objects("EndpointSlice"))

    def converge(self, since: float) -> float:
        """Seconds from `since` (wall clock) until the maps hold what the API holds; fails after the bound."""
        want = self.expected()
        try:
            wait_until(lambda: programmed(self.node1) == want, CONVERGENCE_BOUND, "the maps to converge", 0.1)
        except TimeoutError:
            have = programmed(self.node1)
            raise AssertionError(f"maps not converged after {CONVERGENCE_BOUND}s:\n{difference(have, want)}") from None
        return time.time() - since

    def held_flows(self) -> int:
        """The held north-south connections as the tc path tracks them: open and pinged within the last seconds."""
        frontend = f"{self.node1.ipv4}:{NP_STREAM}/TCP"
        return sum(
            1
            for r in read_conntrack(self.node1.bpffs_dir)
            if r.protocol == "TCP"
            and r.direction == "original"
            and r.frontend == frontend
            and r.source.startswith(f"{self.ext.ipv4}:")
            and not r.closing
            and r.idle_seconds < 5
        )

    def ct_entries(self) -> int:
        writer = PinnedMapWriter(self.node1.bpffs_dir, ["ct4"])
        try:
            return sum(1 for _ in writer.items("ct4"))
        finally:
            writer.close()

    def sample(self) -> None:
        proc = self.agent.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
            threads = len(os.listdir(f"/proc/{proc.pid}/task"))
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            if rss is not None:  # None: a zombie
                self.samples.append(Sample(time.time(), proc.pid, rss, threads, fds))

    def agent_alive(self) -> bool:
        return self.agent.proc is not None and self.agent.proc.poll() is None

    # ---- churn steps

    def churn_step(self) -> None:
        """One API write to a churn Service: mostly an endpoint's conditions, sometimes the Service itself."""
        svc = self.rng.choice(self.churn)
        pods = self.churn_pods
        self.changes += 1
        if self.round is not None:
            self.round.writes += 1
        if not svc.present:  # created again, with the endpoints it had
            svc.present = True
            for obj in [svc.service_object(), *svc.slice_objects(pods)]:
                self.api.apply(obj)
            return
        roll = self.rng.random()
        if roll < 0.03:  # deleted, as the EndpointSlice controller then deletes its slices
            svc.present = False
            self.api.delete("Service", svc.name)
            for name in sorted({svc.slice_name(p) for p in pods.values()}):
                self.api.delete("EndpointSlice", name)
        elif roll < 0.06:  # its port moves: the old frontend goes, a new one comes
            svc.port = 81 if svc.port == 80 else 80
            self.api.apply(svc.service_object())
        else:
            pod = pods[self.rng.choice(sorted(pods))]
            state = self.rng.choice(CHURN_STATES)
            if state == "gone":
                svc.states.pop(pod.name, None)
            else:
                svc.states[pod.name] = state
            self.api.apply(svc.slice_objects(pods, only=svc.slice_name(pod))[0])

    def bulk_step(self) -> None:
        """BULK ClusterIP Services created, all re-pointed to other churn pods, or all deleted, in one go."""
        assert self.round is not None
        pods = sorted(self.churn_pods.values(), key=lambda p: p.name)
        if self.bulk_present and self.rng.random() < 0.5:
            for i in range(BULK):
                self.api.delete("Service", f"bulk-{i}")
                self.api.delete("EndpointSlice", f"bulk-{i}-v4")
            self.bulk_present = False
        else:
            for i in range(BULK):
                if not self.bulk_present:
                    self.api.apply(service(f"bulk-{i}", [f"10.96.2.{i + 1}"], [("http", 80, 8080, "TCP")]))
                chosen = self.rng.sample(pods, self.rng.randint(1, 3))
                self.api.apply(endpoint_slice(f"bulk-{i}", pod_endpoints(chosen), [("http", 8080, "TCP")]))
            self.bulk_present = True
        self.round.writes += BULK * 2

    def check_churn_traffic(self) -> None:
        """A churn ClusterIP serves exactly from its usable endpoints, or refuses when it has none."""
        present = [s for s in self.churn if s.present]
        if not present:
            return
        svc = self.rng.choice(present)
        _, backends = self.expected()[f"{svc.vip}:{svc.port}/TCP"]
        names = {p.name for p in self.churn_pods.values() if f"{p.ipv4}:8080/TCP" in backends}
        got = self.lab.client(self.client, "tcp", svc.vip, svc.port, count=6, timeout=3)
        if names:
            assert got["errors"] == {} and set(got["served"]) <= names, f"{svc.name}: {got} (usable: {names})"
        else:
            assert got["errors"] == {"ECONNREFUSED": 6}, f"{svc.name} has no usable endpoint: {got}"

    # ---- faults: each returns the wall time it was fully applied at, a detail for the table and the checks to make
    # once the maps have converged

    def fault_kill(self) -> Injected:
        """SIGKILL in the middle of a sync: a batch of churn changes and BULK Services created, re-pointed or
        deleted at once (the agent writes a Service in well under a millisecond, so the batch must be big to be
        caught in the act), killed as soon as the agent logs the first Service of the batch programmed, or after a
        random delay. Where it landed is told by comparing the maps with the states before and after."""
        before = self.expected()
        log_size = self.agent.log_path.stat().st_size
        for _ in range(self.rng.randint(5, 20)):
            self.churn_step()
        self.bulk_step()
        after = self.expected()
        if self.rng.random() < 0.7:  # the agent writes dozens of Services in a few milliseconds: no time to lose
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: '"service programmed"' in self._log_since(log_size), 5, "a write", 0.001)
        else:
            time.sleep(self.rng.uniform(0.0, 0.1))
        self.agent.stop(signal.SIGKILL)
        have = programmed(self.node1)
        if before == after:
            landed = "no datapath change"
        else:
            landed = "before its sync" if have == before else "after its sync" if have == after else "mid-sync"
        self.agent.start()
        restarted = time.time()
        self.restarted_since_log = set(EXHAUSTED_EVENTS)
        self.agent.wait_started(60)
        return restarted, f"landed {landed}", None

    def _log_since(self, offset: int) -> str:
        with open(self.agent.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def fault_api_cut(self) -> Injected:
        lists = self.agent.log(this_run=True).count('"listed"')
        cut = self.rng.uniform(1.5, 3.0)
        began = time.monotonic()
        self.api.unavailable(cut)  # every request answered 503 with Retry-After
        self.api.restart(new_history=False)  # and every open connection, watches included, cut
        for _ in range(self.rng.randint(3, 10)):  # changes the agent must pick up when it resumes
            time.sleep(self.rng.uniform(0.0, cut / 10))
            self.churn_step()
        time.sleep(max(0.0, began + cut - time.monotonic()))

        def resumed_without_listing() -> None:  # the history is intact: the watches resume where they were
            wait_until(lambda: self.api.open_watches() >= 3, CONVERGENCE_BOUND, "the watches to resume")
            relists = self.agent.log(this_run=True).count('"listed"') - lists
            assert relists == 0, f"the agent listed {relists} times after a cut that lost no history"

        return time.time(), "", resumed_without_listing

    def fault_compact(self) -> Injected:
        lists = self.agent.log(this_run=True).count('"listed"')
        for _ in range(self.rng.randint(3, 10)):  # changes that only the relist may deliver
            self.churn_step()
        as_http = self.rng.random() < 0.5
        self.api.expired_as_http = as_http
        self.api.restart(new_history=True)

        def listed_again() -> None:  # Services, EndpointSlices and Nodes
            relisted = lambda: self.agent.log(this_run=True).count('"listed"') >= lists + 3  # noqa: E731
            wait_until(relisted, CONVERGENCE_BOUND, "the agent to list every kind again")

        return time.time(), "HTTP 410" if as_http else "410 in the stream", listed_again

    def fault_manifests(self) -> Injected:
        """node2's churn manifest written as people and tools write files: slowly in place (the agent must not use
        the half it may see), broken (the last good version stays in effect) then fixed, removed (its Service goes)
        and written again, or replaced atomically; each time with new endpoint states. The steady file is never
        touched and its ClusterIP serves throughout."""
        svc, pods = self.manifest_churn, self.churn_pods
        for name in sorted(pods):
            state = self.rng.choice(CHURN_STATES)
            if state == "gone":
                svc.states.pop(name, None)
            else:
                svc.states[name] = state
        _, churn = self.manifest_objects()
        path = self.manifests / "churn.yaml"
        how = self.rng.choice(MANIFEST_WRITES)
        if how == "slow in place":
            text = yaml.safe_dump_all(churn, sort_keys=False)
            with open(path, "w") as f:  # truncated, half written, a pause, the rest
                f.write(text[: len(text) // 2])
                f.flush()
                time.sleep(self.rng.uniform(0.2, 1.5))
                f.write(text[len(text) // 2 :])
        elif how == "broken then fixed":
            kept = programmed(self.node2)
            path.write_text("kind: Service\nmetadata: [not, a, mapping\n")
            time.sleep(2.0)  # two polls at least: the agent has seen it
            assert programmed(self.node2) == kept, "a broken manifest changed the maps"
            write_manifest(self.manifests, "churn.yaml", churn)
        elif how == "removed and re-added":
            remove_manifest(self.manifests, "churn.yaml")
            steady, _ = self.manifest_objects()
            steady_only = expected_frontends([steady[0]], [steady[1]])
            self.manifest_converge(time.time(), steady_only)  # its Service is gone from node2's maps
            write_manifest(self.manifests, "churn.yaml", churn)
        else:
            write_manifest(self.manifests, "churn.yaml", churn)
        injected = time.time()

        def node2_converged() -> None:
            self.manifest_converge(injected)
            _, backends = self.manifest_expected()[f"{MANIFEST_CHURN_VIP}:80/TCP"]
            names = {p.name for p in pods.values() if f"{p.ipv4}:8080/TCP" in backends}
            got = self.lab.client(self.client2, "tcp", MANIFEST_CHURN_VIP, 80, count=6, timeout=3)
            if names:
                assert got["errors"] == {} and set(got["served"]) <= names, f"churn-m: {got} (usable: {names})"
            else:
                assert got["errors"] == {"ECONNREFUSED": 6}, f"churn-m has no usable endpoint: {got}"

        return injected, how, node2_converged

    def fault_churn(self) -> Injected:
        for _ in range(self.rng.randint(20, 50)):
            self.churn_step()
        return time.time(), "", None

    def fault_ct_full(self) -> Injected:
        """Fill ct4 with short north-south connections: the flows beyond its size are dropped (their SYNs time out),
        never reset; the agent says so once per episode. Bursts again (at most twice) if collection made room."""
        drops_before = read_counters(self.node1.bpffs_dir)["tc_drop_ct_full"]
        lines_before = self.agent.log().count('"conntrack exhausted"')
        began = time.time()
        dropped, attempts, errors, bursts = 0, 0, Counter[str](), 0
        for attempt in range(1, 4):
            bursts = attempt
            flows = max(0, (CT_ENTRIES - self.ct_entries()) // 2) + BURST_EXCESS
            for result in self.burst(flows):
                attempts += result["attempts"]
                errors.update(result["errors"])
            dropped = read_counters(self.node1.bpffs_dir)["tc_drop_ct_full"] - drops_before
            if dropped:
                break
        ended = time.time()
        assert dropped > 0, f"{attempts} new flows did not fill the table ({dict(errors)})"
        assert set(errors) <= {"timeout"}, f"new flows must be dropped (their SYNs retried), never reset: {errors}"
        assert self.round is not None
        self.round.dropped = dropped
        self.round.bursts = bursts

        return ended, "", self.logged_once_per_episode("conntrack", began, ended, lines_before)

    def logged_once_per_episode(
        self, resource: str, began: float, ended: float, lines_before: int
    ) -> Callable[[], None]:
        """The check that the agent said "<resource> exhausted" once for an episode of drops from `began` to `ended`,
        and at most once a minute while drops go on (EPISODE_QUIET); `lines_before`: the lines before it began."""
        event = f'"{resource} exhausted"'
        last = self.exhausted_log.get(resource)
        fresh = last is None or resource in self.restarted_since_log or began - last[1] >= EPISODE_QUIET + 1
        quiet = not fresh and last is not None and ended + 3 - last[0] < EPISODE_QUIET - 1

        def logged_once() -> None:
            def lines() -> int:
                return self.agent.log().count(event) - lines_before

            if fresh:
                try:
                    wait_until(lambda: lines() >= 1, 10, f"the agent to log {event}")
                except TimeoutError:
                    told = [line[:200] for line in self.agent.log().splitlines() if "exhausted" in line][-4:]
                    raise AssertionError(f"{event} not logged; the agent's last such lines: {told}") from None
            time.sleep(max(0.0, ended + 2.5 - time.time()))  # the agent reads the counters every second
            new = lines()
            if fresh:
                assert new == 1, f"{new} {event} lines for one episode"
            elif quiet:
                assert new == 0, f"{event} logged again within {EPISODE_QUIET:.0f}s"
            else:
                assert new <= 1, f"{new} {event} lines for one burst"
            if new:
                self.exhausted_log[resource] = (began, time.time())
                self.restarted_since_log.discard(resource)

        return logged_once

    def fault_snat_full(self) -> Injected:
        """Every masquerade port toward the burst NodePort's remote backend taken: reply entries for all SNAT_PORTS
        written into ct4 as masqueraded flows in their closing state would hold them (4,536 real flows within their
        10 s closing lifetime is more than the lab's clients make beside the steady traffic). New flows that pick
        that backend are dropped and counted as tc_drop_snat_ports, never reset, and told once per episode; flows
        to the local backend and the held flows carry on; once the entries expire the ports are free again (the
        datapath takes an expired one over before the agent collects it) and every new flow is served."""
        # room for every port: a conntrack burst just before leaves the table full until its flows expire
        room = lambda: self.ct_entries() + SNAT_PORTS + 64 <= CT_ENTRIES  # noqa: E731
        wait_until(room, abi.CT_CLOSING_LIFETIME_S + 2 * CONVERGENCE_BOUND, "conntrack to have room", 0.5)
        counters = read_counters(self.node1.bpffs_dir)
        lines_before = self.agent.log().count('"masquerade ports exhausted"')
        remote = next(
            b for b in read_backends(self.node1.bpffs_dir) if b.address == f"{self.burst_remote.ipv4}:8080/TCP"
        )
        key = abi.CtKey4(
            src=abi.be32_of_ipv4(self.burst_remote.ipv4),
            dst=abi.be32_of_ipv4(self.node1.ipv4),
            sport=abi.be16_of_port(8080),
            proto=6,
            dir=abi.CT_REPLY,
        )
        value = abi.CtValue4(
            backend_id=remote.id,
            addr=abi.be32_of_ipv4(self.ext.ipv4),
            flags=abi.CT_F_SNAT | abi.CT_F_CLOSING,
            fe_addr=abi.be32_of_ipv4(self.node1.ipv4),
            fe_port=abi.be16_of_port(NP_BURST),
        )
        writer = PinnedMapWriter(self.node1.bpffs_dir, ["ct4"])
        began = time.time()
        try:
            filled, value.last_seen_ns = time.time(), time.monotonic_ns()  # bpf_ktime_get_ns's clock
            for port in range(abi.SNAT_PORT_MIN, abi.SNAT_PORT_MAX + 1):
                key.dport = abi.be16_of_port(port)
                if writer.lookup("ct4", key) is not None:
                    continue  # a real flow's: taken already, and not to be clobbered
                value.port = abi.be16_of_port(port)  # a client port, any will do
                writer.update("ct4", key, value)
        finally:
            writer.close()
        results = self.burst(SNAT_BURST, timeout=BURST_TIMEOUT)
        ended = time.time()
        after = read_counters(self.node1.bpffs_dir)
        dropped = after["tc_drop_snat_ports"] - counters["tc_drop_snat_ports"]
        errors = Counter[str]()
        for result in results:
            errors.update(result["errors"])
        assert dropped > 0, f"no flow dropped for want of a masquerade port ({dict(errors)})"
        assert after["tc_drop_ct_full"] == counters["tc_drop_ct_full"], "counted as a full conntrack table"
        assert set(errors) <= {"timeout"}, f"new flows must be dropped (their SYNs retried), never reset: {errors}"
        assert sum(r["ok"] for r in results) > 0, "flows to the local backend need no masquerade port"
        assert self.round is not None
        self.round.dropped = dropped
        logged_once = self.logged_once_per_episode("masquerade ports", began, ended, lines_before)

        def served_again() -> None:
            logged_once()
            # Expired entries free their ports at once (the datapath takes an expired one over), collected or not.
            time.sleep(max(0.0, filled + abi.CT_CLOSING_LIFETIME_S + 0.5 - time.time()))
            drops = tc_drops(self.node1)
            again = self.burst(20, timeout=3.0)  # a SYN retransmitted after 1 s on a busy machine is no failure...
            assert all(r["errors"] == {} for r in again), f"new flows after the ports expired: {again}"
            assert tc_drops(self.node1) == drops, "... but any packet the tc path dropped is"

        return ended, "", served_again

    def burst(self, flows: int, timeout: float = BURST_TIMEOUT) -> list[dict[str, Any]]:
        """`flows` short TCP connections from the external client to the burst NodePort, BURST_CLIENTS at once."""
        share = -(-flows // BURST_CLIENTS)
        argv = [sys.executable, "-I", "-S", str(CLIENT_PATH), "tcp", self.node1.ipv4, str(NP_BURST)]
        argv += ["--count", str(share), "--timeout", str(timeout)]
        procs = [self.lab.spawn(self.ext, argv, stdout=subprocess.PIPE, text=True) for _ in range(BURST_CLIENTS)]
        try:
            return [json.loads(p.communicate(timeout=share * timeout * 2 + 60)[0]) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    # ---- the driver

    def run_round(self, kind: str) -> Round:
        rnd = Round(kind, time.time())
        self.rounds.append(rnd)
        self.round = rnd
        fault: Callable[[], Injected] = getattr(self, "fault_" + kind.replace("-", "_"))
        try:
            rnd.injected, rnd.detail, check = fault()
            rnd.convergence = self.converge(rnd.injected)
            if check is not None:
                check()
            wait_until(lambda: self.held_flows() == HELD_CONNECTIONS, 10, f"{HELD_CONNECTIONS} held flows, busy")
            self.check_churn_traffic()
        except Exception as e:
            rnd.error = f"{type(e).__name__}: {e}"
        finally:
            rnd.ended = time.time()
            self.round = None
            self.sample()
        return rnd


def node_object(node: Node) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {}},
        "status": {"addresses": [{"type": "InternalIP", "address": node.ipv4}]},
    }


def soak_option(config: pytest.Config, name: str, env: str) -> str | None:
    value = config.getoption(name, default=None)
    return str(value) if value is not None else os.environ.get(env) or None


@pytest.fixture
def soak(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Soak]:
    seed_text = soak_option(request.config, "soak_seed", "KPR_SOAK_SEED")
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(2**32)
    lab = Lab()
    api: FakeApiServer | None = None
    try:
        node1, node2 = lab.add_node("node1"), lab.add_node("node2")
        steady = [lab.add_pod(n, name, stream_ports=(9000,)) for n, name in ((node1, "st-1"), (node1, "st-2"))]
        steady.append(lab.add_pod(node2, "st-3", stream_ports=(9000,)))
        churn_pods = {p.name: p for p in (lab.add_pod(node1 if i < 3 else node2, f"ch-{i + 1}") for i in range(6))}
        burst = [lab.add_pod(node1, "bu-1"), lab.add_pod(node2, "bu-2")]
        client = lab.add_pod(node1, "client", echo=False)
        ext = lab.add_external("ext")

        api = FakeApiServer(listen_in(node1.netns), bookmark_interval=0.5).start()
        for node in (node1, node2):
            api.apply(node_object(node))
        api.apply(service("steady", [STEADY_VIP], [("http", 80, 8080, "TCP"), ("dns", 53, 8080, "UDP")]))
        api.apply(endpoint_slice("steady", pod_endpoints(steady), SLICE_PORTS))
        np_ports: list[Any] = [("stream", 9000, 9000, "TCP", NP_STREAM), ("dns", 53, 8080, "UDP", NP_DNS)]
        api.apply(service("steady-np", [STEADY_NP_VIP], np_ports, type="NodePort"))
        api.apply(endpoint_slice("steady-np", pod_endpoints(steady), [("stream", 9000, "TCP"), ("dns", 8080, "UDP")]))
        api.apply(service("burst", [BURST_VIP], [("http", 80, 8080, "TCP", NP_BURST)], type="NodePort"))
        api.apply(endpoint_slice("burst", pod_endpoints(burst), [("http", 8080, "TCP")]))
        churn = [
            ChurnService("churn-a", "10.96.1.1", None, split=True),
            ChurnService("churn-b", "10.96.1.2", None, split=False),
            ChurnService("churn-c", "10.96.1.3", (30700, 30701), split=False),
        ]
        for svc in churn:
            svc.states = {name: "ready" for name in sorted(churn_pods)[:3]}
            for obj in [svc.service_object(), *svc.slice_objects(churn_pods)]:
                api.apply(obj)

        extra = ["--devices", "eth0", "--watch-idle-timeout", "3", "--map-size", f"ct={CT_ENTRIES}"]
        agent = LabAgent(lab, node1, kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"), extra_args=extra).start()
        client2 = lab.add_pod(node2, "client2", echo=False)
        manifests = tmp_path / "manifests-node2"
        soak = Soak(lab, api, agent, node1, client, ext, churn_pods, churn, burst[1], node2, manifests, client2, seed)
        steady_file, churn_file = soak.manifest_objects()
        write_manifest(manifests, "steady.yaml", steady_file)
        write_manifest(manifests, "churn.yaml", churn_file)
        LabAgent(lab, node2, manifests).start().wait_started()
        agent.wait_started()
        yield soak
        lab.assert_host_isolated()
    finally:
        if api is not None:
            api.stop()
        lab.close()


def stray_backends(s: Soak) -> list[str]:
    """Backends in the maps that no frontend uses, no flow holds and no EndpointSlice names any more."""
    named = {
        f"{addr}:{port['port']}/{port['protocol']}"
        for sl in s.api.objects("EndpointSlice")
        for ep in sl["endpoints"]
        for addr in ep["addresses"]
        for port in sl["ports"]
    }
    return [b.address for b in read_backends(s.node1.bpffs_dir) if not (b.frontends or b.flows or b.address in named)]


def date_failures(
    rounds: Sequence[Round], east_west: dict[str, Segments], held: dict[str, Any], t0: float
) -> list[str]:
    """Put each steady traffic failure into the rounds it overlaps; return those that fall between rounds."""
    failures: list[tuple[float, float, str]] = []  # (from, to, what), wall clock
    for what, segments in east_west.items():
        for seg in segments:
            if seg.result["errors"] or seg.result["ok"] != seg.result["attempts"]:
                failures.append((seg.started, seg.ended, f"east-west {what} {seg.result['errors']}"))
    for conn in held.get("tcp", []):
        if conn["pod"] is None or conn["end"] is not None:
            when = conn["ended"] or conn["opened"]
            failures.append((when, when, f"held connection to {conn['pod']} ended: {conn['end']}"))
    for when, reason in held.get("udp", {}).get("failures", []):
        failures.append((when, when, f"north-south UDP {reason}"))
    between = []
    for start, end, what in failures:
        text = f"{what} (+{start - t0:.1f}s..+{end - t0:.1f}s)"
        hit = [r for r in rounds if r.started <= end and start <= r.ended + 1.0]
        for r in hit:
            r.traffic.append(text)
        if not hit:
            between.append(text)
    return between


def test_steady_traffic_survives_random_faults(soak: Soak, request: pytest.FixtureRequest, capsys: Any) -> None:
    s = soak
    seconds = float(soak_option(request.config, "soak_seconds", "KPR_SOAK_SECONDS") or DEFAULT_SECONDS)

    def say(text: str) -> None:  # shown even when pytest captures output: a soak is watched while it runs
        with capsys.disabled():
            print(text, flush=True)

    say(f"\nsoak: seed {s.seed} (--soak-seed {s.seed} replays it), {seconds:.0f}s of faults, lab {s.lab.prefix}")
    s.converge(time.time())
    s.manifest_converge(time.time())
    holder = start_holder(
        s.lab,
        s.ext,
        tcp=(s.node1.ipv4, NP_STREAM),
        connections=HELD_CONNECTIONS,
        udp=(s.node1.ipv4, NP_DNS),
        interval=0.1,
        timeout=3.0,
    )
    loops = {
        "TCP to a ClusterIP": SteadyLoops(s.lab, s.client, STEADY_VIP, 80, "tcp").start(),
        "UDP to a ClusterIP": SteadyLoops(s.lab, s.client, STEADY_VIP, 53, "udp").start(),
        "TCP to a ClusterIP of node2's manifests": SteadyLoops(s.lab, s.client2, MANIFEST_VIP, 80, "tcp").start(),
    }
    t0 = time.time()
    try:
        wait_until(lambda: s.held_flows() == HELD_CONNECTIONS, 10, "the held connections to be tracked")
        s.sample()
        began = time.monotonic()
        kinds = list(FAULTS)
        first = s.rng.sample(kinds, len(kinds))  # every kind once, then any
        while time.monotonic() - began < seconds:
            rnd = s.run_round(first.pop(0) if first else s.rng.choice(kinds))
            took = f"{rnd.convergence:.2f}s" if rnd.convergence is not None else "-"
            sample = s.samples[-1] if s.samples else None
            say(
                f"  +{rnd.started - t0:6.1f}s {rnd.kind:8} {rnd.ended - rnd.started:4.1f}s "
                f"{'ok' if rnd.error is None else 'FAILED'} converged in "
                f"{took} {rnd.detail}".rstrip()
                + (f", {rnd.writes} writes" if rnd.writes else "")
                + (f", {rnd.dropped} flows dropped in {rnd.bursts} bursts" if rnd.bursts else "")
                + (f" | rss {sample.rss_kib / 1024:.0f} MiB, {sample.threads} threads" if sample else "")
                + (f"\n    {rnd.error}" if rnd.error else "")
            )
            if not s.agent_alive():
                break
            time.sleep(s.rng.uniform(0.5, 2.0))
        injecting = time.monotonic() - began
    finally:
        east_west = {what: loop.finish() for what, loop in loops.items()}
        held = finish_holder(holder)
    ended = time.time()

    problems = [p for loop in loops.values() for p in loop.problems]
    try:
        s.converge(time.time())
        wait_until(lambda: not stray_backends(s), CONVERGENCE_BOUND, "backends nothing uses to be released")
    except (AssertionError, TimeoutError) as e:
        problems.append(f"at the end: {e}: {stray_backends(s)}")
    problems += [f"between faults: {f}" for f in date_failures(s.rounds, east_west, held, t0)]
    report = "\n".join(
        [
            f"soak: seed {s.seed}, {injecting:.0f}s of faults in {len(s.rounds)} rounds, {ended - t0:.0f}s of steady "
            "traffic",
            "",
            fault_table(s.rounds),
            "",
            traffic_summary(east_west, held),
            resource_summary(s.samples),
        ]
    )
    say("\n" + report + "\n")

    failed = [
        f"round {i} ({r.kind}): {r.error or ''} {'; '.join(r.traffic)}"
        for i, r in enumerate(s.rounds)
        if not r.survived
    ]
    assert not failed and not problems, f"seed {s.seed}:\n" + "\n".join(failed + problems)
    for what, segments in east_west.items():
        assert segments and all(seg.result["errors"] == {} for seg in segments), what
        assert sum(seg.result["ok"] for seg in segments) > seconds * 10, f"east-west {what}: too few attempts"
    conns = held["tcp"]
    assert len(conns) == HELD_CONNECTIONS and all(c["pod"] and c["end"] is None for c in conns), conns
    assert held["udp"]["failures"] == [] and len(held["udp"]["answers"]) > seconds * 5, held["udp"]["failures"]
    if len(s.rounds) >= len(FAULTS):
        assert {r.kind for r in s.rounds} == set(FAULTS)

    # bounded resources: under generous limits, and no growth over the run (nor within one agent process's life)
    assert s.samples
    assert max(x.rss_kib for x in s.samples) < RSS_LIMIT_MIB * 1024, resource_summary(s.samples)
    assert max(x.threads for x in s.samples) < THREADS_LIMIT, resource_summary(s.samples)
    assert max(x.fds for x in s.samples) < FDS_LIMIT, resource_summary(s.samples)
    after_first = s.samples[1:] or s.samples
    assert after_first[-1].rss_kib <= after_first[0].rss_kib + RSS_GROWTH_MIB * 1024, resource_summary(s.samples)
    for pid in {x.pid for x in s.samples}:
        life = [x for x in s.samples if x.pid == pid]
        grew = (life[-1].rss_kib - life[0].rss_kib) / 1024
        assert grew <= RSS_GROWTH_MIB, f"agent {pid} grew by {grew:.0f} MiB over {len(life)} rounds"
