"""The agent: sources -> store -> model -> reconciler -> maps, one coalesced batch at a time.

At start it loads and attaches the programs (replacing a previous agent's atomically) and adopts the pinned maps.
It programs nothing until the first list of every kind is in, so a restarting agent never removes a backend it
simply has not seen yet (until then the maps keep serving what they hold). The first full sync programs every
service and then prunes what no longer exists. After that, every change marks its services dirty; dirty services
are synced once `min_sync_period` has passed since the first of them, so bursts of events cost one write each.
A periodic drift check compares the maps with the reconciler's state and repairs differences.
After a sync that ended UDP backends or frontends, their tc flows are deleted and the connected UDP sockets the
socket hooks pointed at them destroyed; backends and frontends kept only for tracked TCP flows are released once no
live flow names them (checked then and every FLOW_CHECK_PERIOD).
On SIGTERM it stops and leaves programs and maps in place.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kpr import log
from kpr.agent.healthcheck import HealthChecks
from kpr.agent.metrics import DatapathCounters, Metrics
from kpr.agent.store import Store
from kpr.datapath import abi, migrate, netns, sockets
from kpr.datapath.addresses import AddressWatch, local_addresses
from kpr.datapath.flows import collect_expired, scan_flows
from kpr.datapath.inspect import nodeport_addresses_from, read_counters
from kpr.datapath.loader import (
    DatapathError,
    DatapathSettings,
    attach_socket_programs,
    attach_tc_programs,
    attached_tc_filters,
    default_route_devices,
    load_isolated,
    lock_bpffs,
)
from kpr.datapath.writers import MapWriteError, MapWriter, PinnedMapWriter
from kpr.model.nodeports import nodeport_addresses
from kpr.model.translate import local_ready_endpoints, needs_health_check, node_eligible, translate
from kpr.model.types import EndpointSliceSpec, Frontend, NodeInfo, ServiceKey, ServiceSpec
from kpr.objects.convert import gc_paused
from kpr.objects.events import KINDS, Event, Kind, Replace, Source, SourceError, Upsert
from kpr.reconcile.reconciler import BulkLoadError, FlowEnds, Reconciler, ServiceSyncError, SyncResult

RETRY_BACKOFF = (0.5, 1, 2, 5, 10, 30)  # seconds before a failed service is tried again
NODE_GRACE_SECONDS = 10.0
FLOW_CHECK_PERIOD = 10.0  # seconds between looks at whether lingering backends still carry flows
NETNS_REFRESH_PERIOD = 1.0  # seconds between looks at the node's namespaces while source ranges are in use
DATAPATH_CHECK_PERIOD = 1.0  # seconds between looks at whether the programs are still attached and the maps pinned
CT_GC_PERIOD = 30.0  # seconds between collections of expired tc flows (ct4/ct6 are hashes: nothing evicts)
CT_GC_PERIOD_FULL = 5.0  # the same while the table is over CT_GC_BUSY full
CT_GC_BUSY = 0.75
EPISODE_QUIET = 60.0  # an exhaustion episode ends after this long without a drop; it is logged at most this often
# Datapath counters that mean a resource ran out, with what to say about it.
EXHAUSTION = {
    "tc_drop_ct_full": (
        "conntrack",
        "the tc path's conntrack table is full: new flows are dropped, established ones kept; raise --map-size ct=N",
    ),
    "tc_drop_snat_ports": (
        "masquerade ports",
        f"no free masquerade port ({abi.SNAT_PORT_MIN}-{abi.SNAT_PORT_MAX}) toward a backend: new flows to it "
        "are dropped until flows end",
    ),
}


@dataclass
class AgentConfig:
    node_name: str
    cgroup_root: Path
    bpffs_dir: Path
    manifests: Path | None = None
    kubeconfig: str | None = None  # with manifests None: this file, or in-cluster config when None
    map_sizes: dict[str, int] = field(default_factory=dict)
    min_sync_period: float = 0.1
    poll_interval: float = 0.2
    drift_check_period: float = 300.0
    sync_period: float = 30.0  # a queued change older than twice this makes /healthz fail, as in kube-proxy
    watch_idle_timeout: float = 90.0
    nodeport_addresses: tuple[str, ...] = ()  # --nodeport-addresses, parsed; empty: all
    devices: list[str] | None = None  # node devices for north-south traffic; None: those of the default routes
    socket_lb: str = "full"  # full | hostns-only (chained pods are served at their veth) | off
    external_cluster_ip: bool = False  # tc serves ClusterIPs to packets arriving on node devices
    cluster_cidrs: tuple[str, ...] = ()  # detect-local (kube-proxy's ClusterCIDR mode), one per family at most

    def datapath_settings(self) -> DatapathSettings:
        return DatapathSettings(self.socket_lb, self.external_cluster_ip, self.cluster_cidrs)


class Agent:
    def __init__(self, config: AgentConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.log = log.get("kpr.agent").bind(node=config.node_name)
        self.store = Store(NodeInfo(config.node_name))
        self.events: queue.Queue[Event | AddressesChanged] = queue.Queue()
        self.stop_event = threading.Event()
        self.synced_kinds: set[str] = set()
        self.programming = False  # True once the first full sync is done
        self.dirty: set[ServiceKey] = set()
        self.dirty_since: float | None = None
        self.retry_at: dict[ServiceKey, tuple[float, int]] = {}  # service -> (when, attempt)
        self.failing_since: dict[ServiceKey, float] = {}  # service -> its first failure in a row
        self.trigger_times: dict[ServiceKey, float] = {}  # oldest unapplied EndpointSlice change per service
        self.next_drift_check = time.monotonic() + config.drift_check_period
        self.next_flow_check = time.monotonic() + FLOW_CHECK_PERIOD
        self.lingering_seen = (0, 0)  # (backends, frontends) lingering at the last flow check
        self.last_sweep: dict[str, Any] = {}  # the last socket sweep's result, for `kpr status`
        self.next_netns_refresh = 0.0
        self.netns_written: dict[int, tuple[str, str]] = {}  # netns cookie -> (IPv4, IPv6) in netns_addrs
        self.local_addresses: list[str] = []  # the node's own addresses (its network namespace's)
        self.nodeport_written: dict[str, bool] = {}  # NodePort address -> loopback-only, as in nodeport_addrs4/6
        self.address_watch: AddressWatch | None = None
        self.reconciler: Reconciler | None = None
        self.source: Source | None = None
        self.devices: list[str] = []
        self.last_sync_wall = 0.0
        self.last_sync_seconds = 0.0
        self.started_wall = time.time()
        self.loop_beat = time.monotonic()  # the main loop's last turn, for /livez
        self.loop_started = time.monotonic()
        self.recent_errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.conflicted: dict[ServiceKey, tuple[str, ...]] = {}  # services waiting for a frontend another one holds
        self.bpffs_lock: int | None = None  # the flock on the bpffs directory (lock_bpffs)
        self.attach_due = False  # programs loaded and pinned, to be attached after the first full sync
        self.attached = False
        self.next_datapath_check = 0.0
        self.health_problem = ""  # set by fatal(): /healthz fails with it
        self.next_ct_gc = 0.0
        self.migrating: set[str] | None = None  # maps migrated by the loader: copy once more after attaching
        self.counters_seen: dict[str, int] = {}
        self.episodes: dict[str, dict[str, Any]] = {}  # resource -> its exhaustion episode (EXHAUSTION)
        self.exit_code = 0
        self.health_checks = HealthChecks(lambda: self.healthy()[0])

    # ---- lifecycle ----

    def start(self, writer: MapWriter | None = None, source: Source | None = None) -> None:
        """Take the bpffs directory, load and pin the programs, adopt the maps, then start the source. The programs
        are attached once the first full sync is in the maps (attach_programs).

        Tests without BPF pass a `writer` (the maps are then not attached to anything) and may pass a `source`
        (a fake one; events are put on `self.events` directly).
        """
        if writer is None:
            self.take_bpffs()
            devices = self.config.devices if self.config.devices is not None else default_route_devices()
            settings = self.config.datapath_settings()
            loaded = load_isolated(
                self.config.bpffs_dir, self.config.map_sizes, settings, tc=bool(devices) or settings.socket_lb != "full"
            )
            self.devices = devices
            self.attach_due = True
            self.migrating = set(loaded.copied)
            if loaded.migrated:
                self.log.warning(
                    "pinned maps of another shape replaced",
                    maps=loaded.migrated,
                    entries_copied_from=loaded.copied,
                    rebuilt=sorted(set(loaded.migrated) - self.migrating),
                )
            self.log.info(
                "programs loaded and pinned; they are attached once the maps hold the first full sync",
                compile_seconds=round(loaded.compile_seconds, 2),
                bpffs=str(self.config.bpffs_dir),
            )
            writer = PinnedMapWriter(self.config.bpffs_dir)
            self.metrics.registry.register(DatapathCounters(lambda: read_counters(self.config.bpffs_dir)))
            self.address_watch = AddressWatch(lambda: self.events.put(AddressesChanged())).start()
            self.local_addresses = local_addresses()
        self.reconciler = Reconciler(writer)
        restored = self.reconciler.restore()
        self.log.info(
            "maps adopted",
            frontends=restored.frontends,
            backends=restored.backends,
            services=restored.services,
            orphans=restored.orphans,
        )
        self._update_gauges()
        self.nodeport_written = nodeport_addresses_from(writer)  # a restart keeps them until told otherwise
        self.update_nodeport_addresses()
        self.source = source if source is not None else self._make_source()
        self.source.start()

    def take_bpffs(self) -> None:
        """Lock the bpffs directory for this agent's life (first of all: a second agent stops here, before it binds
        any port)."""
        if self.bpffs_lock is None:
            self.bpffs_lock = lock_bpffs(self.config.bpffs_dir)

    def _source_queue(self) -> queue.Queue[Event]:
        """The agent's queue as the sources see it: they put only their events on it."""
        return cast("queue.Queue[Event]", self.events)

    def _make_source(self) -> Source:
        if self.config.manifests is not None:
            from kpr.sources.manifests import ManifestPoller, ManifestSource

            manifests = ManifestSource(self.config.manifests, self.config.node_name)
            self.log.info("watching manifests", directory=str(self.config.manifests))
            return ManifestPoller(manifests, self._source_queue(), self.stop_event, self.config.poll_interval)
        from kpr.k8s.watch import ApiSource, api_client

        source = ApiSource(
            api_client(self.config.kubeconfig),
            self.config.node_name,
            self._source_queue(),
            idle_timeout=self.config.watch_idle_timeout,
            on_event_outcome=lambda outcome: self.metrics.kubernetes_events.labels(outcome=outcome).inc(),
        )
        self.log.info("watching the Kubernetes API", kubeconfig=self.config.kubeconfig or "in-cluster")
        return source

    def run(self, install_signals: bool = True) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        while not self.stop_event.is_set():
            self.step(self._idle_time())
        if self.exit_code == 0:
            self.log.info("stopped; programs stay attached and maps pinned so traffic keeps flowing")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.log.info("signal received", signal=signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self.health_checks.close()
        if self.address_watch is not None:
            self.address_watch.close()
        if self.source is not None:
            self.source.close()

    # ---- one turn of the loop ----

    def step(self, wait: float = 0.0) -> None:
        """Take every queued event (waiting up to `wait` for the first), then sync what is due."""
        self.loop_beat = time.monotonic()
        try:
            event = self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait()
        except queue.Empty:
            event = None
        while event is not None:
            self._take(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                event = None
        now = time.monotonic()
        if not self.programming:
            # The Node only refines (zone, NodePort addresses): past a grace period, start without it.
            node_late = now - self.loop_started > NODE_GRACE_SECONDS and "Node" not in self.synced_kinds
            if set(KINDS) <= self.synced_kinds or ({"Service", "EndpointSlice"} <= self.synced_kinds and node_late):
                if node_late:
                    self.log.warning(
                        "no Node list yet; programming without this node's facts", grace_seconds=NODE_GRACE_SECONDS
                    )
                self._first_sync()
            return
        due = {svc for svc, (when, _) in self.retry_at.items() if when <= now}
        if self.dirty and self.dirty_since is not None and now - self.dirty_since >= self.config.min_sync_period:
            due |= self.dirty
        if due:
            self.sync(due)
        if now >= self.next_flow_check:
            self.settle_flows()
        if now >= self.next_netns_refresh and self.reconciler is not None and self.reconciler.ranged_frontends:
            self.refresh_namespace_addresses()
        if now >= self.next_drift_check:
            self.check_drift()
        if self.attached and now >= self.next_datapath_check:
            self.check_datapath()
            self.watch_exhaustion()
        if self.attached and now >= self.next_ct_gc:
            self.collect_flows()

    def _idle_time(self) -> float:
        """Wait for events until a coalesced sync, a retry or a drift check falls due."""
        now = time.monotonic()
        deadlines = [now + 1.0, self.next_drift_check, self.next_flow_check]
        if self.reconciler is not None and self.reconciler.ranged_frontends:
            deadlines.append(self.next_netns_refresh)
        if self.dirty and self.dirty_since is not None:
            deadlines.append(self.dirty_since + self.config.min_sync_period)
        deadlines.extend(when for when, _ in self.retry_at.values())
        return max(0.0, min(deadlines) - now)

    def _take(self, event: Event | AddressesChanged) -> None:
        if isinstance(event, AddressesChanged):
            self.local_addresses = local_addresses()
            self.update_nodeport_addresses()
            return
        if isinstance(event, SourceError):
            self.metrics.source_errors.labels(kind=event.kind or "manifest", reason=event.reason).inc()
            self._remember_error(f"{event.kind or 'manifest'}: {event.message}")
            if event.reason == "invalid":
                self.metrics.invalid_objects.inc()
                self.log.error("invalid object ignored; its last good version stays in effect", error=event.message)
                if event.kind is not None and event.name:
                    self._report(event.kind, event.namespace, event.name, "InvalidObject", event.message)
            return
        if isinstance(event, Upsert) and isinstance(event.obj, EndpointSliceSpec) and event.obj.trigger_time:
            key = event.obj.service_key
            self.trigger_times[key] = min(self.trigger_times.get(key, event.obj.trigger_time), event.obj.trigger_time)
        primary_ips = self.store.node.primary_ips
        touched = self.store.apply(event)
        if self.store.node.primary_ips != primary_ips:  # --nodeport-addresses primary follows the Node
            self.update_nodeport_addresses()
        if isinstance(event, Replace) and event.kind not in self.synced_kinds:
            self.synced_kinds.add(event.kind)
            self.log.info("initial list in", kind=event.kind)
        if touched:
            if not self.dirty:
                self.dirty_since = time.monotonic()
            self.dirty |= touched

    def _first_sync(self) -> None:
        assert self.reconciler is not None
        started = time.monotonic()
        services = set(self.store.services) | self.reconciler.services()
        bulk = self.reconciler.pristine() and self._bulk_sync(services)
        if not bulk:
            self.sync(services)
        pruned = self.reconciler.prune(self.store.services)
        self.programming = True
        self.log.info(
            "first full sync done",
            services=len(self.store.services),
            pruned_operations=pruned,
            bulk=bulk,
            seconds=round(time.monotonic() - started, 3),
        )
        if self.attach_due:
            self.attach_programs()

    # ---- the programs ----

    def attach_programs(self) -> None:
        """Attach the pinned programs (replacing a previous agent's in one step): only now, with the maps complete,
        so no program ever serves from half-filled maps."""
        try:
            programs = attach_socket_programs(self.config.bpffs_dir, self.config.cgroup_root, self.config.socket_lb)
            tc = attach_tc_programs(self.config.bpffs_dir, self.devices) if self.devices else []
        except (DatapathError, OSError) as e:
            self.fatal(f"cannot attach the programs: {e}")
            return
        self.attach_due = False
        self.attached = True
        self.next_datapath_check = time.monotonic() + DATAPATH_CHECK_PERIOD
        # Exhaustion episodes count from here: a drop in the first second is this agent's to report, not its baseline.
        counters = read_counters(self.config.bpffs_dir)
        self.counters_seen = {counter: counters.get(counter, 0) for counter in EXHAUSTION}
        if self.migrating is not None:
            copied = migrate.finish(self.config.bpffs_dir, self.migrating)  # what the old programs wrote meanwhile
            self.migrating = None
            if copied:
                self.log.info("entries the previous programs wrote meanwhile copied over", entries=copied)
        self.log.info(
            "programs attached",
            cgroup=str(self.config.cgroup_root),
            programs=len(programs),
            devices=self.devices or "none (socket LB only)",
            tc_programs=len(tc),
        )

    def check_datapath(self) -> None:
        """Notice programs detached or maps unpinned behind the agent's back (`kpr cleanup --force`, another tool):
        detached programs are attached again; unpinned maps end the agent (it writes into maps nothing reads any
        more), so that a restart sets everything up afresh instead of a healthy-looking agent serving nothing."""
        self.next_datapath_check = time.monotonic() + DATAPATH_CHECK_PERIOD
        bpffs = self.config.bpffs_dir
        unpinned = [name for name in ("services4", "services6", "config") if not abi.map_pin(bpffs, name).exists()]
        if unpinned:
            self.fatal(f"maps unpinned from {bpffs} behind the agent's back ({', '.join(unpinned)}): exiting")
            return
        detached = []
        if self.config.socket_lb != "off":
            from kpr.datapath.loader import SOCKET_HOOKS, attached_programs

            ours = {p.hook for p in attached_programs(self.config.cgroup_root) if p.name in SOCKET_HOOKS.values()}
            detached += [f"{hook} on {self.config.cgroup_root}" for hook in SOCKET_HOOKS if hook not in ours]
        if self.devices:
            present = attached_tc_filters(self.devices)
            detached += [f"tc on {device}" for device in self.devices if present.get(device, 0) < 4]
        if detached:
            self.log.error("programs were detached behind the agent's back; attaching them again", detached=detached)
            self._remember_error(f"programs detached behind the agent's back: {', '.join(detached)}")
            self.metrics.reattached.inc()
            self.attach_programs()

    def collect_flows(self) -> None:
        """Delete expired tc flows (both entries of a flow, once both are idle past their lifetime)."""
        assert self.reconciler is not None
        collected = collect_expired(self.reconciler.writer)
        busy = collected.capacity and collected.kept / collected.capacity > CT_GC_BUSY
        self.next_ct_gc = time.monotonic() + (CT_GC_PERIOD_FULL if busy else CT_GC_PERIOD)
        self.metrics.flows_collected.inc(collected.deleted)
        if collected.deleted:
            self.log.debug("expired flows collected", entries=collected.deleted, left=collected.kept)

    def watch_exhaustion(self, counters: dict[str, int] | None = None) -> None:
        """Turn the datapath's exhaustion counters into episodes: one warning when one starts (and at most one a
        minute while it lasts), an info line when it ends, and /status for `kpr status`."""
        counters = read_counters(self.config.bpffs_dir) if counters is None else counters
        now = time.monotonic()
        for counter, (resource, advice) in EXHAUSTION.items():
            value = counters.get(counter, 0)
            moved = value - self.counters_seen.get(counter, value)
            self.counters_seen[counter] = value
            episode = self.episodes.get(resource)
            if moved > 0:
                if episode is None or not episode["active"]:
                    episode = {"active": True, "since": time.time(), "dropped": 0, "last_log": 0.0}
                    self.episodes[resource] = episode
                episode["dropped"] += moved
                episode["last_drop"], episode["last_drop_wall"] = now, time.time()
                if now - episode["last_log"] >= EPISODE_QUIET:
                    episode["last_log"] = now
                    self.log.warning(f"{resource} exhausted", detail=advice, dropped=episode["dropped"])
                    self._remember_error(f"{resource} exhausted: {advice} ({episode['dropped']} dropped so far)")
            elif episode is not None and episode["active"] and now - episode["last_drop"] >= EPISODE_QUIET:
                episode["active"] = False
                self.log.info(f"{resource} no longer exhausted", dropped=episode["dropped"])

    def fatal(self, message: str) -> None:
        """Stop with exit status 1: for states a restart repairs and the agent cannot."""
        self.log.error(message)
        self._remember_error(message)
        self.health_problem = message
        self.exit_code = 1
        self.stop()

    def _bulk_sync(self, services: set[ServiceKey]) -> bool:
        """The first sync into empty maps: every service translated, then all of them written at once, one batch per
        map (Reconciler.load_all), with the same outcome as syncing them one by one. False when that could not be
        done (no room, a write failed and was undone): the caller then syncs them one by one, which reports each
        service that does not fit."""
        assert self.reconciler is not None
        started = time.monotonic()
        ops_before = self.reconciler.ops_applied
        node, store = self.store.node, self.store
        inputs = [(key, store.services.get(key)) for key in sorted(services)]
        slices_of = {key: store.slices_of(key) for key, spec in inputs if spec is not None}
        # Translated one service at a time as load_all takes them: the frontends go once their entries are packed.
        translated = ((key, translate(spec, slices_of[key], node) if spec is not None else []) for key, spec in inputs)
        with gc_paused():  # hundreds of thousands of new objects, none of them in a cycle: no collection passes
            try:
                results = self.reconciler.load_all(translated)
            except BulkLoadError as e:
                self.log.warning("bulk first sync not possible; programming service by service", reason=str(e))
                return False
        for key, spec in inputs:  # what _sync_one does after a service is programmed
            self.dirty.discard(key)
            self.retry_at.pop(key, None)
            self.failing_since.pop(key, None)
            self._health_check(key, spec, slices_of.get(key))
            trigger = self.trigger_times.pop(key, None)
            if trigger is not None:
                self.metrics.programming_latency.observe(max(0.0, time.time() - trigger))
            conflicts = tuple(results[key].conflicts)
            if conflicts or key in self.conflicted:
                self._note_conflicts(key, conflicts, self.log.bind(service=str(key)))
        self._synced(started, ops_before)
        return True

    def sync(self, services: set[ServiceKey]) -> None:
        assert self.reconciler is not None
        started = time.monotonic()
        ops_before = self.reconciler.ops_applied
        for key in sorted(services):
            self.dirty.discard(key)
            self._sync_one(key)
        waiting = set(self.conflicted) - services
        if waiting and services - set(self.conflicted):
            # Another service changed: it may have given up an address a waiting one claims. (Nothing else can free
            # it, so a conflict waits for a change instead of retrying on a timer.)
            for key in sorted(waiting):
                self._sync_one(key)
        self._synced(started, ops_before)

    def _synced(self, started: float, ops_before: int) -> None:
        """After a sync: flows to end, namespace addresses for new source ranges, metrics."""
        assert self.reconciler is not None
        if self.reconciler.flow_ends or self._lingering_counts() != self.lingering_seen:
            self.settle_flows()
        if self.reconciler.ranged_frontends and not self.netns_written:
            self.refresh_namespace_addresses()  # the first source-ranged frontend: its clients' sources at once
        self.dirty_since = time.monotonic() if self.dirty else None
        self.last_sync_seconds = time.monotonic() - started
        self.last_sync_wall = time.time()
        self.metrics.sync_duration.observe(self.last_sync_seconds)
        self.metrics.map_operations.inc(self.reconciler.ops_applied - ops_before)
        self.metrics.last_sync.set(self.last_sync_wall)
        self._update_gauges()

    def _sync_one(self, key: ServiceKey) -> None:
        assert self.reconciler is not None
        spec = self.store.services.get(key)
        frontends = translate(spec, self.store.slices_of(key), self.store.node) if spec else []
        slog = self.log.bind(service=str(key))
        try:
            try:
                result = self.reconciler.sync_service(key, frontends)
            except ServiceSyncError as e:
                if not e.full:
                    raise
                result = self._make_room_and_sync(key, frontends, e, slog)
        except ServiceSyncError as e:
            _, attempt = self.retry_at.get(key, (0.0, 0))
            delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
            self.retry_at[key] = (time.monotonic() + delay, attempt + 1)
            self.failing_since.setdefault(key, time.monotonic())
            self.metrics.sync_errors.labels(reason=e.reason).inc()
            self._remember_error(str(e))
            slog.error("service not programmed; previous state kept", error=str(e), retry_in=delay)
            self._report("Service", key.namespace, key.name, "MapFull" if e.full else "ProgrammingFailed", str(e))
            return
        self.retry_at.pop(key, None)
        self.failing_since.pop(key, None)
        self._health_check(key, spec)
        trigger = self.trigger_times.pop(key, None)
        if trigger is not None:
            self.metrics.programming_latency.observe(max(0.0, time.time() - trigger))
        self._note_conflicts(key, tuple(result.conflicts), slog)
        if result.ops:
            # The first full sync logs one summary line instead of one per service.
            emit = slog.info if self.programming else slog.debug
            emit(
                "service programmed",
                frontends=len(frontends),
                operations=result.ops,
                backends=sum(len(f.backends) for f in frontends),
            )

    def _health_check(
        self, key: ServiceKey, spec: ServiceSpec | None, slices: list[EndpointSliceSpec] | None = None
    ) -> None:
        """Serve healthCheckNodePort with this node's ready endpoint count, frontends on this node or not."""
        if spec is None or not needs_health_check(spec):
            self.health_checks.remove(key)
            return
        slices = self.store.slices_of(key) if slices is None else slices
        counts = local_ready_endpoints(spec, slices, self.store.node)
        error = self.health_checks.set(key, spec.health_check_node_port, counts)
        if error:
            self.metrics.sync_errors.labels(reason="health_check_port").inc()
            self._remember_error(f"{key}: {error}")
            self.log.error("health check node port not served", service=str(key), error=error)
            self._report("Service", key.namespace, key.name, "FailedToStartServiceHealthcheck", error)

    def settle_flows(self) -> None:
        """End the flows of UDP backends that stopped serving or left (and of UDP frontends that went) as kube-proxy's
        conntrack cleanup does, destroy the connected UDP sockets pointed at them, and release what was kept only for
        tracked TCP flows once no live flow names it."""
        assert self.reconciler is not None
        rec = self.reconciler
        self.next_flow_check = time.monotonic() + FLOW_CHECK_PERIOD
        ends = rec.take_flow_ends()
        gone, rev_nats = rec.lingering()
        if not ends and not gone and not rev_nats:
            self.lingering_seen = (0, 0)
            return
        try:
            scan = scan_flows(
                rec.writer,
                ends.udp_backends.keys(),
                ends.udp_frontends.keys(),
                watch_backends=gone,
                watch_frontends=rev_nats,
            )
        except (MapWriteError, OSError) as e:
            self.log.warning("reading tracked flows failed; trying again", error=str(e))
            rec.flow_ends.udp_backends.update(ends.udp_backends)
            rec.flow_ends.udp_frontends.update(ends.udp_frontends)
            return
        if scan.udp_flows_ended:
            self.metrics.flows_ended.inc(scan.udp_flows_ended)
            self.log.info(
                "UDP flows of backends that stopped serving ended",
                entries=scan.udp_flows_ended,
                backends=sorted(_fmt(a) for a in ends.udp_backends.values()),
                frontends=sorted(_fmt(a) for a in ends.udp_frontends.values()),
            )
        released = rec.release_unused(scan.backends_in_use, scan.rev_nats_in_use)
        if released:
            self.log.info("backends and frontends kept for tracked flows released", entries=released)
        if scan.next_expiry_ns is not None:  # look again as soon as the flows holding them could have ended
            due = time.monotonic() + max(0.0, (scan.next_expiry_ns - time.monotonic_ns()) / 1e9) + 0.1
            self.next_flow_check = min(self.next_flow_check, due)
        self.lingering_seen = self._lingering_counts()
        self.metrics.lingering.labels(kind="backend").set(self.lingering_seen[0])
        self.metrics.lingering.labels(kind="frontend").set(self.lingering_seen[1])
        if ends:
            self._end_udp_sockets(ends)

    def update_nodeport_addresses(self) -> None:
        """Keep nodeport_addrs4/6, the node addresses NodePorts answer on, as --nodeport-addresses selects them from
        the node's own addresses: added before removed, so no address that stays ever goes missing."""
        assert self.reconciler is not None
        wanted = nodeport_addresses(self.config.nodeport_addresses, self.local_addresses, self.store.node.primary_ips)
        writer = self.reconciler.writer
        try:
            for addr, loopback in wanted.items():
                if self.nodeport_written.get(addr) != loopback:
                    flags = abi.U8(abi.NODEPORT_F_LOOPBACK if loopback else 0)
                    writer.update(*_nodeport_key(addr), flags)
                    self.nodeport_written[addr] = loopback
            for addr in sorted(set(self.nodeport_written) - set(wanted)):
                writer.delete(*_nodeport_key(addr))
                del self.nodeport_written[addr]
        except MapWriteError as e:
            self.log.error("NodePort addresses not programmed", error=str(e))
            self._remember_error(f"NodePort addresses: {e}")
            return
        self.log.info("NodePorts answer on", addresses=sorted(wanted))

    def refresh_namespace_addresses(self) -> None:
        """Keep netns_addrs, the source address of each of the node's network namespaces, for the socket hooks'
        loadBalancerSourceRanges check (an unbound socket has no source address yet at connect()). The host's is the
        node IP kube-proxy compares (the Node's first InternalIP), where known. Only while some frontend has ranges."""
        assert self.reconciler is not None
        self.next_netns_refresh = time.monotonic() + NETNS_REFRESH_PERIOD
        writer = self.reconciler.writer
        try:
            found = netns.addresses_of(netns.node_namespaces(self.config.cgroup_root))
        except OSError as e:
            self.log.warning("reading the node's network namespaces failed", error=str(e))
            return
        wanted = {a.cookie: (a.ipv4, a.ipv6) for a in found.values()}
        own = found.get("/proc/self/ns/net")
        if own is not None:
            primary = self.store.node.primary_ips
            v4 = next((ip for ip in primary if ":" not in ip), own.ipv4)
            v6 = next((ip for ip in primary if ":" in ip), own.ipv6)
            wanted[own.cookie] = (v4, v6)
        try:
            for netns_cookie, (v4, v6) in wanted.items():
                if self.netns_written.get(netns_cookie) != (v4, v6):
                    value = abi.DeviceInfo(
                        addr4=abi.be32_of_ipv4(v4) if v4 else 0,
                        addr6=abi.be32x4_of_ipv6(v6) if v6 else abi.Be32x4(),
                    )
                    writer.update("netns_addrs", abi.U64(netns_cookie), value)
                    self.netns_written[netns_cookie] = (v4, v6)
            for netns_cookie in set(self.netns_written) - set(wanted):
                writer.delete("netns_addrs", abi.U64(netns_cookie))
                del self.netns_written[netns_cookie]
        except MapWriteError as e:
            self.log.warning("writing namespace addresses failed", error=str(e))

    def _lingering_counts(self) -> tuple[int, int]:
        assert self.reconciler is not None
        backends, frontends = self.reconciler.lingering()
        return len(backends), len(frontends)

    def _end_udp_sockets(self, ends: FlowEnds) -> None:
        """Destroy connected UDP sockets of the node that the socket hooks pointed at an ended backend or frontend."""
        assert self.reconciler is not None
        started = time.monotonic()
        try:
            wanted = sockets.targets(self.reconciler.writer, ends.udp_backends.values(), ends.udp_frontends.keys())
        except (MapWriteError, OSError) as e:
            self.log.warning("reading socket translations failed", error=str(e))
            return
        namespaces = netns.node_namespaces(self.config.cgroup_root) if wanted else []
        result = sockets.destroy_connected_udp(wanted, namespaces)
        seconds = time.monotonic() - started  # reading sock_rev_nat included
        self.metrics.sockets_destroyed.inc(result.destroyed)
        self.metrics.socket_sweep_duration.observe(seconds)
        self.last_sweep = {
            "time": time.time(),
            "candidates": result.candidates,
            "namespaces": result.namespaces,
            "destroyed": result.destroyed,
            "seconds": round(seconds, 4),
        }
        self.log.info("connected UDP sockets of ended backends destroyed", **self.last_sweep, errors=result.errors)

    def check_drift(self) -> None:
        """Compare the maps with the state and repair what differs (something outside kpr changed them)."""
        assert self.reconciler is not None
        self.next_drift_check = time.monotonic() + self.config.drift_check_period
        drift = {name: counts for name, counts in self.reconciler.drift().items() if any(counts)}
        if not drift:
            return
        self.log.warning(
            "maps drifted from the agent's state; repairing",
            drift={k: dict(zip(("missing", "different", "unexpected"), v, strict=True)) for k, v in drift.items()},
        )
        for name in drift:
            self.metrics.drift_repairs.labels(map=name).inc()
        try:
            self.reconciler.repair()
        except MapWriteError as e:
            self.log.error("drift repair failed", error=str(e))

    # ---- health and status (read from the HTTP thread; plain attribute reads) ----

    def _remember_error(self, message: str) -> None:
        self.recent_errors.append({"time": time.time(), "error": message})

    def _report(self, kind: Kind, namespace: str, name: str, reason: str, message: str) -> None:
        """Where the agent logs that it could not use or program an object, the source also tells the object's owners
        (the API source: a Warning Event on it). Never blocks the loop, and a failure is only logged."""
        if self.source is None:
            return
        try:
            self.source.report(kind, namespace, name, reason, message)
        except Exception as e:
            self.log.warning("reporting to the source failed", kind=kind, object=f"{namespace}/{name}", error=str(e))

    def healthy(self) -> tuple[bool, str]:
        """kube-proxy's rule: healthy once synced, unless a queued change waits longer than twice the sync period."""
        now = time.monotonic()
        limit = 2 * self.config.sync_period
        if self.health_problem:
            return False, self.health_problem
        source_problem = self.source_problem()
        if source_problem:
            return False, source_problem
        if not self.programming:
            return False, "waiting for the first list of every kind"
        if self.dirty and self.dirty_since is not None and now - self.dirty_since > limit:
            return False, f"{len(self.dirty)} service change(s) queued for more than {limit:.0f}s"
        failing = [key for key, since in self.failing_since.items() if now - since > limit]
        if failing:
            return False, f"{len(failing)} service(s) failing to program for more than {limit:.0f}s"
        return True, "ok"

    def source_problem(self) -> str:
        """Why the source may not be followed (a dead or stalled reader), or "": a component that can die is watched,
        and /healthz and `kpr status` say so rather than report a healthy agent that no longer follows changes."""
        if self.source is None:
            return ""
        return self.source.problem(stalled_after=max(60.0, 2 * self.config.sync_period))

    def node_eligible(self) -> bool:
        return node_eligible(self.store.node)

    def alive(self) -> bool:
        return time.monotonic() - self.loop_beat < max(10.0, 2 * self.config.sync_period)

    def status(self) -> dict[str, Any]:
        healthy, reason = self.healthy()
        source: dict[str, Any] = (
            {"kind": "manifests", "directory": str(self.config.manifests)}
            if self.config.manifests is not None
            else {"kind": "kubernetes-api", "kubeconfig": self.config.kubeconfig or "in-cluster"}
        )
        watches = self.source.state() if self.source is not None else {}
        if watches:  # the API source's reflectors; the manifest poller has none
            source["watches"] = watches
        source["problem"] = self.source_problem()
        rec = self.reconciler
        return {
            "node": self.config.node_name,
            "pid": os.getpid(),
            "started": self.started_wall,
            "healthy": healthy,
            "health": reason,
            "synced": self.programming,
            "source": source,
            "cgroup_root": str(self.config.cgroup_root),
            "devices": self.devices,
            "socket_lb": self.config.socket_lb,
            "external_cluster_ip": self.config.external_cluster_ip,
            "cluster_cidrs": list(self.config.cluster_cidrs),
            "bpffs_dir": str(self.config.bpffs_dir),
            "last_sync": self.last_sync_wall or None,
            "last_sync_seconds": round(self.last_sync_seconds, 4),
            "queued_services": len(self.dirty),
            "failing_services": sorted(str(k) for k in self.retry_at),
            "services": len(rec.by_service) if rec else 0,
            "frontends": len(rec.frontends) if rec else 0,
            "backends": len(rec.backends) if rec else 0,
            "lingering_backends": self.lingering_seen[0],
            "lingering_frontends": self.lingering_seen[1],
            "last_socket_sweep": self.last_sweep or None,
            "recent_errors": list(self.recent_errors),
            "conflicts": {str(k): list(v) for k, v in sorted(self.conflicted.items())},
            "exhaustion": {
                resource: {
                    "active": e["active"],
                    "since": e["since"],
                    "last": e["last_drop_wall"],
                    "dropped": e["dropped"],
                    "advice": next(a for r, a in EXHAUSTION.values() if r == resource),
                }
                for resource, e in self.episodes.items()
            },
        }

    def _make_room_and_sync(
        self, key: ServiceKey, frontends: list[Frontend], full: ServiceSyncError, slog: Any
    ) -> SyncResult:
        """A map is too full for make-before-break (new backends written before the departing ones go): free first.
        The service drops the backends it is losing (kept, marked gone, while tracked flows use them), what no flow
        uses is released, and then the new ones are added. Between the two steps the service has only the backends
        it keeps; that beats keeping the departed ones until some other service shrinks."""
        assert self.reconciler is not None
        rec = self.reconciler
        slog.warning("map full; freeing the service's departing backends before adding new ones", error=str(full))
        kept = [
            dataclasses.replace(
                f,
                backends=tuple(b for b in f.backends if b.identity in rec.backends),
                internal_backends=None
                if f.internal_backends is None
                else tuple(b for b in f.internal_backends if b.identity in rec.backends),
                standby=tuple(b for b in f.standby if b.identity in rec.backends),
            )
            for f in frontends
        ]
        rec.sync_service(key, kept)
        self.settle_flows()  # releases what the service let go of, unless a tracked flow still uses it
        return rec.sync_service(key, frontends)

    def _note_conflicts(self, key: ServiceKey, conflicts: tuple[str, ...], slog: Any) -> None:
        """A frontend another service holds is a standing state, reported when it starts, changes and ends (not on
        every retry); the service gets the address once its holder lets go of it."""
        if conflicts == self.conflicted.get(key, ()):
            return
        if conflicts:
            self.conflicted[key] = conflicts
            for conflict in conflicts:
                self.metrics.sync_errors.labels(reason="conflict").inc()
                slog.warning("frontend held by another service; waiting for it to let go", detail=conflict)
                self._remember_error(f"{key}: {conflict}")
                self._report("Service", key.namespace, key.name, "FrontendConflict", conflict)
        else:
            del self.conflicted[key]
            slog.info("frontend conflict resolved")
        self.metrics.conflicts.set(len(self.conflicted))

    def _update_gauges(self) -> None:
        assert self.reconciler is not None
        self.metrics.services.set(len(self.reconciler.by_service))
        self.metrics.frontends.set(len(self.reconciler.frontends))
        self.metrics.backends.set(len(self.reconciler.backends))


class AddressesChanged:
    """An address of the node was added or removed (from the netlink watch): NodePort addresses follow."""


def _nodeport_key(addr: str) -> tuple[str, Any]:
    if ":" in addr:
        return "nodeport_addrs6", abi.NodePortAddr6(addr=abi.be32x4_of_ipv6(addr))
    return "nodeport_addrs4", abi.U32(abi.be32_of_ipv4(addr))


def _fmt(address: tuple[str, int, str]) -> str:
    addr, port, protocol = address
    return f"[{addr}]:{port}/{protocol}" if ":" in addr else f"{addr}:{port}/{protocol}"
