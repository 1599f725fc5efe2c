"""Kubernetes objects and a running kpr agent for the lab: what the demo and the tests drive.

Manifests are written the way a user would write them (plain dicts -> YAML), atomically, into a directory the agent
watches. `LabAgent` runs the real `kpr agent` process inside a lab node's network namespace and cgroup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kpr.datapath import netns
from kpr.lab.lab import Lab
from kpr.lab.layout import Node, Pod, Where
from kpr.lab.processes import CLIENT_PATH

HOLDER_PATH = Path(__file__).with_name("holder.py")

T = TypeVar("T")

# (name, port, targetPort, protocol) or with a nodePort as fifth element
Port = tuple[str, int, int | str, str] | tuple[str, int, int | str, str, int]


def service(
    name: str,
    cluster_ips: Sequence[str],
    ports: Sequence[Port],
    *,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A v1 Service; extra keyword arguments are spec fields in camelCase (e.g. sessionAffinity="ClientIP")."""
    body: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": cluster_ips[0],
        "clusterIPs": list(cluster_ips),
        "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips],
        "ports": [_port(p) for p in ports],
    }
    body.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": body,
    }


def _port(p: Port) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p[0], "port": p[1], "targetPort": p[2], "protocol": p[3]}
    if len(p) == 5:
        out["nodePort"] = p[4]
    return out


def endpoint(
    address: str, node: str, *, ready: bool = True, serving: bool | None = None, terminating: bool = False
) -> dict[str, Any]:
    return {
        "addresses": [address],
        "nodeName": node,
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }


# The conditions the EndpointSlice controller writes as a pod goes through its life (KEP-1672).
POD_CONDITIONS: dict[str, dict[str, bool]] = {
    "starting": {"ready": False, "serving": False, "terminating": False},  # not ready yet
    "ready": {"ready": True, "serving": True, "terminating": False},
    "unready": {"ready": False, "serving": False, "terminating": False},  # failing its readiness probe
    "terminating": {"ready": False, "serving": True, "terminating": True},  # deleted, still answering probes
    "stopping": {"ready": False, "serving": False, "terminating": True},  # deleted, no longer answering
}


def endpoint_slice(
    service_name: str,
    endpoints: Sequence[dict[str, Any]],
    ports: Sequence[tuple[str, int, str]],
    *,
    family: int = 4,
    name: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice; ports are (name, port, protocol) with the Service port's name."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-v{family}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4" if family == 4 else "IPv6",
        "endpoints": list(endpoints),
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def pod_endpoints(pods: Iterable[Pod], family: int = 4, **conditions: Any) -> list[dict[str, Any]]:
    return [endpoint(p.ipv4 if family == 4 else p.ipv6, p.node, **conditions) for p in pods]


def pods_in_states(pods: dict[Pod, str], family: int = 4) -> list[dict[str, Any]]:
    """Endpoints of pods in the named states of POD_CONDITIONS ("gone" pods are left out, as the controller does)."""
    return [
        endpoint(p.ipv4 if family == 4 else p.ipv6, p.node, **POD_CONDITIONS[state])
        for p, state in pods.items()
        if state != "gone"
    ]


def write_manifest(directory: Path, filename: str, objects: Sequence[dict[str, Any]]) -> Path:
    """Write a multi-document YAML file atomically (the agent never reads half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump_all(list(objects), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def remove_manifest(directory: Path, filename: str) -> None:
    (directory / filename).unlink(missing_ok=True)


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, LookupError) as e:  # maps or entries may not exist yet while the agent starts
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {what}" + (f" ({last_error})" if last_error else "")
            )
        time.sleep(interval)


def start_client_loop(
    lab: Lab,
    where: Pod | Node,
    host: str,
    port: int,
    seconds: float,
    *,
    interval: float = 0.005,
    timeout: float = 2.0,
    proto: str = "tcp",
) -> subprocess.Popen[str]:
    """kpr.lab.client connecting in a loop for `seconds` in the background; finish_client_loop() reads its result."""
    argv = [
        sys.executable,
        "-I",
        "-S",
        str(CLIENT_PATH),
        proto,
        host,
        str(port),
        "--duration",
        str(seconds),
        "--interval",
        str(interval),
        "--timeout",
        str(timeout),
    ]
    return lab.spawn(where, argv, stdout=subprocess.PIPE, text=True)


def finish_client_loop(loop: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, _ = loop.communicate(timeout=timeout)
    return json.loads(out)


def start_holder(
    lab: Lab,
    where: Where,
    *,
    tcp: tuple[str, int] | None = None,
    connections: int = 4,
    udp: tuple[str, int] | None = None,
    interval: float = 0.05,
    timeout: float = 1.0,
) -> subprocess.Popen[str]:
    """kpr.lab.holder in the background, once it has started; finish_holder() stops it and reads what it saw."""
    argv = [sys.executable, "-I", "-S", str(HOLDER_PATH), "--interval", str(interval), "--timeout", str(timeout)]
    if tcp:
        argv += ["--tcp", tcp[0], str(tcp[1]), "--connections", str(connections)]
    if udp:
        argv += ["--udp", udp[0], str(udp[1])]
    proc = lab.spawn(where, argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "holding":
        raise RuntimeError(f"holder did not start: exit {proc.wait()}")
    return proc


def finish_holder(proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    result: dict[str, Any] = json.loads(out)
    return result


def listen_in(netns_name: str, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket that lives in a lab namespace, for an in-process server the lab's agents can reach.

    A socket belongs to the namespace it was created in, so a short-lived thread enters the namespace (setns only
    affects the calling thread), makes the socket and ends; this process and the host network are untouched.
    """

    def create() -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    return netns.run_in(f"/run/netns/{netns_name}", create, name=f"netns-{netns_name}")


class LabAgent:
    """The real `kpr agent` process for one lab node."""

    def __init__(
        self,
        lab: Lab,
        node: Node,
        manifests: Path | None = None,
        extra_args: Sequence[str] = (),
        *,
        kubeconfig: Path | None = None,
    ) -> None:
        if (manifests is None) == (kubeconfig is None):
            raise ValueError("give the agent either a manifests directory or a kubeconfig")
        self.lab = lab
        self.node = node
        self.source_args = ["--manifests", str(manifests)] if manifests else ["--kubeconfig", str(kubeconfig)]
        self.extra_args = list(extra_args)
        self.log_path = lab.run_dir / f"agent-{node.name}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self._log_start = 0  # where this run's lines begin in the (appended) log

    def kpr_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kpr.cli.main", *args]

    def start(self) -> LabAgent:
        argv = self.kpr_argv(
            "agent",
            *self.source_args,
            "--node-name",
            self.node.name,
            "--cgroup-root",
            str(self.node.cgroup),
            "--bpffs-dir",
            str(self.node.bpffs_dir),
            "--log-format",
            "json",
            "--min-sync-period",
            "0.05",
            *self.extra_args,
        )
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.spawn(self.node, argv, stdout=log, stderr=log)
        return self

    def wait_started(self, timeout: float = 60) -> None:
        """Until the agent has listed every kind, made its first full sync and then attached its programs."""
        try:
            wait_until(
                lambda: self._check_alive() and '"programs attached"' in self.log(this_run=True),
                timeout,
                f"the agent on {self.node.name} to start",
            )
        except TimeoutError as e:
            raise TimeoutError(f"{e}; its log ends with:\n{self.log()[-3000:]}") from None

    def _check_alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def log(self, this_run: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start if this_run else 0)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kpr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a kpr CLI command on the node (e.g. services, cleanup)."""
        return self.lab.run(self.node, self.kpr_argv(*args), check=check, timeout=60)
