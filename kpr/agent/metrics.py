"""Prometheus metrics of the agent, in a registry of its own (no process-global state in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sync_duration = Histogram(
            "kpr_sync_duration_seconds",
            "Time to apply one coalesced batch of changes to the maps",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.map_operations = Counter(
            "kpr_map_operations_total", "Map updates and deletes written by the reconciler", registry=r
        )
        self.sync_errors = Counter(
            "kpr_sync_errors_total",
            "Services whose change could not be applied (kept at their previous state)",
            ["reason"],
            registry=r,
        )
        self.invalid_objects = Counter(
            "kpr_invalid_objects_total", "Objects rejected as malformed (the last good version stays)", registry=r
        )
        self.source_errors = Counter(
            "kpr_source_errors_total",
            "Problems reading the sources (invalid objects, interrupted watches)",
            ["kind", "reason"],
            registry=r,
        )
        self.programming_latency = Histogram(
            "kpr_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its service's map write",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.drift_repairs = Counter(
            "kpr_drift_repairs_total", "Maps found different from the agent's state and rewritten", ["map"], registry=r
        )
        self.flows_ended = Counter(
            "kpr_udp_flows_ended_total",
            "tc-path conntrack entries deleted because their UDP backend stopped serving or their frontend went",
            registry=r,
        )
        self.sockets_destroyed = Counter(
            "kpr_udp_sockets_destroyed_total",
            "Connected UDP sockets destroyed because the backend they were sent to stopped serving or left",
            registry=r,
        )
        self.socket_sweep_duration = Histogram(
            "kpr_socket_sweep_duration_seconds",
            "Time to find and destroy such sockets in every network namespace of the node",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.lingering = Gauge(
            "kpr_lingering_entries",
            "Backends gone from every slice, and removed frontends, kept while tracked TCP flows still use them",
            ["kind"],
            registry=r,
        )
        self.services = Gauge("kpr_services", "Services programmed", registry=r)
        self.flows_collected = Counter(
            "kpr_flows_collected_total", "Expired tc-path conntrack entries deleted by the agent", registry=r
        )
        self.reattached = Counter(
            "kpr_programs_reattached_total",
            "Times the agent found its programs detached and attached them again",
            registry=r,
        )
        self.kubernetes_events = Counter(
            "kpr_kubernetes_events_total",
            "Reports about objects turned into Kubernetes Events, by outcome: created, patched (a series count), "
            "aggregated (counted, written later), spam_filtered, rate_limited, dropped (queue full), failed",
            ["outcome"],
            registry=r,
        )
        self.conflicts = Gauge(
            "kpr_frontend_conflicts", "Services waiting for a frontend address:port another service holds", registry=r
        )
        self.frontends = Gauge("kpr_frontends", "Frontends programmed", registry=r)
        self.backends = Gauge("kpr_backends", "Backends programmed", registry=r)
        self.last_sync = Gauge("kpr_last_sync_timestamp_seconds", "When the maps were last brought in step", registry=r)


class DatapathCounters:
    """The BPF programs' counters (the per-CPU `counters` map, summed), read at each scrape as
    kpr_datapath_events_total{event=...}: translations, rejects, and every kind of drop."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "kpr_datapath_events", "Events counted by kpr's BPF programs (bpf/kpr.h KPR_CNT_*)", labels=["event"]
        )
        for name, value in sorted(self.read().items()):
            family.add_metric([name], value)
        yield family
