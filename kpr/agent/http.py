"""The agent's HTTP endpoints, laid out and answering like kube-proxy's (v1.37: pkg/proxy/healthcheck).

- health (default 0.0.0.0:10256): /healthz (200 once the first sync is done, no queued change has waited longer
  than twice the sync period and the node is eligible, else 503), /livez (the same without the node's eligibility,
  200 while the main loop turns), both with kube-proxy's JSON body; and /status, the JSON `kpr status` reads.
- metrics (default 127.0.0.1:10249): /metrics (Prometheus) and /proxyMode ("kpr").

Like Go's net/http: every method gets the route's answer (load balancers probe with HEAD or OPTIONS too; HEAD gets no
body), an unknown path 404 "404 page not found", and the IPv4 wildcard listens on IPv6 as well (Go binds 0.0.0.0
with a dual-stack socket), so an IPv6-only node is probed like any other.

Unlike a goroutine, a connection here costs a thread: a client gets REQUEST_TIMEOUT seconds to send its request, and
at most MAX_CONNECTIONS are served at once (more are closed at once), so half-sent requests cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

REQUEST_TIMEOUT = 5.0  # seconds a connection may take to send its request
MAX_CONNECTIONS = 64  # per listener; probes take milliseconds

Response = tuple[int, str, bytes]  # (status, content type, body)
Route = Callable[[], Response]
FAMILIES = ("IPv4", "IPv6")  # kpr serves both families at once, where kube-proxy runs one proxier each


def json_response(status: int, body: Any) -> Response:
    return status, "application/json", json.dumps(body, default=str).encode()


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Route]] = {}  # set per server by serve()
    timeout = REQUEST_TIMEOUT  # applied to the connection's socket before the request is read

    def _answer(self) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        status, content_type, body = route() if route else (404, "text/plain; charset=utf-8", b"404 page not found\n")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # http.server dispatches to do_<METHOD>; a Go handler answers them all alike.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
        pass  # probes every few seconds would flood the log


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's 5 makes a burst of connects wait on SYN retries)

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_activate()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.slots.acquire(blocking=False)  # False: the server closes the connection

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _DualStackServer(_BoundedServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError):  # a kernel without IPv6 refuses this option: the bind below says so
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _V6Server(_BoundedServer):
    address_family = socket.AF_INET6


class _V4Server(_BoundedServer):
    pass


def listen(host: str, port: int, handler: type[BaseHTTPRequestHandler], *, v6only: bool = False) -> ThreadingHTTPServer:
    """An HTTP server on host:port: "", "0.0.0.0" and "::" listen on every address of both families (one dual-stack
    socket, as Go does; `v6only` keeps "::" to IPv6, for a per-family listener); "0.0.0.0" falls back to IPv4 alone
    on a kernel without IPv6."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        if v6only:
            return _V6Server(("::", port), handler)
        try:
            return _DualStackServer(("::", port), handler)
        except OSError:
            if host == "::":
                raise
            return _V4Server(("0.0.0.0", port), handler)
    return (_V6Server if ":" in host else _V4Server)((host, port), handler)


def serve(address: str, routes: dict[str, Route], name: str) -> ThreadingHTTPServer:
    """Serve `routes` on host:port ("[::1]:10256" for IPv6) from a daemon thread."""
    host, _, port = address.rpartition(":")
    handler = type(f"{name}Handler", (_Handler,), {"routes": routes})
    server = listen(host, int(port), handler)
    threading.Thread(target=server.serve_forever, name=f"http-{name}", daemon=True).start()
    return server


def metrics_routes(registry: CollectorRegistry) -> dict[str, Route]:
    return {
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
        "/proxyMode": lambda: (200, "text/plain", b"kpr"),
    }


class Health(Protocol):
    last_sync_wall: float

    def healthy(self) -> tuple[bool, str]: ...

    def alive(self) -> bool: ...

    def node_eligible(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


def _stamp(epoch: float) -> str:
    if not epoch:
        return "0001-01-01T00:00:00Z"  # Go's zero time, as kube-proxy prints before its first sync
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def health_body(last_updated: float, healthy: bool, node_eligible: bool | None) -> dict[str, Any]:
    """kube-proxy's ProxyHealth: lastUpdated is "now" while healthy (its compatibility rule), the last sync else."""
    now = time.time()
    updated = _stamp(now if healthy else last_updated)
    body: dict[str, Any] = {"lastUpdated": updated, "currentTime": _stamp(now)}
    if node_eligible is not None:
        body["nodeEligible"] = node_eligible
    body["healthy"] = healthy
    body["status"] = {family: {"lastUpdated": _stamp(last_updated), "healthy": healthy} for family in FAMILIES}
    return body


def health_routes(agent: Health) -> dict[str, Route]:
    def healthz() -> Response:
        healthy, eligible = agent.healthy()[0], agent.node_eligible()
        ok = healthy and eligible
        return json_response(200 if ok else 503, health_body(agent.last_sync_wall, healthy, eligible))

    def livez() -> Response:
        alive = agent.alive()
        return json_response(200 if alive else 503, health_body(agent.last_sync_wall, alive, None))

    return {"/healthz": healthz, "/livez": livez, "/status": lambda: json_response(200, agent.status())}
