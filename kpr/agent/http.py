"""The agent's two HTTP endpoints, laid out like kube-proxy's.

- health (default 0.0.0.0:10256): /healthz (200 once the first sync is done and no queued change has waited longer
  than twice the sync period, else 503), /livez (200 while the main loop turns), both with kube-proxy's JSON body
  {"lastUpdated", "currentTime", "nodeEligible"}; and /status, the JSON `kpr status` reads.
- metrics (default 127.0.0.1:10249): /metrics (Prometheus) and /proxyMode ("kpr").
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Response = tuple[int, str, bytes]  # (status, content type, body)
Route = Callable[[], Response]


def json_response(status: int, body: Any) -> Response:
    return status, "application/json", json.dumps(body, default=str).encode()


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Route]] = {}  # set per server by serve()

    def do_GET(self) -> None:  # the name http.server calls
        route = self.routes.get(self.path.split("?", 1)[0])
        status, content_type, body = route() if route else (404, "text/plain", b"404 page not found\n")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
        pass  # probes every few seconds would flood the log


def serve(address: str, routes: dict[str, Route], name: str) -> ThreadingHTTPServer:
    """Serve `routes` on host:port from a daemon thread ("" host or 0.0.0.0: every address)."""
    host, _, port = address.rpartition(":")
    handler = type(f"{name}Handler", (_Handler,), {"routes": routes})
    server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), handler)
    server.daemon_threads = True
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

    def status(self) -> dict[str, Any]: ...


def _stamp(epoch: float) -> str | None:
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def health_routes(agent: Health) -> dict[str, Route]:
    def body() -> dict[str, Any]:
        return {"lastUpdated": _stamp(agent.last_sync_wall), "currentTime": _stamp(time.time()), "nodeEligible": True}

    return {
        "/healthz": lambda: json_response(200 if agent.healthy()[0] else 503, body()),
        "/livez": lambda: json_response(200 if agent.alive() else 503, body()),
        "/status": lambda: json_response(200, agent.status()),
    }
