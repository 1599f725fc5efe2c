"""healthCheckNodePort servers for externalTrafficPolicy=Local Services, answering as kube-proxy does.

A load balancer probes every node on the Service's healthCheckNodePort and sends traffic only to nodes that answer
200: those with local endpoints. Body and header follow kube-proxy (pkg/proxy/healthcheck/service_health.go):
200 with {"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true} and
X-Load-Balancing-Endpoint-Weight: N when N > 0, else 503 with the same body.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpr import log
from kpr.model.types import ServiceKey


class _Server:
    def __init__(self, port: int, owner: HealthChecks) -> None:
        self.port = port
        self.service: ServiceKey | None = None
        self.local_endpoints = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                service, count = server.service, server.local_endpoints
                healthy = owner.proxy_healthy()
                body = json.dumps(
                    {
                        "service": {
                            "namespace": service.namespace if service else "",
                            "name": service.name if service else "",
                        },
                        "localEndpoints": count,
                        "serviceProxyHealthy": healthy,
                    }
                ).encode()
                self.send_response(200 if count > 0 and healthy else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                if count > 0:
                    self.send_header("X-Load-Balancing-Endpoint-Weight", str(count))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
                pass

        self.httpd = ThreadingHTTPServer(("", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name=f"healthcheck-{port}", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HealthChecks:
    """One HTTP server per healthCheckNodePort in use; `set` after every sync of a service."""

    def __init__(self, proxy_healthy: Any = lambda: True) -> None:
        self.proxy_healthy = proxy_healthy  # kube-proxy reports its own health in every answer
        self.servers: dict[int, _Server] = {}
        self.by_service: dict[ServiceKey, int] = {}
        self.log = log.get("kpr.healthcheck")

    def set(self, service: ServiceKey, port: int, local_endpoints: int) -> str | None:
        """Serve `port` for `service` (0: none); returns an error message when the port cannot be bound."""
        old = self.by_service.get(service)
        if old is not None and old != port:
            self._release(service, old)
        if not port:
            return None
        server = self.servers.get(port)
        if server is None:
            try:
                server = _Server(port, self)
            except OSError as e:
                return f"healthCheckNodePort {port}: {e.strerror}"
            self.servers[port] = server
            self.log.info("health check node port serving", service=str(service), port=port)
        elif server.service not in (None, service):
            return f"healthCheckNodePort {port} is already used for {server.service}"
        server.service = service
        server.local_endpoints = local_endpoints
        self.by_service[service] = port
        return None

    def _release(self, service: ServiceKey, port: int) -> None:
        self.by_service.pop(service, None)
        server = self.servers.pop(port, None)
        if server is not None:
            server.close()

    def remove(self, service: ServiceKey) -> None:
        port = self.by_service.get(service)
        if port is not None:
            self._release(service, port)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        self.by_service.clear()
