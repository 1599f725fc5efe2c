"""Kubernetes Events (events.k8s.io/v1) about the objects kpr could not program, written as a good citizen.

What client-go's recorder and broadcaster do (tools/events, and the EventCorrelator of tools/record), kept here:
- the caller never waits: `record` puts the report on a bounded queue (client-go's maxQueuedEvents, 1000) that one
  background thread writes from; a full queue drops the report and counts it;
- repeats are one Event: the same object, type, reason, action and note make a series, as in tools/events'
  isomorphic key (which also keys on the note here, so a new message is a new Event): the first repeat PATCHes
  `series` {count, lastObservedTime} at once, later ones at most every PATCH_EVERY, and a series idle for
  SERIES_FINISH (client-go's finishTime, 6 minutes) is written a last time and forgotten;
- new Events about one object and reason are limited by a token bucket (the spam filter of tools/record, keyed
  tighter: per reason, SPAM_BURST then one per SPAM_REFILL seconds), and every write by a global one;
- an API error never reaches the agent: a failed write is counted, the first of an episode is logged (with what to
  grant on 401/403), and a PATCH of an Event that is gone (their TTL is an hour) creates it anew, as recordEvent does.

`Correlator` decides, with no I/O and the clocks passed in; `EventRecorder` is the queue, the thread and the sink.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from kpr import log

CONTROLLER = "kpr"  # reportingController
QUEUE_SIZE = 1000  # reports waiting for the writer thread (client-go's maxQueuedEvents)
SERIES_FINISH = 360.0  # a series idle this long is written a last time and forgotten (client-go's finishTime)
PATCH_EVERY = 30.0  # a series' count is written at most this often after its first repeat
SPAM_BURST = 5  # new Events about one object and reason at once...
SPAM_REFILL = 300.0  # ...then one per this many seconds (tools/record: 25 per object, then one per 5 minutes)
RATE_BURST = 25  # writes (creates and patches) of the whole agent at once...
RATE_PER_SECOND = 1.0  # ...then this many a second
CACHE_SIZE = 4096  # series and spam buckets remembered, oldest forgotten first (tools/record's maxLruCacheEntries)
NOTE_LIMIT = 1024  # the API server refuses a longer note
FLUSH_EVERY = 1.0  # seconds between looks for series counts due to be written
REQUEST_TIMEOUT = (5, 10)  # (connect, read) seconds of one write: the writer thread waits at most this long

API_VERSIONS = {"Service": "v1", "Node": "v1", "EndpointSlice": "discovery.k8s.io/v1"}
EventType = Literal["Normal", "Warning"]
Outcome = Literal["created", "patched", "aggregated", "spam_filtered", "rate_limited", "dropped", "failed"]


@dataclass(frozen=True, slots=True)
class Report:
    """One thing to say about one object."""

    kind: str
    namespace: str  # "" for cluster-scoped objects (a Node): the Event then goes to "default", as client-go does
    name: str
    reason: str
    note: str
    type: EventType = "Warning"
    action: str = "Programming"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.namespace, self.name, self.type, self.reason, self.action, self.note)


@dataclass(slots=True)
class Series:
    """An Event written (or being written) and its repeats since."""

    name: str  # the Event's metadata.name
    namespace: str
    body: dict[str, Any]  # what was created
    count: int = 1  # occurrences so far
    written: int = 1  # the count the API server holds
    last_seen: float = 0.0  # monotonic
    last_seen_wall: float = 0.0
    last_write: float = 0.0  # monotonic

    def patch(self) -> dict[str, Any]:
        return {"series": {"count": self.count, "lastObservedTime": micro_time(self.last_seen_wall)}}


@dataclass(frozen=True, slots=True)
class Write:
    op: Literal["create", "patch"]
    series: Series
    key: tuple[str, ...]
    count: int  # the series count this write carries


@dataclass(slots=True)
class Bucket:
    """A token bucket: `burst` at once, refilled at `rate` a second."""

    burst: float
    rate: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def micro_time(wall: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_body(report: Report, instance: str, uid: str, wall: float) -> dict[str, Any]:
    """The events.k8s.io/v1 Event client-go's makeEvent builds (the name is the object's and the time in hex)."""
    regarding: dict[str, Any] = {"apiVersion": API_VERSIONS.get(report.kind, "v1"), "kind": report.kind}
    if report.namespace:
        regarding["namespace"] = report.namespace
    regarding["name"] = report.name
    if uid:
        regarding["uid"] = uid  # without it `kubectl describe` (which selects on the uid) would not show the Event
    note = report.note.encode()[:NOTE_LIMIT].decode(errors="ignore")
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{report.name}.{int(wall * 1e9):x}", "namespace": report.namespace or "default"},
        "eventTime": micro_time(wall),
        "reportingController": CONTROLLER,
        "reportingInstance": instance,
        "action": report.action,
        "reason": report.reason,
        "type": report.type,
        "regarding": regarding,
        "note": note,
    }


@dataclass
class Correlator:
    """Which reports become which writes; no I/O, the clocks are arguments (monotonic `now`, `wall` for the API)."""

    instance: str  # reportingInstance: kpr-<node>
    uid_of: Callable[[str, str, str], str] = lambda kind, namespace, name: ""
    patch_every: float = PATCH_EVERY
    finish: float = SERIES_FINISH
    cache_size: int = CACHE_SIZE
    series: collections.OrderedDict[tuple[str, ...], Series] = field(default_factory=collections.OrderedDict)
    spam: collections.OrderedDict[tuple[str, ...], Bucket] = field(default_factory=collections.OrderedDict)
    rate: Bucket = field(default_factory=lambda: Bucket(RATE_BURST, RATE_PER_SECOND))

    def observe(self, report: Report, now: float, wall: float) -> Write | Outcome:
        """A write to make now, or why there is none (the report was counted into a series, or limited)."""
        key = report.key
        known = self.series.get(key)
        if known is not None:
            self.series.move_to_end(key)
            known.count += 1
            known.last_seen, known.last_seen_wall = now, wall
            first_repeat = known.count == 2
            if (first_repeat or now - known.last_write >= self.patch_every) and self.rate.take(now):
                known.last_write = now
                return Write("patch", known, key, known.count)
            return "aggregated"  # written by due() later
        spam_key = key[:5]  # the object, the type and the reason
        bucket = self.spam.get(spam_key)
        if bucket is None:
            bucket = self.spam[spam_key] = Bucket(SPAM_BURST, 1 / SPAM_REFILL)
            _trim(self.spam, self.cache_size)
        self.spam.move_to_end(spam_key)
        if not bucket.take(now):
            return "spam_filtered"
        if not self.rate.take(now):
            return "rate_limited"
        uid = self.uid_of(report.kind, report.namespace, report.name)
        if not uid and report.kind == "Node":
            uid = report.name  # the kubelet's convention, which `kubectl describe node` also looks for
        body = event_body(report, self.instance, uid, wall)
        created = Series(body["metadata"]["name"], body["metadata"]["namespace"], body)
        created.last_seen, created.last_seen_wall, created.last_write = now, wall, now
        self.series[key] = created
        _trim(self.series, self.cache_size)
        return Write("create", created, key, 1)

    def due(self, now: float) -> list[Write]:
        """Counts not yet written whose time came, and the last write of series that went quiet (then forgotten)."""
        writes = []
        for key, s in list(self.series.items()):
            quiet = now - s.last_seen >= self.finish
            if s.count > s.written and (quiet or now - s.last_write >= self.patch_every) and self.rate.take(now):
                s.last_write = now
                writes.append(Write("patch", s, key, s.count))
            elif quiet and s.count == s.written:
                del self.series[key]
        return writes

    def written(self, write: Write) -> None:
        write.series.written = max(write.series.written, write.count)

    def failed(self, write: Write) -> None:
        """A create that failed is forgotten, so the next report tries again; a failed patch stays due."""
        if write.op == "create" and self.series.get(write.key) is write.series:
            del self.series[write.key]


def _trim(cache: collections.OrderedDict[Any, Any], size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


class SinkError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class Sink(Protocol):
    """Where Events go: the API server (ApiSink), or a test's list."""

    def create(self, namespace: str, body: dict[str, Any]) -> None: ...

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None: ...


