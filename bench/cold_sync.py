"""Cold programming in the agent, without a lab: N Services x M endpoints from objects in memory into the maps.

    python bench/cold_sync.py [--services 10000] [--endpoints 10] [--rounds 3] [--no-bpf]   (as root for real maps)

Side by side in one run, each the minimum over --rounds (wall and CPU seconds of the agent's work):
  - bulk: the agent's first full sync into empty maps (Reconciler.load_all: one batch per map);
  - one by one: the same services synced service after service (what the first sync did before, and what a
    restart that adopts non-empty maps still does);
  - restart: a second agent adopting the maps the bulk round filled (restore + a first sync that changes nothing);
with the in-memory writer (the reconciler's own work) and, as root, with real maps pinned in a temporary bpffs
directory (programs compiled and pinned by the loader, never attached; removed afterwards). Also the list parse:
the API server's JSON for the same objects converted to kpr's dataclasses. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.controlplane import endpoint_ip, service_obj, slice_obj  # noqa: E402
from kpr import log  # noqa: E402
from kpr.agent.agent import Agent, AgentConfig  # noqa: E402
from kpr.datapath import abi  # noqa: E402
from kpr.datapath.writers import MapWriter, MemoryMapWriter, PinnedMapWriter  # noqa: E402
from kpr.objects.convert import endpoint_slice_from_dict, gc_paused, service_from_dict  # noqa: E402
from kpr.objects.events import Replace  # noqa: E402
from tests.fakes import QuietSource  # noqa: E402


def objects(services: int, per: int) -> tuple[bytes, bytes]:
    """The API server's list bodies for the Services and their EndpointSlices (bench/controlplane's objects)."""
    assert endpoint_ip(0, 0, per)  # the same generator the control-plane benchmark loads into its API server
    svc = {"metadata": {"resourceVersion": "1"}, "items": [service_obj(i) for i in range(services)]}
    eps = {"metadata": {"resourceVersion": "1"}, "items": [slice_obj(i, per) for i in range(services)]}
    return orjson.dumps(svc), orjson.dumps(eps)


def parse(bodies: tuple[bytes, bytes]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """What the reflectors do with a list page: orjson, then convert (kpr/k8s/watch.py)."""
    with gc_paused():
        services = tuple(service_from_dict(d) for d in orjson.loads(bodies[0])["items"])
        slices = tuple(endpoint_slice_from_dict(d) for d in orjson.loads(bodies[1])["items"])
    return services, slices


def agent_with(writer: MapWriter, listed: tuple[tuple[Any, ...], tuple[Any, ...]], bpffs: Path) -> Agent:
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=bpffs, min_sync_period=0))
    agent.start(writer=writer, source=QuietSource())  # type: ignore[arg-type]
    for kind, objs in (("Service", listed[0]), ("EndpointSlice", listed[1]), ("Node", ())):
        agent._take(Replace(kind, objs))  # type: ignore[arg-type]
    return agent


def timed(work: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    work()
    return time.perf_counter() - wall, time.thread_time() - cpu


def best(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {"wall_s": round(min(w for w, _ in samples), 3), "cpu_s": round(min(c for _, c in samples), 3)}


def rounds_with(
    make_writer: Callable[[], Iterator[MapWriter]], listed: Any, bpffs: Path, rounds: int
) -> dict[str, Any]:
    out: dict[str, list[tuple[float, float]]] = {"bulk": [], "one_by_one": [], "restart": []}
    for _ in range(rounds):
        for mode in ("bulk", "one_by_one"):
            for writer in make_writer():
                agent = agent_with(writer, listed, bpffs)
                if mode == "bulk":
                    out[mode].append(timed(agent._first_sync))
                    assert agent.programming
                    again = agent_with(writer, listed, bpffs)  # a restart: the maps are adopted
                    out["restart"].append(timed(again._first_sync))
                    again.health_checks.close()
                else:
                    out[mode].append(timed(lambda agent=agent: agent.sync(set(agent.store.services))))  # type: ignore[misc]
                assert agent.reconciler is not None and len(agent.reconciler.frontends) == len(listed[0])
                agent.health_checks.close()
    return {mode: best(samples) for mode, samples in out.items()}


@contextmanager
def pinned_maps() -> Iterator[Path]:
    from kpr.datapath.loader import DatapathSettings, load_isolated, unpin_all

    bpffs = Path("/sys/fs/bpf") / f"kprcold-{uuid.uuid4().hex[:8]}"
    bpffs.mkdir()
    try:
        load_isolated(bpffs, {}, DatapathSettings(), tc=False)
        yield bpffs
    finally:
        unpin_all(bpffs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bpf", action="store_true", help="in-memory maps only")
    args = parser.parse_args()
    log.configure("json", "warning")
    bodies = objects(args.services, args.endpoints)
    parses = [timed(lambda: parse(bodies)) for _ in range(args.rounds)]
    listed = parse(bodies)
    result: dict[str, Any] = {
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "list_parse": best(parses) | {"bytes": sum(map(len, bodies))},
    }

    def in_memory() -> Iterator[MapWriter]:
        yield MemoryMapWriter({name: 1 << 24 for name in abi.MAPS})  # no limit to speak of: the reconciler's work

    result["in_memory"] = rounds_with(in_memory, listed, Path("/"), args.rounds)
    if not args.no_bpf and os.geteuid() == 0:
        with pinned_maps() as bpffs:

            def real() -> Iterator[MapWriter]:
                from kpr.datapath.loader import DatapathSettings, load_isolated, unpin_all

                writer = PinnedMapWriter(bpffs)
                try:
                    yield writer
                finally:
                    writer.close()
                unpin_all(bpffs)  # empty maps for the next round: loaded and pinned afresh
                bpffs.mkdir()
                load_isolated(bpffs, {}, DatapathSettings(), tc=False)

            result["real_maps"] = rounds_with(real, listed, bpffs, args.rounds)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
