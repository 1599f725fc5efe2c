"""List and watch Services, EndpointSlices and the agent's Node with the official client, on raw JSON.

The client's model deserialisation is the known bottleneck for big lists, so every call uses
`_preload_content=False` and the bytes are parsed with orjson straight into kpr's frozen dataclasses.

One Reflector per kind, each a thread, doing what client-go's reflector does:
- list (paginated), emit the whole set as a Replace, then watch from the list's resourceVersion with bookmarks;
- move the resume point on every event, bookmarks included;
- 410 Gone, in the stream or as an HTTP status: relist, which is a full resync that also removes what disappeared;
- a broken connection: resume the watch from the last resourceVersion after a backoff; 429/5xx honour Retry-After;
- a watch silent for longer than the idle timeout (a read timeout, since bookmarks should arrive) is restarted.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from kpr import log
from kpr.k8s.events import ApiSink, EventRecorder, Report
from kpr.objects.convert import (
    InvalidObject,
    endpoint_slice_from_dict,
    gc_paused,
    node_from_dict,
    service_from_dict,
)
from kpr.objects.events import Delete, Event, Kind, Object, Replace, SourceError, Upsert

# kube-proxy ignores objects owned by another proxy and the endpoints of headless Services.
PROXYABLE_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
LIST_PAGE = 500
BACKOFF = (0.2, 0.5, 1, 2, 5, 10, 30)
# A watch that delivered events for this long before it broke was a success: the backoff starts over. Without it,
# failures spaced out by hours of healthy watching would add up to 30 s pauses after a single blip.
HEALTHY_WATCH = 10.0


class Expired(Exception):
    """The resourceVersion we resume from was compacted away (410 Gone): relist."""


class WatchBroken(Exception):
    """The stream ended in a way that calls for a resume after a backoff."""


@dataclass(frozen=True)
class Resource:
    kind: Kind
    lister: Callable[..., Any]  # a generated *_with_http_info-free API method taking list/watch keyword arguments
    convert: Callable[[Mapping[str, Any]], Object]
    selector: dict[str, str]


def resources(api_client: Any, node_name: str) -> list[Resource]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    discovery = client.DiscoveryV1Api(api_client)
    return [
        Resource(
            "Service",
            core.list_service_for_all_namespaces,
            service_from_dict,
            {"label_selector": PROXYABLE_SELECTOR},
        ),
        Resource(
            "EndpointSlice",
            discovery.list_endpoint_slice_for_all_namespaces,
            endpoint_slice_from_dict,
            {"label_selector": PROXYABLE_SELECTOR},
        ),
        Resource(
            "Node",
            core.list_node,
            node_from_dict,
            {"field_selector": f"metadata.name={node_name}"},
        ),
    ]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or ""), str(meta.get("resourceVersion") or "")


def _retry_after(e: Exception) -> float | None:
    headers = getattr(e, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Reflector:
    def __init__(
        self,
        resource: Resource,
        out: queue.Queue[Event],
        stop: threading.Event,
        *,
        idle_timeout: float = 90.0,
        watch_timeout: tuple[int, int] = (300, 600),
    ) -> None:
        self.resource = resource
        self.out = out
        self.stop = stop
        self.idle_timeout = idle_timeout
        self.watch_timeout = watch_timeout
        self.resource_version = ""  # "" means: list first
        self.log = log.get("kpr.k8s").bind(kind=resource.kind)
        self.state = "starting"  # starting | listing | watching | backoff | forbidden
        self.problem = ""  # why the last attempt failed, for `kpr status`
        self.lists = 0
        self.watches = 0
        self.last_event = 0.0
        self.uids: dict[tuple[str, str], str] = {}  # (namespace, name) -> metadata.uid, for Events about them
        self._uids = self.uids  # where _convert records them: a new dict while relisting
        self._failures = 0
        self._watch_healthy_since: float | None = None  # when the current watch delivered its first event
        self.thread = threading.Thread(target=self.run, name=f"reflector-{resource.kind}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if not self.resource_version:
                    self.relist()
                self.watch()
                self._failures = 0
                self.problem = ""
            except Expired as e:
                self.log.info("resourceVersion expired; relisting", detail=str(e))
                self.resource_version = ""
            except Exception as e:  # every failure mode ends in a backoff and a retry
                healthy = self._watch_healthy_since
                if healthy is not None and time.monotonic() - healthy >= HEALTHY_WATCH:
                    self._failures = 0
                self._backoff(e)
            finally:
                self._watch_healthy_since = None

    # ---- list ----

    def relist(self) -> None:
        self.state = "listing"
        objects: list[Object] = []
        invalid: set[tuple[str, str]] = set()
        uids: dict[tuple[str, str], str] = {}  # the list is the whole set: uids of objects gone meanwhile go too
        self._uids = uids
        token = ""
        version = ""
        while True:
            kwargs: dict[str, Any] = dict(self.resource.selector, limit=LIST_PAGE)
            if token:
                kwargs["_continue"] = token
            body = self._call(**kwargs)
            with gc_paused():  # a page of objects parsed and converted: no collection passes over them
                page = orjson.loads(body)
                meta = page.get("metadata") or {}
                version = version or str(meta.get("resourceVersion") or "")
                for item in page.get("items") or []:
                    obj = self._convert(item)
                    if obj is not None:
                        objects.append(obj)
                    else:
                        namespace, name, _ = _meta(item)
                        invalid.add((namespace, name))
            token = str(meta.get("continue") or "")
            if not token:
                break
        self.lists += 1
        self.problem = ""
        self.resource_version = version
        self.uids = uids
        self.out.put(Replace(self.resource.kind, tuple(objects), frozenset(invalid)))
        self.log.info("listed", objects=len(objects), resource_version=version)

    # ---- watch ----

    def watch(self) -> None:
        self.state = "watching"
        self.watches += 1
        self._uids = self.uids
        started = time.monotonic()
        delivered = 0
        timeout = random.randint(*self.watch_timeout)
        response = self.resource.lister(
            **self.resource.selector,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            _request_timeout=(10, self.idle_timeout),  # a read this long without a byte: the watch is dead
        )
        try:
            for line in _lines(response):
                if self.stop.is_set():
                    return
                self._handle(orjson.loads(line))
                delivered += 1
                if self._watch_healthy_since is None:
                    self._watch_healthy_since = time.monotonic()
        finally:
            response.close()  # first: release_conn() alone would pool a connection still carrying a stream
            response.release_conn()
        # The server ended the watch (its timeoutSeconds passed): resume at once, unless it ended immediately
        # without a single event, which would otherwise become a busy loop against a misbehaving server.
        if not delivered and time.monotonic() - started < 1.0:
            raise WatchBroken("the watch ended at once without events")

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = self.resource.kind
        etype = event.get("type")
        obj = event.get("object") or {}
        self.last_event = time.monotonic()
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Expired(str(obj.get("message", "410 Gone")))
            raise WatchBroken(f"watch error {code}: {obj.get('message')}")
        namespace, name, version = _meta(obj)
        if etype in ("ADDED", "MODIFIED"):
            converted = self._convert(obj)
            if converted is not None:
                self.out.put(Upsert(kind, converted))
        elif etype == "DELETED":
            self.uids.pop((namespace, name), None)
            self.out.put(Delete(kind, namespace, name))
        elif etype != "BOOKMARK":
            raise WatchBroken(f"unknown watch event type {etype!r}")
        if version:
            self.resource_version = version  # bookmarks move the resume point too

    # ---- helpers ----

    def _call(self, **kwargs: Any) -> bytes:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.resource.lister(**kwargs, _preload_content=False, _request_timeout=(10, 60))
        except ApiException as e:
            if e.status == 410:
                raise Expired(f"list: {e.reason}") from e
            raise
        try:
            return bytes(response.data)
        finally:
            response.release_conn()

    def _convert(self, item: Mapping[str, Any]) -> Object | None:
        namespace, name, _ = _meta(item)
        self._uids[namespace, name] = str((item.get("metadata") or {}).get("uid") or "")
        try:
            return self.resource.convert(item)
        except InvalidObject as e:
            self.out.put(SourceError(self.resource.kind, str(e), "invalid", namespace, name))
            return None

    def _backoff(self, e: Exception) -> None:
        from kubernetes.client.exceptions import ApiException

        self.state = "backoff"
        if isinstance(e, ApiException) and e.status == 410:
            self.resource_version = ""
            return
        if isinstance(e, ApiException) and e.status in (401, 403):
            self._denied(e)
            return
        delay = BACKOFF[min(self._failures, len(BACKOFF) - 1)] * random.uniform(0.8, 1.2)
        retry_after = _retry_after(e)
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._failures += 1
        reason = f"HTTP {e.status}" if isinstance(e, ApiException) else type(e).__name__
        self.log.warning(
            "watch interrupted; resuming",
            reason=reason,
            detail=str(e)[:300],
            retry_in=round(delay, 2),
            resource_version=self.resource_version,
        )
        self.out.put(SourceError(self.resource.kind, f"{reason}: {str(e)[:200]}", "watch_failed"))
        self.problem = f"{reason}: {str(e)[:200]}"
        self.stop.wait(delay)

    def _denied(self, e: Any) -> None:
        """401/403: retrying soon will not help, and the operator must hear exactly what is missing."""
        message = _status_message(e) or str(e.reason)
        first = self.state != "forbidden"
        self.state = "forbidden"
        self.problem = f"HTTP {e.status}: {message}"
        if first:  # once per episode: the retries below would repeat it every 30 s
            self.log.error(
                "the API server refuses this agent: kpr cannot program anything until it is allowed",
                status=e.status,
                detail=message,
                hint="the agent needs list and watch on services, endpointslices.discovery.k8s.io and nodes "
                "(deploy/clusterrole.yaml, bound to its ServiceAccount)",
            )
            self.out.put(SourceError(self.resource.kind, self.problem, "forbidden"))
        self._failures += 1
        self.stop.wait(BACKOFF[min(self._failures, len(BACKOFF) - 1)])


def _status_message(e: Any) -> str:
    """The message of the metav1.Status an API error carries (\"... is forbidden: User ... cannot list ...\")."""
    try:
        return str(orjson.loads(e.body).get("message") or "")
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        return ""


def _lines(response: Any) -> Iterator[bytes]:
    """Split a chunked watch stream into JSON lines (a chunk may hold several or part of one)."""
    buffer = b""
    for chunk in response.stream(65536, decode_content=True):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class ApiSource:
    """The three reflectors of one agent, feeding one queue, and the recorder of the Events it reports."""

    def __init__(
        self,
        api_client: Any,
        node_name: str,
        out: queue.Queue[Event],
        *,
        idle_timeout: float = 90.0,
        on_event_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.stop = threading.Event()
        self.node_name = node_name
        self.reflectors = [
            Reflector(r, out, self.stop, idle_timeout=idle_timeout) for r in resources(api_client, node_name)
        ]
        self.recorder = EventRecorder(ApiSink(api_client), node_name, uid_of=self.uid_of, on_outcome=on_event_outcome)

    def start(self) -> None:
        for r in self.reflectors:
            r.start()
        self.recorder.start()
        # What kube-proxy records at start: a Normal event on its Node.
        self.recorder.record(Report("Node", "", self.node_name, "Starting", "kpr started", "Normal", "StartKpr"))

    def close(self) -> None:
        self.stop.set()
        self.recorder.close()

    def report(self, kind: Kind, namespace: str, name: str, reason: str, message: str) -> None:
        self.recorder.record(Report(kind, namespace, name, reason, message))

    def uid_of(self, kind: str, namespace: str, name: str) -> str:
        """The object's uid as last listed or watched ("" when unknown); read from the recorder's thread."""
        for r in self.reflectors:
            if r.resource.kind == kind:
                return r.uids.get((namespace, name), "")
        return ""

    def problem(self, stalled_after: float = 60.0) -> str:
        """A reflector whose thread is gone (it retries every failure, so only a bug ends it), or "" when all run.
        Watches that fail are not problems here: they back off, retry and show in state()."""
        dead = [r.resource.kind for r in self.reflectors if r.thread.ident is not None and not r.thread.is_alive()]
        if dead and not self.stop.is_set():
            return f"the {', '.join(dead)} reflector(s) stopped"
        return ""

    def state(self) -> dict[str, dict[str, Any]]:
        return {
            r.resource.kind: {
                "state": r.state,
                "problem": r.problem,
                "resource_version": r.resource_version,
                "lists": r.lists,
                "watches": r.watches,
            }
            for r in self.reflectors
        }


def api_client(kubeconfig: str | None) -> Any:
    """A client from a kubeconfig file, or the in-cluster service account when none is given."""
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    config.load_incluster_config()
    return client.ApiClient()
