"""Control-plane benchmark: the real agent process against an API server holding N Services x M endpoints.

Measures, in one run on one lab node:
- cold sync: from the agent starting to list the API to every service programmed in the maps;
- one EndpointSlice change -> its map write (p50/p99 over many changes, with --min-sync-period 0, so this is the
  latency after coalescing): the benchmark polls the service's master entry in the pinned map;
- agent RSS after the cold sync and after the changes.
Writes docs/benchmarks/controlplane.json and prints a summary. Everything runs inside lab namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kpr.datapath import abi, codec  # noqa: E402
from kpr.datapath.bpfsys import Map  # noqa: E402
from kpr.lab import Lab  # noqa: E402
from kpr.lab.cluster import LabAgent, listen_in  # noqa: E402
from tests.e2e.fake_apiserver import FakeApiServer  # noqa: E402


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def endpoint_ip(i: int, e: int, per: int) -> str:
    n = i * per + e
    return f"10.{128 + n // 65536}.{n // 256 % 256}.{n % 256}"


def service_obj(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip(i),
            "clusterIPs": [vip(i)],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def slice_obj(i: int, per: int, count: int | None = None) -> dict[str, Any]:
    n = per if count is None else count
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc{i}-abcde",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"svc{i}"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [endpoint_ip(i, e, per)], "conditions": {"ready": True}, "nodeName": "node1"}
            for e in range(n)
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def log_times(agent: LabAgent) -> dict[str, float]:
    times = {}
    for line in agent.log(this_run=True).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = rec.get("event")
        if event in ("programs attached", "watching the Kubernetes API", "first full sync done") and event not in times:
            times[event] = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(services: int, per: int, changes: int) -> dict[str, Any]:
    with Lab() as lab:
        node = lab.add_node("node1")
        api = FakeApiServer(listen_in(node.netns), bookmark_interval=30)
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "status": {"addresses": []}})
        t = time.monotonic()
        for i in range(services):
            api.apply(service_obj(i))
            api.apply(slice_obj(i, per))
        print(
            f"api server loaded with {services} services x {per} endpoints in {time.monotonic() - t:.1f} s", flush=True
        )
        api.start()
        try:
            agent = LabAgent(
                lab,
                node,
                kubeconfig=api.kubeconfig(lab.run_dir / "kubeconfig"),
                extra_args=["--min-sync-period", "0", "--log-level", "info", "--metrics-bind-address", ""],
            ).start()
            agent.wait_started(timeout=300)
            times = log_times(agent)
            cold = times["first full sync done"] - times["watching the Kubernetes API"]
            startup = times["first full sync done"] - times["programs attached"]
            assert agent.proc is not None
            rss_cold = rss_mib(agent.proc.pid)
            spec = abi.MAPS["services4"]
            latencies = []
            with Map(str(abi.map_pin(node.bpffs_dir, "services4")), spec.key, spec.value) as services_map:
                for n in range(changes):
                    i = (n * 7919) % services  # spread over the whole set
                    key = codec.svc_key(vip(i), 80, "TCP", abi.SCOPE_DEFAULT, 0)
                    master = services_map.lookup(key)
                    assert master is not None
                    want = per - 1 if master.count == per else per
                    started = time.perf_counter()
                    api.apply(slice_obj(i, per, want))
                    while True:
                        m = services_map.lookup(key)
                        if m is not None and m.count == want:
                            break
                        if time.perf_counter() - started > 10:
                            raise TimeoutError(f"change {n} of svc{i} not applied in 10 s")
                    latencies.append((time.perf_counter() - started) * 1000)
            rss_after = rss_mib(agent.proc.pid)
        finally:
            api.stop()
    return {
        "services": services,
        "endpoints_per_service": per,
        "cold_sync_seconds": round(cold, 3),
        "programs_attached_to_programmed_seconds": round(startup, 3),
        "change_latency_ms": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p99": round(percentile(latencies, 0.99), 3),
            "max": round(max(latencies), 3),
            "mean": round(statistics.mean(latencies), 3),
            "count": len(latencies),
        },
        "agent_rss_mib": {"after_cold_sync": round(rss_cold, 1), "after_changes": round(rss_after, 1)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="1,000 services, 50 changes")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "controlplane.json")
    args = parser.parse_args()
    if args.quick:
        args.services, args.changes = 1_000, 50
    result = run(args.services, args.endpoints, args.changes)
    result["targets"] = {"cold_sync_seconds": 3.0, "change_latency_p99_ms": 5.0, "agent_rss_mib": 250}
    result["machine"] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["change_latency_ms"]
    print(
        f"cold sync of {args.services} services x {args.endpoints} endpoints, first list request to programmed "
        f"maps: {result['cold_sync_seconds']} s (target <= 3 s); from programs attached, including the API "
        f"client's start: {result['programs_attached_to_programmed_seconds']} s"
    )
    print(
        f"one EndpointSlice change -> map: p50 {lat['p50']} ms, p99 {lat['p99']} ms over {lat['count']} changes "
        f"(target p99 <= 5 ms)"
    )
    print(
        f"agent RSS: {result['agent_rss_mib']['after_cold_sync']} MiB after the cold sync, "
        f"{result['agent_rss_mib']['after_changes']} MiB after the changes (target <= 250 MiB)"
    )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
