"""healthCheckNodePort servers for externalTrafficPolicy=Local Services, answering as kube-proxy does.

A load balancer probes every node on the Service's healthCheckNodePort and sends traffic only to nodes that answer
200: those with ready local endpoints. As kube-proxy v1.37 (pkg/proxy/healthcheck/service_health.go), with one
proxier per IP family: an IPv4 listener reports the IPv4 endpoints and an IPv6 one the IPv6 endpoints, for the
families the Service has; 200 with {"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy":
true} when N > 0 and the proxy is healthy, else 503 with the same body; X-Load-Balancing-Endpoint-Weight: N always.
Any method gets that answer (HEAD without the body), as from Go's net/http.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpr import log
from kpr.agent.http import REQUEST_TIMEOUT, listen
from kpr.model.types import ServiceKey


class _Server:
    """One family's listener on one port."""

    def __init__(self, port: int, family: str, owner: HealthChecks) -> None:
        self.port = port
        self.family = family
        self.service: ServiceKey | None = None
        self.local_endpoints = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT

            def _answer(self) -> None:
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
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(count))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

            def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
                pass

        self.httpd: ThreadingHTTPServer = listen("0.0.0.0" if family == "IPv4" else "::", port, Handler, v6only=True)
        threading.Thread(target=self.httpd.serve_forever, name=f"healthcheck-{port}-{family}", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HealthChecks:
    """The listeners of every healthCheckNodePort in use, per IP family; `set` after every sync of a service."""

    def __init__(self, proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self.proxy_healthy = proxy_healthy  # kube-proxy reports its own health in every answer
        self.servers: dict[tuple[int, str], _Server] = {}
        self.by_service: dict[ServiceKey, int] = {}
        self.log = log.get("kpr.healthcheck")

    def set(self, service: ServiceKey, port: int, local_endpoints: dict[str, int]) -> str | None:
        """Serve `port` for `service` in each family of `local_endpoints` (family -> count); returns an error message
        when a listener cannot be opened (the port is taken, say)."""
        old = self.by_service.get(service)
        if old is not None and old != port:
            self._release(service, old)
        errors = []
        for family in [f for (p, f) in self.servers if p == port and f not in local_endpoints]:
            self.servers.pop((port, family)).close()  # the service lost a family
        for family, count in sorted(local_endpoints.items()):
            server = self.servers.get((port, family))
            if server is None:
                try:
                    server = _Server(port, family, self)
                except OSError as e:
                    errors.append(f"healthCheckNodePort {port} ({family}): {e.strerror}")
                    continue
                self.servers[(port, family)] = server
                self.log.info("health check node port serving", service=str(service), port=port, family=family)
            elif server.service not in (None, service):
                errors.append(f"healthCheckNodePort {port} is already used for {server.service}")
                continue
            server.service = service
            server.local_endpoints = count
        self.by_service[service] = port
        return "; ".join(errors) or None

    def _release(self, service: ServiceKey, port: int) -> None:
        self.by_service.pop(service, None)
        for key in [k for k in self.servers if k[0] == port]:
            self.servers.pop(key).close()

    def remove(self, service: ServiceKey) -> None:
        port = self.by_service.get(service)
        if port is not None:
            self._release(service, port)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        self.by_service.clear()
