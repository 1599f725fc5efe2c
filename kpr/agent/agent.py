"""The agent: sources -> store -> model -> reconciler -> maps, one coalesced batch at a time.

At start it loads and attaches the programs (replacing a previous agent's atomically), adopts the pinned maps,
reads every source once, programs every service and only then prunes what no longer exists, so a restarting agent
never removes a backend it simply has not seen yet. On SIGTERM it stops and leaves programs and maps in place.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kpr import log
from kpr.agent.metrics import Metrics
from kpr.agent.store import Store
from kpr.datapath.loader import SocketLB
from kpr.datapath.writers import MapWriter, PinnedMapWriter
from kpr.model.translate import translate
from kpr.model.types import NodeInfo, ServiceKey
from kpr.reconcile.reconciler import Reconciler, ServiceSyncError
from kpr.sources.manifests import ManifestSource, Snapshot

RETRY_BACKOFF = (0.5, 1, 2, 5, 10, 30)  # seconds before a failed service is tried again


@dataclass
class AgentConfig:
    node_name: str
    manifests: Path
    cgroup_root: Path
    bpffs_dir: Path
    map_sizes: dict[str, int] = field(default_factory=dict)
    min_sync_period: float = 0.1
    poll_interval: float = 0.2
    nodeport_cidrs: list[str] | None = None


class Agent:
    def __init__(self, config: AgentConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.log = log.get("kpr.agent").bind(node=config.node_name)
        self.store = Store(NodeInfo(config.node_name))
        self.source = ManifestSource(config.manifests, config.node_name, config.nodeport_cidrs)
        self.dirty: set[ServiceKey] = set()
        self.dirty_since: float | None = None
        self.retry_at: dict[ServiceKey, tuple[float, int]] = {}  # service -> (when, attempt)
        self.stopping = False
        self._reported_errors: set[str] = set()
        self.reconciler: Reconciler | None = None

    # ---- lifecycle ----

    def start(self, writer: MapWriter | None = None) -> None:
        """Attach programs (unless a writer is given, as in tests without BPF), adopt maps, first full sync."""
        if writer is None:
            lb = SocketLB(self.config.bpffs_dir, self.config.cgroup_root, self.config.map_sizes)
            programs = lb.load_and_attach()
            self.log.info(
                "programs attached",
                cgroup=str(self.config.cgroup_root),
                programs=len(programs),
                compile_seconds=round(lb.compile_seconds, 2),
                bpffs=str(self.config.bpffs_dir),
            )
            writer = PinnedMapWriter(self.config.bpffs_dir)
        self.reconciler = Reconciler(writer)
        restored = self.reconciler.restore()
        self.log.info(
            "maps adopted",
            frontends=restored.frontends,
            backends=restored.backends,
            services=restored.services,
            orphans=restored.orphans,
        )
        snapshot = self.source.poll() or self.source.snapshot()
        self._take(snapshot)
        self.sync(set(self.store.services) | self.reconciler.services())
        pruned = self.reconciler.prune(self.store.services)
        if pruned:
            self.log.info("pruned entries left from before", operations=pruned)
        self._update_gauges()

    def run(self, install_signals: bool = True) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self.log.info("watching manifests", directory=str(self.config.manifests))
        while not self.stopping:
            self.step()
            time.sleep(self._idle_time())
        self.log.info("stopped; programs stay attached and maps pinned so traffic keeps flowing")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.log.info("signal received", signal=signal.Signals(signum).name)
        self.stopping = True

    # ---- one turn of the loop ----

    def step(self, now: Callable[[], float] = time.monotonic) -> None:
        snapshot = self.source.poll()
        if snapshot is not None:
            self._take(snapshot)
        t = now()
        due = {svc for svc, (when, _) in self.retry_at.items() if when <= t}
        if self.dirty and self.dirty_since is not None and t - self.dirty_since >= self.config.min_sync_period:
            due |= self.dirty
        if due:
            self.sync(due)

    def _idle_time(self) -> float:
        """Sleep until the next poll, or less when a coalesced sync or a retry falls due sooner."""
        now = time.monotonic()
        deadlines = [now + self.config.poll_interval]
        if self.dirty and self.dirty_since is not None:
            deadlines.append(self.dirty_since + self.config.min_sync_period)
        deadlines.extend(when for when, _ in self.retry_at.values())
        return max(0.0, min(deadlines) - now)

    def _take(self, snapshot: Snapshot) -> None:
        for error in snapshot.errors:
            if error not in self._reported_errors:
                self.log.error("invalid manifest; the last good version stays in effect", error=error)
                self.metrics.invalid_objects.inc()
        self._reported_errors = set(snapshot.errors)
        node = snapshot.node or NodeInfo(self.config.node_name)
        touched = self.store.replace_all(snapshot.services, snapshot.slices, node)
        if touched:
            if not self.dirty:
                self.dirty_since = time.monotonic()
            self.dirty |= touched

    def sync(self, services: set[ServiceKey]) -> None:
        assert self.reconciler is not None
        started = time.monotonic()
        ops_before = self.reconciler.ops_applied
        for key in sorted(services):
            self.dirty.discard(key)
            self._sync_one(key)
        self.dirty_since = time.monotonic() if self.dirty else None
        self.metrics.sync_duration.observe(time.monotonic() - started)
        self.metrics.map_operations.inc(self.reconciler.ops_applied - ops_before)
        self.metrics.last_sync.set_to_current_time()
        self._update_gauges()

    def _sync_one(self, key: ServiceKey) -> None:
        assert self.reconciler is not None
        spec = self.store.services.get(key)
        frontends = translate(spec, self.store.slices_of(key), self.store.node) if spec else []
        slog = self.log.bind(service=str(key))
        try:
            result = self.reconciler.sync_service(key, frontends)
        except ServiceSyncError as e:
            _, attempt = self.retry_at.get(key, (0.0, 0))
            delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
            self.retry_at[key] = (time.monotonic() + delay, attempt + 1)
            self.metrics.sync_errors.labels(reason=e.cause.map_name).inc()
            slog.error("service not programmed; previous state kept", error=str(e), retry_in=delay)
            return
        self.retry_at.pop(key, None)
        for conflict in result.conflicts:
            self.metrics.sync_errors.labels(reason="conflict").inc()
            slog.warning("frontend conflict", detail=conflict)
        if result.ops:
            slog.info(
                "service programmed",
                frontends=len(frontends),
                operations=result.ops,
                backends=sum(len(f.backends) for f in frontends),
            )

    def _update_gauges(self) -> None:
        assert self.reconciler is not None
        self.metrics.services.set(len(self.reconciler.by_service))
        self.metrics.frontends.set(len(self.reconciler.frontends))
        self.metrics.backends.set(len(self.reconciler.backends))