class ApiSink:
    """POST and PATCH on /apis/events.k8s.io/v1 through the client's ApiClient (its auth and TLS), JSON in and out."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self._call("POST", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", body, "application/json")

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        path = f"/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}"
        self._call("PATCH", path, body, "application/strategic-merge-patch+json")

    def _call(self, method: str, path: str, body: dict[str, Any], content_type: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            params = self.api_client.param_serialize(
                method=method,
                resource_path=path,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api_client.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
            data = response.read()
        except ApiException as e:
            raise SinkError(e.status or 0, str(e.reason)) from e
        except Exception as e:  # urllib3's connection errors and the like: counted, never raised to the agent
            raise SinkError(0, f"{type(e).__name__}: {e}") from e
        if not 200 <= response.status < 300:
            try:
                message = str(orjson.loads(data).get("message") or "")
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                message = ""
            raise SinkError(response.status, message or str(response.reason))


class EventRecorder:
    """The bounded queue and the writer thread. `record` never blocks and never raises."""

    def __init__(
        self,
        sink: Sink,
        node_name: str,
        *,
        uid_of: Callable[[str, str, str], str] | None = None,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        queue_size: int = QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self.correlator = Correlator(f"{CONTROLLER}-{node_name}")
        if uid_of is not None:
            self.correlator.uid_of = uid_of
        self.on_outcome = on_outcome
        self.queue: queue.Queue[Report] = queue.Queue(maxsize=queue_size)
        self.clock, self.wall = clock, wall
        self.stop = threading.Event()
        self.failing = False  # in an episode of failed writes (logged at its start and at its end)
        self.counts: collections.Counter[str] = collections.Counter()
        self.log = log.get("kpr.k8s.events")
        self.thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def record(self, report: Report) -> None:
        try:
            self.queue.put_nowait(report)
        except queue.Full:
            self._count("dropped")

    # ---- the writer thread ----

    def _run(self) -> None:
        next_flush = 0.0
        while not self.stop.is_set():
            try:
                report: Report | None = self.queue.get(timeout=max(0.05, next_flush - self.clock()))
            except queue.Empty:
                report = None
            try:
                if report is not None:
                    self.handle(report)
                if self.clock() >= next_flush:  # a look over every series: once a second, not once a report
                    next_flush = self.clock() + FLUSH_EVERY
                    self.flush()
            except Exception as e:  # a bug here must not end the thread silently; nothing reaches the agent
                self.log.error("event recorder error", error=f"{type(e).__name__}: {e}")

    def handle(self, report: Report) -> None:
        decision = self.correlator.observe(report, self.clock(), self.wall())
        if isinstance(decision, Write):
            self._write(decision)
        else:
            self._count(decision)

    def flush(self) -> None:
        for write in self.correlator.due(self.clock()):
            self._write(write)

    def _write(self, write: Write) -> None:
        s = write.series
        try:
            if write.op == "create":
                self.sink.create(s.namespace, s.body)
            else:
                try:
                    self.sink.patch(s.namespace, s.name, s.patch())
                except SinkError as e:
                    if e.status != 404:
                        raise
                    # The Event expired (or was deleted): write it anew with its series, as client-go does.
                    self.sink.create(s.namespace, {**s.body, **s.patch()})
        except SinkError as e:
            self.correlator.failed(write)
            self._count("failed")
            if not self.failing:
                self.failing = True
                hint = (
                    {"hint": "the agent needs create and patch on events.k8s.io events (deploy/clusterrole.yaml)"}
                    if e.status in (401, 403)
                    else {}
                )
                self.log.warning(
                    "Kubernetes Events cannot be written; the agent goes on without them (logs and metrics stay)",
                    error=str(e)[:300],
                    **hint,
                )
            return
        self.correlator.written(write)
        self._count("created" if write.op == "create" else "patched")
        if self.failing:
            self.failing = False
            self.log.info("Kubernetes Events are written again", failed_so_far=self.counts["failed"])

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        try:
            self.on_outcome(outcome)
        except Exception as e:  # a metric callback must not break either side
            self.log.debug("event outcome not counted", error=str(e))
