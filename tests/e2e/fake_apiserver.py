"""A small in-process Kubernetes API server for end-to-end tests; production code never imports it.

It speaks the real list/watch protocol to the real `kubernetes` client for Services, EndpointSlices and Nodes:
one global resourceVersion, consistent `limit`/`continue` pages, label and field selectors, chunked watch streams
(one JSON event per line and per chunk), bookmarks, `timeoutSeconds`, and 410 Expired for compacted versions.
It follows kube-apiserver's watch cache where behaviour matters: list items carry no kind/apiVersion, watch objects do;
an object that stops matching a watch's selector is sent as DELETED (its old content at the event's version) and
one that starts matching as ADDED; a watch from resourceVersion ""/"0" starts with synthetic ADDED events.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import json
import math
import re
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

Obj = dict[str, Any]
Match = Callable[[Obj], bool]
TRUE = {"1", "t", "T", "true", "TRUE", "True"}  # what Go's strconv.ParseBool accepts
SERVER_META = ("resourceVersion", "uid", "creationTimestamp")
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new list "
    "without the continue parameter."
)


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    plural: str
    api_version: str
    prefix: str
    namespaced: bool

    @property
    def type_meta(self) -> Obj:
        return {"kind": self.kind, "apiVersion": self.api_version}


KINDS = {
    k.kind: k
    for k in (
        Kind("Service", "services", "v1", "/api/v1", True),
        Kind("EndpointSlice", "endpointslices", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1", True),
        Kind("Node", "nodes", "v1", "/api/v1", False),
    )
}
VERSION = {  # the client's VersionInfo model requires every field
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T07:28:49Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
EVENTS = re.compile(r"^/apis/events\.k8s\.io/v1/namespaces/([^/]+)/events(?:/([^/]+))?$")
ROUTE = re.compile(r"^(/api/v1|/apis/discovery\.k8s\.io/v1)(?:/namespaces/([^/]+))?/([a-z]+)(?:/([^/]+))?$")


@dataclass(frozen=True, slots=True)
class Event:
    rv: int
    kind: str
    type: str  # ADDED, MODIFIED or DELETED
    obj: Obj  # stored objects are never mutated, so events share them
    prev: Obj | None


@dataclass(eq=False, slots=True)
class _Watch:
    conn: socket.socket
    closed: bool = False


def status(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    body.update({"reason": reason, **({"details": details} if details else {}), "code": code})
    return body


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None, **headers: str) -> None:
        super().__init__(message)
        self.code, self.body, self.headers = code, status(code, reason, message, details), headers


def _key(meta: Obj) -> str:
    """The object's etcd key within its kind; lists are sorted by it like etcd's range reads."""
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


def _with_rv(obj: Obj, rv: int) -> Obj:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid {name}: {value!r}") from None


Requirement = tuple[str, str, str]  # (key, operator, value); operator is "=", "!=", "exists" or "!exists"


def _requirements(selector: str, field: bool) -> list[Requirement]:
    """Parse the equality-based selectors kpr uses: key, !key, key=v, key==v, key!=v, comma-separated (AND)."""
    out: list[Requirement] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if m := re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w.-]*)", term):
            out.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
        elif (m := re.fullmatch(r"(!?)([\w./-]+)", term)) and not field:
            out.append((m[2], f"{m[1]}exists", ""))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term}")
    if field and (bad := [key for key, _, _ in out if key not in ("metadata.name", "metadata.namespace")]):
        raise ApiError(400, "BadRequest", f"field label not supported: {bad[0]}")
    return out


def _holds(values: dict[str, str], requirement: Requirement) -> bool:
    key, op, value = requirement
    if op.endswith("exists"):
        return (key in values) != (op == "!exists")
    return (values.get(key) == value) != (op == "!=")  # key!=v also matches objects without the key


def _selector(query: dict[str, str], namespace: str | None, name: str | None) -> Match:
    """The path's namespace and name, labelSelector and fieldSelector as one predicate on an object."""
    labels = _requirements(query.get("labelSelector", ""), field=False)
    fields = _requirements(query.get("fieldSelector", ""), field=True)

    def match(obj: Obj) -> bool:
        meta = obj["metadata"]
        if (namespace and meta.get("namespace") != namespace) or (name and meta["name"] != name):
            return False
        own = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", "")}
        return all(_holds(meta.get("labels") or {}, r) for r in labels) and all(_holds(own, r) for r in fields)

    return match


