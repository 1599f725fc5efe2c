"""The agent's whole pipeline (events -> store -> translate -> reconciler) against in-memory maps, at 10k services."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from kpr.agent.agent import Agent, AgentConfig
from kpr.datapath.writers import MemoryMapWriter
from kpr.model.types import Endpoint, EndpointPort, EndpointSliceSpec, ServiceKey, ServicePort, ServiceSpec
from kpr.objects.events import Delete, Event, Replace, Source, Upsert
from tests.fakes import QuietSource

pytestmark = pytest.mark.unit


def make_service(i: int) -> ServiceSpec:
    return ServiceSpec(
        key=ServiceKey("bulk", f"svc{i}"),
        cluster_ips=(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",),
        ports=(ServicePort("http", "TCP", 80, 8080),),
    )


def make_slice(i: int, endpoints: int, first: int = 0) -> EndpointSliceSpec:
    return EndpointSliceSpec(
        namespace="bulk",
        name=f"svc{i}-abc",
        service_name=f"svc{i}",
        address_type="IPv4",
        endpoints=tuple(
            Endpoint(
                (f"10.{200 + (i * 16 + e) // 65536}.{(i * 16 + e) // 256 % 256}.{(i * 16 + e) % 256}",),
                node_name="node1",
            )
            for e in range(first, first + endpoints)
        ),
        ports=(EndpointPort("http", "TCP", 8080),),
    )


def started_agent(services: int, endpoints: int) -> tuple[Agent, MemoryMapWriter]:
    writer = MemoryMapWriter()
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=writer, source=QuietSource())
    agent.events.put(Replace("Service", tuple(make_service(i) for i in range(services))))
    agent.events.put(Replace("EndpointSlice", tuple(make_slice(i, endpoints) for i in range(services))))
    agent.events.put(Replace("Node", ()))
    agent.step()
    assert agent.programming
    return agent, writer


def test_nothing_is_programmed_before_every_kind_is_listed() -> None:
    writer = MemoryMapWriter()
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=writer, source=QuietSource())
    agent.events.put(Replace("Service", (make_service(1),)))
    agent.events.put(Replace("EndpointSlice", (make_slice(1, 3),)))
    agent.step()
    assert writer.ops == 0 and not agent.programming  # the Node list is not in yet
    agent.events.put(Replace("Node", ()))
    agent.step()
    assert agent.programming and writer.ops > 0


@pytest.mark.slow
def test_one_endpoint_change_at_10k_services_costs_a_constant_number_of_map_operations() -> None:
    agent, writer = started_agent(10_000, 10)
    assert len(agent.reconciler.frontends) == 10_000  # type: ignore[union-attr]
    assert len(writer.tables["backends4"]) == 100_000

    costs = []
    for i in (7, 5_000, 9_999):
        before = writer.ops
        agent.events.put(Upsert("EndpointSlice", make_slice(i, 9, first=1)))  # endpoint 0 gone
        agent.step()
        removed = writer.ops - before
        before = writer.ops
        agent.events.put(Upsert("EndpointSlice", make_slice(i, 10)))  # endpoint 0 back
        agent.step()
        costs.append((removed, writer.ops - before))
    # Removal: one slot rewritten, the master shrunk, the surplus slot deleted, the backend marked gone (tracked TCP
    # flows keep it) and, no flow naming it, deleted. Addition: the backend, one slot, the master.
    assert costs == [(5, 3)] * 3


def test_a_deleted_slice_removes_the_backends_and_a_deleted_service_everything() -> None:
    agent, writer = started_agent(3, 4)
    agent.events.put(Delete("EndpointSlice", "bulk", "svc1-abc"))
    agent.step()
    assert len(writer.tables["backends4"]) == 8
    for i in range(3):
        agent.events.put(Delete("Service", "bulk", f"svc{i}"))
    agent.step()
    assert all(not writer.tables[m] for m in ("services4", "backends4", "rev_nat4", "svc_names"))


def test_a_relist_keeps_the_last_good_version_of_an_object_that_is_invalid_now() -> None:
    agent, writer = started_agent(2, 2)
    before = len(writer.tables["services4"])
    agent.events.put(Replace("Service", (make_service(0),), keep=frozenset({("bulk", "svc1")})))
    agent.step()
    assert ServiceKey("bulk", "svc1") in agent.store.services
    assert len(writer.tables["services4"]) == before


def test_a_frontend_held_by_another_service_is_reported_once_and_taken_as_soon_as_its_owner_lets_go() -> None:
    """A conflict is a standing state, not a retryable error: one warning and one metric increment when it starts
    (it once warned every 0.5 s forever), and the waiting service gets the address in the batch that frees it."""
    agent, _ = started_agent(2, 2)
    waiting = ServiceKey("bulk", "aaa")
    thief = ServiceSpec(key=waiting, cluster_ips=make_service(0).cluster_ips, ports=make_service(0).ports)
    agent.events.put(Upsert("Service", thief))
    agent.step()

    def reported() -> float | None:
        return agent.metrics.registry.get_sample_value("kpr_sync_errors_total", {"reason": "conflict"})

    assert set(agent.conflicted) == {waiting} and reported() == 1
    assert agent.metrics.registry.get_sample_value("kpr_frontend_conflicts") == 1
    assert agent.retry_at == {}  # nothing to retry on a timer: only a change can free the address
    for i in range(3):  # other services change: the waiting one is tried again, quietly
        agent.events.put(Upsert("EndpointSlice", make_slice(1, 2, first=i + 1)))
        agent.step()
    assert reported() == 1 and "svc0" in agent.status()["conflicts"]["bulk/aaa"][0]
    agent.events.put(Delete("Service", "bulk", "svc0"))
    agent.step()
    assert agent.reconciler is not None and waiting in agent.reconciler.by_service
    assert agent.conflicted == {} and agent.metrics.registry.get_sample_value("kpr_frontend_conflicts") == 0


def test_a_full_backends_map_frees_the_departing_backends_before_adding_new_ones() -> None:
    """Reliability finding 6: backends map 7/8 full, a Service's 3 endpoints replaced by 3 new ones. Make-before-break
    needed 3 more entries first, failed with "map is full" and the Service kept its removed endpoints until some other
    Service shrank. Now the departing ones go first (released at once: no tracked flow uses them)."""
    writer = MemoryMapWriter({"backends4": 8})
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=writer, source=QuietSource())
    agent.events.put(Replace("Service", (make_service(0), make_service(1))))
    agent.events.put(Replace("EndpointSlice", (make_slice(0, 3), make_slice(1, 4))))
    agent.events.put(Replace("Node", ()))
    agent.step()
    assert len(writer.tables["backends4"]) == 7
    agent.events.put(Upsert("EndpointSlice", make_slice(0, 3, first=8)))  # three new endpoints, the old ones gone
    agent.step()
    assert agent.retry_at == {} and agent.failing_since == {}
    assert agent.reconciler is not None
    backends = {addr for (addr, _, _) in agent.reconciler.backends}
    assert backends == {ep.addresses[0] for s in (make_slice(0, 3, first=8), make_slice(1, 4)) for ep in s.endpoints}
    assert len(writer.tables["backends4"]) == 7


def test_running_out_of_backend_ids_fails_that_service_alone_and_it_is_retried() -> None:
    """Ids are not a map: running out of them is its own error (IdsExhausted), reported per service as a full map is
    (log, kpr_sync_errors_total{reason="backend ids"}, failing_services in /status) and retried with backoff."""
    agent, _ = started_agent(2, 2)
    assert agent.reconciler is not None
    ids = agent.reconciler.backend_ids
    ids.limit = len(ids.used)  # every id in use
    agent.events.put(Upsert("EndpointSlice", make_slice(1, 3)))  # svc1 gains a third endpoint
    agent.step()
    key = ServiceKey("bulk", "svc1")
    assert set(agent.retry_at) == {key} and agent.status()["failing_services"] == ["bulk/svc1"]
    assert agent.metrics.registry.get_sample_value("kpr_sync_errors_total", {"reason": "backend ids"}) == 1
    assert "bulk/svc1: backend ids: all 4 ids are in use" in agent.recent_errors[-1]["error"]
    ids.limit += 1
    agent.retry_at[key] = (0.0, 1)  # due now
    agent.step()
    assert agent.retry_at == {} and len(agent.reconciler.backends) == 5


def test_the_sources_and_the_fakes_are_sources(tmp_path: Path) -> None:
    from kubernetes import client

    from kpr.k8s.watch import ApiSource
    from kpr.sources.manifests import ManifestPoller, ManifestSource

    out: queue.Queue[Event] = queue.Queue()
    api_client = client.ApiClient()
    api = ApiSource(api_client, "node1", out)
    poller = ManifestPoller(ManifestSource(tmp_path, "node1"), out, threading.Event())
    try:
        for source in (api, poller, QuietSource()):
            assert isinstance(source, Source)
        assert set(api.state()) == {"Service", "EndpointSlice", "Node"} and poller.state() == {}
        assert api.problem(60.0) == poller.problem(60.0) == ""
        api.close()
        poller.close()
        assert api.stop.is_set() and poller.stop.is_set()
    finally:
        poller.source.close()
        api_client.close()


def test_exhaustion_is_an_episode_logged_once_a_minute_and_shown_until_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reliability findings 3 and 14: conntrack and masquerade ports running out was visible only in `kpr status -v`
    counters, without a log line. Now each is an episode: a warning when it starts and at most one a minute while
    it lasts, an info line when it ends, and /status (so the default `kpr status` warns)."""
    from kpr.agent import agent as agent_module

    agent, _ = started_agent(1, 1)
    clock = [1000.0]
    monkeypatch.setattr(agent_module.time, "monotonic", lambda: clock[0])
    agent.watch_exhaustion({"tc_drop_ct_full": 7})  # what the counters held when the agent started: no episode
    assert agent.status()["exhaustion"] == {}
    for drops in (9, 20, 31):  # three seconds in a row with drops
        clock[0] += 1
        agent.watch_exhaustion({"tc_drop_ct_full": drops})
    episode = agent.status()["exhaustion"]["conntrack"]
    assert episode["active"] and episode["dropped"] == 24 and "--map-size ct=" in episode["advice"]
    assert sum("conntrack exhausted" in e["error"] for e in agent.recent_errors) == 1  # not one per second
    clock[0] += agent_module.EPISODE_QUIET
    agent.watch_exhaustion({"tc_drop_ct_full": 31})
    assert not agent.status()["exhaustion"]["conntrack"]["active"]
    clock[0] += 5
    agent.watch_exhaustion({"tc_drop_ct_full": 32, "tc_drop_snat_ports": 0})  # a new episode starts afresh
    assert agent.status()["exhaustion"]["conntrack"]["dropped"] == 1


def test_a_source_that_stopped_following_makes_the_agent_unhealthy_and_says_why() -> None:
    """Reliability finding 1: the manifest reader thread died on a bad file while /healthz, /livez and kpr status
    said healthy. A source with a problem (a dead or stalled reader) now fails /healthz with its reason."""

    class Stalled(QuietSource):
        trouble = ""

        def problem(self, stalled_after: float) -> str:
            return self.trouble

    writer = MemoryMapWriter()
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    source = Stalled()
    agent.start(writer=writer, source=source)
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.events.put(Replace(kind, ()))  # type: ignore[arg-type]
    agent.step()
    assert agent.healthy() == (True, "ok")
    source.trouble = "no poll of /etc/kpr/manifests finished for 75 s"
    assert agent.healthy() == (False, source.trouble)
    assert agent.status()["source"]["problem"] == source.trouble
