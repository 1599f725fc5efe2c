"""Kubernetes Events (kpr/k8s/events.py): which reports become which writes, with the clocks injected, and a recorder
that never blocks or fails its caller; then the agent reporting where it logs (a conflict, a full map, an invalid
object) to its source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kpr.agent.agent import Agent, AgentConfig
from kpr.datapath.writers import MemoryMapWriter
from kpr.k8s import events
from kpr.k8s.events import Correlator, EventRecorder, Report, SinkError, Write
from kpr.model.types import Endpoint, EndpointPort, EndpointSliceSpec, ServiceKey, ServicePort, ServiceSpec
from kpr.objects.events import Replace, SourceError, Upsert
from tests.fakes import QuietSource

pytestmark = pytest.mark.unit

WALL = 1_780_000_000.0


def conflict(name: str = "web", note: str = "10.96.0.1:80/TCP is already served for default/other") -> Report:
    return Report("Service", "default", name, "FrontendConflict", note)


def correlator(**kwargs: Any) -> Correlator:
    return Correlator("kpr-node1", lambda kind, namespace, name: f"uid-{name}", **kwargs)


def test_the_first_report_creates_an_event_on_the_object_as_client_go_would() -> None:
    c = correlator()
    write = c.observe(conflict(note="x" * 2000), now=0.0, wall=WALL)
    assert isinstance(write, Write) and write.op == "create"
    body = write.series.body
    assert body["metadata"]["namespace"] == "default" and body["metadata"]["name"].startswith("web.")
    assert body["regarding"] == {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "web",
                                 "uid": "uid-web"}  # fmt: skip
    assert body["reportingController"] == "kpr" and body["reportingInstance"] == "kpr-node1"
    assert (body["type"], body["reason"], body["action"]) == ("Warning", "FrontendConflict", "Programming")
    assert len(body["note"]) == events.NOTE_LIMIT and body["eventTime"].endswith("Z")
    assert "series" not in body


def test_a_node_event_goes_to_default_with_the_kubelets_uid_convention() -> None:
    c = Correlator("kpr-node1")
    write = c.observe(Report("Node", "", "node1", "Starting", "kpr started", "Normal", "StartKpr"), 0.0, WALL)
    assert isinstance(write, Write)
    assert write.series.namespace == "default"
    assert write.series.body["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": "node1", "uid": "node1"}


def test_repeats_are_one_event_whose_series_count_is_patched_at_most_every_patch_every() -> None:
    c = correlator(patch_every=30.0)
    created = c.observe(conflict(), 0.0, WALL)
    assert isinstance(created, Write)
    c.written(created)
    first = c.observe(conflict(), 1.0, WALL + 1)  # the first repeat is written at once, as client-go does
    assert isinstance(first, Write) and first.op == "patch" and first.series is created.series
    assert first.series.patch() == {"series": {"count": 2, "lastObservedTime": events.micro_time(WALL + 1)}}
    c.written(first)
    for t in (2.0, 3.0, 4.0):
        assert c.observe(conflict(), t, WALL + t) == "aggregated"
    assert c.due(10.0) == []  # not yet: the last write was at 1.0
    (late,) = c.due(31.0)
    assert late.op == "patch" and late.count == 5 and late.series.patch()["series"]["count"] == 5
    c.written(late)
    assert c.due(100.0) == []  # nothing new to write
    assert len(c.series) == 1


def test_a_quiet_series_is_written_a_last_time_and_forgotten_then_a_repeat_is_a_new_event() -> None:
    c = correlator(patch_every=30.0, finish=360.0)
    created = c.observe(conflict(), 0.0, WALL)
    assert isinstance(created, Write)
    c.written(created)
    patched = c.observe(conflict(), 1.0, WALL + 1)
    assert isinstance(patched, Write)
    c.written(patched)
    assert c.observe(conflict(), 2.0, WALL + 2) == "aggregated"
    (last,) = c.due(40.0)
    c.written(last)
    assert c.due(362.0) == [] and c.series == {}  # quiet: forgotten
    again = c.observe(conflict(), 400.0, WALL + 400)
    assert isinstance(again, Write) and again.op == "create" and again.series.name != created.series.name


def test_new_messages_about_one_object_and_reason_are_spam_filtered_then_refilled() -> None:
    c = correlator()
    outcomes = [c.observe(conflict(note=f"address {i}"), float(i) / 10, WALL) for i in range(events.SPAM_BURST + 2)]
    assert all(isinstance(o, Write) for o in outcomes[: events.SPAM_BURST])
    assert outcomes[events.SPAM_BURST :] == ["spam_filtered", "spam_filtered"]
    # another reason or another object is not held back
    assert isinstance(c.observe(Report("Service", "default", "web", "MapFull", "full"), 1.0, WALL), Write)
    assert isinstance(c.observe(conflict(name="api", note="address 99"), 1.0, WALL), Write)
    # one more new message per SPAM_REFILL seconds
    assert isinstance(c.observe(conflict(note="address 100"), 1.0 + events.SPAM_REFILL, WALL), Write)
    assert c.observe(conflict(note="address 101"), 2.0 + events.SPAM_REFILL, WALL) == "spam_filtered"


def test_every_write_of_the_agent_is_rate_limited_overall() -> None:
    c = correlator()
    outcomes = [c.observe(conflict(name=f"svc{i}"), 0.0, WALL) for i in range(events.RATE_BURST + 1)]
    assert all(isinstance(o, Write) for o in outcomes[:-1]) and outcomes[-1] == "rate_limited"
    assert c.observe(conflict(name="svc-late"), 0.0, WALL) == "rate_limited"
    assert isinstance(c.observe(conflict(name="svc-late"), 1.0, WALL), Write)  # RATE_PER_SECOND later
    # a due patch waits for a token too, and is not lost meanwhile
    c2 = correlator(patch_every=0.0)
    created = c2.observe(conflict(), 0.0, WALL)
    assert isinstance(created, Write)
    c2.written(created)
    c2.rate.tokens, c2.rate.at = 0.0, 5.0
    assert c2.observe(conflict(), 5.0, WALL) == "aggregated"
    assert c2.due(5.5) == []
    (write,) = c2.due(6.0)
    assert write.count == 2


def test_the_caches_are_bounded() -> None:
    c = correlator(cache_size=3)
    for i in range(10):
        c.observe(conflict(name=f"svc{i}"), float(i), WALL)
    assert len(c.series) == 3 and len(c.spam) == 3
    assert [k[2] for k in c.series] == ["svc7", "svc8", "svc9"]


# ---- the recorder: the queue and the writes, driven without its thread ----


class Sink:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail  # answer every write with this status (0: accept)
        self.events: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self.calls.append(("create", body["metadata"]["name"]))
        if self.fail:
            raise SinkError(self.fail, "no")
        self.events[namespace, body["metadata"]["name"]] = dict(body)

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.calls.append(("patch", name))
        if self.fail:
            raise SinkError(self.fail, "no")
        if (namespace, name) not in self.events:
            raise SinkError(404, "not found")
        self.events[namespace, name].update(body)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def recorder(sink: Sink, clock: Clock, outcomes: list[str], queue_size: int = 100) -> EventRecorder:
    return EventRecorder(
        sink, "node1", on_outcome=outcomes.append, queue_size=queue_size, clock=clock, wall=lambda: WALL + clock.now
    )


def drain(r: EventRecorder) -> None:
    while not r.queue.empty():
        r.handle(r.queue.get_nowait())
    r.flush()


def test_the_recorder_writes_one_event_and_patches_its_series() -> None:
    sink, clock, outcomes = Sink(), Clock(), []
    r = recorder(sink, clock, outcomes)
    for _ in range(4):
        r.record(conflict())
    drain(r)
    ((_, event),) = sink.events.items()
    assert event["series"]["count"] == 2 and outcomes == ["created", "patched", "aggregated", "aggregated"]
    clock.now = events.PATCH_EVERY
    r.flush()
    assert event["series"]["count"] == 4 and outcomes[-1] == "patched"


def test_a_full_queue_drops_and_counts_and_never_blocks() -> None:
    sink, clock, outcomes = Sink(), Clock(), []
    r = recorder(sink, clock, outcomes, queue_size=2)
    for i in range(5):
        r.record(conflict(name=f"svc{i}"))  # the writer thread is not running: nothing is taken off
    assert outcomes == ["dropped"] * 3 and r.queue.qsize() == 2


def test_api_errors_are_counted_logged_once_and_the_next_report_tries_again(capsys: pytest.CaptureFixture[str]) -> None:
    sink, clock, outcomes = Sink(fail=403), Clock(), []
    r = recorder(sink, clock, outcomes)
    for i in range(3):
        r.record(conflict(name=f"svc{i}"))
    r.record(conflict(name="svc0"))  # its create failed: tried again, not taken for a repeat
    drain(r)
    assert outcomes == ["failed"] * 4 and [op for op, _ in sink.calls] == ["create"] * 4
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert text.count("Kubernetes Events cannot be written") == 1 and "deploy/clusterrole.yaml" in text
    sink.fail = 0
    r.record(conflict(name="svc0"))
    drain(r)
    assert outcomes[-1] == "created" and len(sink.events) == 1
    assert "Kubernetes Events are written again" in "".join(capsys.readouterr())


def test_a_patch_of_an_expired_event_creates_it_anew_with_its_series() -> None:
    sink, clock, outcomes = Sink(), Clock(), []
    r = recorder(sink, clock, outcomes)
    r.record(conflict())
    drain(r)
    sink.events.clear()  # the Event's TTL passed
    r.record(conflict())
    drain(r)
    ((_, event),) = sink.events.items()
    assert event["series"]["count"] == 2 and event["reason"] == "FrontendConflict"
    assert [op for op, _ in sink.calls] == ["create", "patch", "create"]


def test_the_recorder_thread_writes_in_the_background() -> None:
    sink, outcomes = Sink(), []
    r = EventRecorder(sink, "node1", on_outcome=outcomes.append)
    r.start()
    try:
        r.record(conflict())
        import time

        deadline = time.monotonic() + 5
        while not sink.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sink.events) == 1
    finally:
        r.close()


# ---- the agent reports where it logs ----


def svc(name: str, ip: str) -> ServiceSpec:
    return ServiceSpec(
        key=ServiceKey("default", name), cluster_ips=(ip,), ports=(ServicePort("http", "TCP", 80, 8080),)
    )


def slice_of(name: str, count: int, first: int = 1) -> EndpointSliceSpec:
    return EndpointSliceSpec(
        namespace="default",
        name=f"{name}-abc",
        service_name=name,
        address_type="IPv4",
        endpoints=tuple(Endpoint((f"10.244.0.{first + i}",), node_name="node1") for i in range(count)),
        ports=(EndpointPort("http", "TCP", 8080),),
    )


def test_the_agent_reports_a_conflict_a_full_map_and_an_invalid_object_to_its_source() -> None:
    writer = MemoryMapWriter({"backends4": 4})
    source = QuietSource()
    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=writer, source=source)
    agent.events.put(Replace("Service", (svc("web", "10.96.0.10"),)))
    agent.events.put(Replace("EndpointSlice", (slice_of("web", 2),)))
    agent.events.put(Replace("Node", ()))
    agent.step()
    assert agent.programming and source.reports == []

    agent.events.put(Upsert("Service", svc("thief", "10.96.0.10")))  # the same ClusterIP:port
    agent.step()
    assert source.reports == [
        ("Service", "default", "thief", "FrontendConflict",
         "10.96.0.10:80/TCP is already served for default/web; not programmed"),
    ]  # fmt: skip

    source.reports.clear()
    agent.events.put(Upsert("Service", svc("big", "10.96.0.20")))
    agent.events.put(Upsert("EndpointSlice", slice_of("big", 5, first=10)))  # 5 more backends: no room
    agent.step()
    ((kind, namespace, name, reason, message),) = source.reports
    assert (kind, namespace, name, reason) == ("Service", "default", "big", "MapFull") and "default/big" in message

    source.reports.clear()
    agent.events.put(SourceError("EndpointSlice", "default/bad: ports[0].port -1 is out of range", "invalid",
                                 "default", "bad"))  # fmt: skip
    agent.events.put(SourceError(None, "broken.yaml: not YAML", "invalid"))  # no object: nothing to report on
    agent.step()
    assert source.reports == [
        ("EndpointSlice", "default", "bad", "InvalidObject", "default/bad: ports[0].port -1 is out of range")
    ]


def test_a_source_whose_report_fails_does_not_stop_the_agent() -> None:
    class Broken(QuietSource):
        def report(self, kind: str, namespace: str, name: str, reason: str, message: str) -> None:
            raise RuntimeError("boom")

    agent = Agent(AgentConfig(node_name="node1", cgroup_root=Path("/"), bpffs_dir=Path("/"), min_sync_period=0))
    agent.start(writer=MemoryMapWriter(), source=Broken())
    agent.events.put(Replace("Service", (svc("web", "10.96.0.10"), svc("thief", "10.96.0.10"))))
    agent.events.put(Replace("EndpointSlice", (slice_of("web", 1),)))
    agent.events.put(Replace("Node", ()))
    agent.step()
    assert agent.programming and len(agent.conflicted) == 1


def test_both_sources_take_reports() -> None:
    from kpr.k8s.watch import ApiSource
    from kpr.objects.events import Source
    from kpr.sources.manifests import ManifestPoller

    for cls in (ApiSource, ManifestPoller):
        missing = [m for m in Source.__dict__ if not m.startswith("_") and not callable(getattr(cls, m, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