def _as_watch_event(ev: Event, kind: str, match: Match) -> Obj | None:
    """What the watch cache sends one watcher for one change (cacheWatcher.convertToWatchEvent)."""
    if ev.kind != kind:
        return None
    now, before = ev.type != "DELETED" and match(ev.obj), ev.prev is not None and match(ev.prev)
    if now:
        return {"type": "MODIFIED" if before else "ADDED", "object": ev.obj}
    if before:
        assert ev.prev is not None
        return {"type": "DELETED", "object": _with_rv(ev.prev, ev.rv)}
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked watch streams and keep-alive, like the real server
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http does
        self.server.api._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.api._track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            self.server.api._serve(self, self.command, url.path, query)
        except ApiError as e:
            self.send_json(e.code, e.body, e.headers)
        except OSError:  # the client went away, or drop_watches()/stop() cut the connection
            self.close_connection = True

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def send_json(self, code: int, body: Obj, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, event: Obj) -> None:
        data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))  # one chunk per event; wfile is unbuffered

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, api: FakeApiServer) -> None:
        # BaseServer, not TCPServer.__init__: that would make a socket of its own; this serves the given one as it is.
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self.api = api

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeApiServer:
    def __init__(self, sock: socket.socket | None = None, *, bookmark_interval: float = 1.0) -> None:
        self._sock = sock if sock is not None else socket.create_server(("127.0.0.1", 0))
        self._sock.listen()
        host, port = self._sock.getsockname()[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.bookmark_interval = bookmark_interval
        self.expired_as_http = False  # answer a too-old watch with HTTP 410 instead of an in-stream ERROR event
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str], Obj] = {}  # (kind, key) → stored object
        self._history: list[Event] = []
        self._rv = 1
        self._compacted = 0  # versions below this are too old to watch from or to continue a list at
        self._watches: set[_Watch] = set()
        self._conns: set[socket.socket] = set()
        self._bookmarks_paused = False
        self._unavailable: tuple[float, int, int] | None = None
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._events: dict[tuple[str, str], Obj] = {}  # (namespace, name) → events.k8s.io/v1 Event written to us
        self.event_writes: list[tuple[str, str]] = []  # (method, name) of every write of an Event, failed or not
        self.events_fail: int | None = None  # answer writes of Events with this status (500, 403) instead
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> FakeApiServer:
        self._httpd = _HTTPServer(self._sock, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt()
        self._sock.close()

    def restart(self, new_history: bool = True) -> None:
        """Stop and start on the same socket; with new_history old versions become too old (etcd restored)."""
        self._halt()
        if new_history:
            with self._cond:
                self._history.clear()
                self._rv += 1_000_000
                self._compacted = self._rv
        self.start()

    def _halt(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd = self._thread = None
        with self._cond:
            for w in self._watches:
                w.closed = True
            for conn in self._conns:
                _cut(conn)
            self._cond.notify_all()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: Path, context: str = "fake") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": context, "user": {"token": "fake-token"}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- store ----

    def apply(self, obj: Obj) -> Obj:
        k = _kind(obj.get("kind"))
        obj = copy.deepcopy(obj)
        obj["apiVersion"] = k.api_version
        meta = obj.setdefault("metadata", {})
        if k.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (k.kind, _key(meta))
        with self._cond:
            prev = self._objects.get(key)
            if prev is not None:
                meta.update({f: prev["metadata"][f] for f in SERVER_META})
                if obj == prev:  # a no-op update changes nothing and sends no event
                    return copy.deepcopy(prev)
            self._rv += 1
            meta.update(resourceVersion=str(self._rv))
            if prev is None:
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self._objects[key] = obj
            self._event(Event(self._rv, k.kind, "MODIFIED" if prev else "ADDED", obj, prev))
            return copy.deepcopy(obj)

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        k = _kind(kind)
        with self._cond:
            prev = self._objects.pop((k.kind, _key({"name": name, "namespace": namespace if k.namespaced else ""})))
            self._rv += 1
            self._event(Event(self._rv, k.kind, "DELETED", _with_rv(prev, self._rv), prev))

    def get(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        k = _kind(kind)
        with self._cond:
            obj = self._objects.get((k.kind, _key({"name": name, "namespace": namespace if k.namespaced else ""})))
            return copy.deepcopy(obj)

    def objects(self, kind: str) -> list[Obj]:
        k = _kind(kind)
        with self._cond:
            return [copy.deepcopy(o) for (kd, key), o in sorted(self._objects.items()) if kd == k.kind]

    @property
    def resource_version(self) -> int:
        return self._rv

    def _event(self, ev: Event) -> None:
        self._history.append(ev)
        self._cond.notify_all()

    def _state_at(self, kind: str, rv: int) -> dict[str, Obj]:
        """The kind's objects as they were at rv, undoing later events (needs the history back to rv)."""
        if rv < self._compacted:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self._compacted})")
        state = {key: o for (kd, key), o in self._objects.items() if kd == kind}
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.kind == kind and ev.prev is None:
                state.pop(_key(ev.obj["metadata"]), None)
            elif ev.kind == kind and ev.prev is not None:
                state[_key(ev.prev["metadata"])] = ev.prev
        return state

    # ---- fault knobs ----

    def compact(self) -> None:
        with self._cond:
            self._compacted = self._rv

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream, without the terminating chunk."""
        with self._cond:
            for w in self._watches:
                w.closed = True
                _cut(w.conn)
            self._cond.notify_all()

    def unavailable(self, seconds: float, status: int = 503, retry_after: int = 1) -> None:
        self._unavailable = (time.monotonic() + seconds, status, retry_after)

    def pause_bookmarks(self, paused: bool = True) -> None:
        with self._cond:
            self._bookmarks_paused = paused
            self._cond.notify_all()

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watches)

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    # ---- HTTP ----

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            (self._conns.add if add else self._conns.discard)(conn)

    def _serve(self, h: _Handler, method: str, path: str, query: dict[str, str]) -> None:
        with self._cond:
            self._requests.append((method, path, query))
        if self._unavailable and time.monotonic() < self._unavailable[0]:
            _, code, after = self._unavailable
            reason, message = {
                429: ("TooManyRequests", "Too many requests, please try again later."),
                503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
            }.get(code, ("InternalError", "an error on the server has prevented the request from succeeding"))
            raise ApiError(code, reason, message, {"retryAfterSeconds": after}, **{"Retry-After": str(after)})
        if (events := EVENTS.match(path)) and method in ("POST", "PATCH"):
            return self._write_event(h, method, events[1], events[2])
        if method != "GET":
            h.close_connection = True  # its body, if any, was not read
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if (doc := path.rstrip("/")) in ("/version", "/api", "/apis", "/api/v1", "/apis/discovery.k8s.io/v1"):
            return h.send_json(200, self._discovery(doc))  # the client asks for "/version/", "/api/", "/apis/"
        m = ROUTE.match(path)
        k = next((k for k in KINDS.values() if m and (m[1], m[3]) == (k.prefix, k.plural)), None)
        if m is None or k is None or (m[2] and not k.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace, name = m[2], m[4]
        if query.get("watch") in TRUE:
            return self._watch(h, k, _selector(query, namespace, name), query)
        if name:
            with self._cond:
                obj = self._objects.get((k.kind, _key({"name": name, "namespace": namespace})))
            if obj is None:
                raise ApiError(404, "NotFound", f'{k.plural} "{name}" not found', {"name": name, "kind": k.plural})
            return h.send_json(200, obj)
        h.send_json(200, self._list(k, _selector(query, namespace, None), query))

    def events(self, namespace: str | None = None) -> list[Obj]:
        """The Events written so far (events.k8s.io/v1), oldest first."""
        with self._cond:
            found = [copy.deepcopy(e) for (ns, _), e in self._events.items() if namespace in (None, ns)]
        return sorted(found, key=lambda e: e["eventTime"])

    def _write_event(self, h: _Handler, method: str, namespace: str, name: str | None) -> None:
        """POST creates an Event, PATCH merges into one (what the events API's create and patch need here)."""
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"{}")
        with self._cond:
            self.event_writes.append((method, name or body.get("metadata", {}).get("name", "")))
        if self.events_fail:
            code = self.events_fail
            reason = {403: "Forbidden", 500: "InternalError"}.get(code, "InternalError")
            raise ApiError(code, reason, f"events.events.k8s.io is refused by the test ({code})")
        with self._cond:
            if method == "POST":
                meta = body.get("metadata") or {}
                name = str(meta.get("name") or "")
                if meta.get("namespace", namespace) != namespace or not name:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
                if (namespace, name) in self._events:
                    raise ApiError(409, "AlreadyExists", f'events.events.k8s.io "{name}" already exists')
                self._rv += 1
                meta.update(namespace=namespace, resourceVersion=str(self._rv), uid=str(uuid.uuid4()))
                self._events[namespace, name] = body
                return h.send_json(201, body)
            assert name is not None
            event = self._events.get((namespace, name))
            if event is None:
                raise ApiError(404, "NotFound", f'events.events.k8s.io "{name}" not found')
            _merge(event, body)
            self._rv += 1
            event["metadata"]["resourceVersion"] = str(self._rv)
            return h.send_json(200, event)

    def _list(self, k: Kind, match: Match, query: dict[str, str]) -> Obj:
        limit, token, start = _int(query.get("limit") or "0", "limit"), query.get("continue"), ""
        with self._cond:
            if token:
                try:
                    cont = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
                    rv, start = int(cont["rv"]), str(cont["start"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(400, "BadRequest", f"continue key is not valid: {token}") from None
                if rv < self._compacted:
                    raise ApiError(410, "Expired", CONTINUE_EXPIRED)
                state = self._state_at(k.kind, rv)
            elif query.get("resourceVersionMatch") == "Exact":
                rv = _int(query.get("resourceVersion", ""), "resourceVersion")
                state = self._state_at(k.kind, rv)
            else:
                rv, state = self._rv, {key: o for (kd, key), o in self._objects.items() if kd == k.kind}
        keys = [key for key in sorted(state) if key >= start and match(state[key])]
        page = keys[:limit] if limit > 0 else keys
        meta: Obj = {"resourceVersion": str(rv)}
        if len(page) < len(keys):
            cont = {"v": "meta.k8s.io/v1", "rv": rv, "start": page[-1] + "\x00"}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(cont).encode()).decode().rstrip("=")
            if "labelSelector" not in query and "fieldSelector" not in query:
                meta["remainingItemCount"] = len(keys) - len(page)
        items = [{f: v for f, v in state[key].items() if f not in ("kind", "apiVersion")} for key in page]
        return {"kind": f"{k.kind}List", "apiVersion": k.api_version, "metadata": meta, "items": items}

    def _watch(self, h: _Handler, k: Kind, match: Match, query: dict[str, str]) -> None:
        rv, bookmarks = query.get("resourceVersion", ""), query.get("allowWatchBookmarks") in TRUE
        timeout = _int(query.get("timeoutSeconds") or "0", "timeoutSeconds")
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        initial: list[Obj] = []
        gone, index, w = "", 0, _Watch(h.connection)
        with self._cond:
            if rv in ("", "0"):  # "get state and start at most recent": synthetic ADDED events first
                initial = [o for (kd, _), o in sorted(self._objects.items()) if kd == k.kind and match(o)]
                index = len(self._history)
            elif (n := _int(rv, "resourceVersion")) < self._compacted:
                gone = f"too old resource version: {n} ({self._compacted})"
            else:
                index = bisect.bisect_right(self._history, n, key=lambda e: e.rv)
            if not gone:
                self._watches.add(w)
        if gone and self.expired_as_http:
            raise ApiError(410, "Expired", gone)
        if gone:  # the watch cache answers 200, then one ERROR event, then ends the stream
            h.start_stream()
            h.send_event({"type": "ERROR", "object": status(410, "Expired", gone)})
            return h.end_stream()
        try:
            h.start_stream()
            for obj in initial:
                h.send_event({"type": "ADDED", "object": obj})
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                with self._cond:
                    batch, bookmark_rv = [], 0
                    while not w.closed and (now := time.monotonic()) < deadline:
                        if batch := self._history[index:]:
                            index += len(batch)
                            break
                        ticking = bookmarks and not self._bookmarks_paused
                        if ticking and now >= next_bookmark:
                            bookmark_rv = self._rv  # every change up to here has been sent to this watcher
                            break
                        if _hung_up(w.conn):  # the real server cancels a watch whose client went away
                            w.closed = True
                            break
                        wake = min(deadline, next_bookmark) if ticking else deadline
                        self._cond.wait(min(wake - now, 0.1))
                    closed = w.closed
                if closed:  # cut: no terminating chunk, and the connection is not reused
                    h.close_connection = True
                    return
                if not batch and not bookmark_rv:  # timeoutSeconds passed: end the stream cleanly
                    return h.end_stream()
                for ev in batch:
                    if (event := _as_watch_event(ev, k.kind, match)) is not None:
                        h.send_event(event)
                if bookmark_rv:
                    meta = {"resourceVersion": str(bookmark_rv)}
                    h.send_event({"type": "BOOKMARK", "object": {**k.type_meta, "metadata": meta}})
                    next_bookmark = time.monotonic() + self.bookmark_interval
        finally:
            with self._cond:
                self._watches.discard(w)

    def _discovery(self, path: str) -> Obj:
        if path == "/version":
            return VERSION
        if path == "/api":
            address = self.url.split("://")[1]
            cidrs = [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": cidrs}
        if path == "/apis":
            version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
            group = {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
        group_version = path.removeprefix("/apis/").removeprefix("/api/")
        verbs = ["get", "list", "watch"]
        resources = [
            dict(name=k.plural, singularName=k.kind.lower(), namespaced=k.namespaced, kind=k.kind, verbs=verbs)
            for k in KINDS.values()
            if k.api_version == group_version
        ]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _merge(into: Obj, patch: Obj) -> None:
    """A JSON merge patch (RFC 7386), which is what a strategic merge patch of an Event's scalar fields does."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _kind(kind: object) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unsupported kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[str(kind)]


def _hung_up(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _cut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
