"""The lab kubelet: our stand-in for kubelet on the lab nodes, so the real control plane sees real nodes and pods.

It registers each lab node as a Node (InternalIPs, pod CIDRs, a zone label, allocatable resources: what the
scheduler and the EndpointSlice controller's topology hints read), watches the Pods the scheduler binds to them,
and runs each as a lab pod: a network namespace on the node's bridge with kpr.lab.echo answering as the pod's name on
its container ports (TCP, UDP; a TCP port whose name starts with "stream" holds connections open). It reports the
pod Running and Ready with its IPs, so the real EndpointSlice controller writes real slices.

Readiness: a pod is Ready unless it carries the annotation `lab.kpr.io/ready: "false"`; tests flip it with
`kubectl annotate`, as a failing readiness probe would. Graceful deletion: like kubelet running an application that
shuts down cleanly, it keeps a deleted pod running and Ready (its endpoint serving and terminating) until one second
before its grace period ends, then reports it not Ready (the application stopped answering its readiness probe:
the endpoint stops serving), then stops the process (held connections get a FIN), removes the namespace and deletes
the object.

The API server is only reachable inside the control plane's namespace, so every request is made from threads that
joined it (kpr.datapath.netns); lab operations (namespaces, processes) run from any thread.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from kpr.datapath import netns
from kpr.lab.controlplane import ControlPlane
from kpr.lab.errors import LabError
from kpr.lab.lab import Lab
from kpr.lab.layout import Node, Pod

READY_ANNOTATION = "lab.kpr.io/ready"
ZONE_LABEL = "topology.kubernetes.io/zone"
T = TypeVar("T")
_LAB_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Running:
    uid: str
    namespace: str
    name: str
    pod: Pod  # the lab pod
    ready: bool
    containers: list[tuple[str, str]]  # (name, image) of the pod's containers, all run by one echo server
    started: str  # when it started (RFC 3339)
    deleting: bool = False


class LabKubelet:
    def __init__(self, lab: Lab, cp: ControlPlane, nodes: Iterable[Node], zones: dict[str, str] | None = None) -> None:
        self.lab = lab
        self.cp = cp
        self.nodes = {n.name: n for n in nodes}
        self.zones = zones or {}
        self.running: dict[str, _Running] = {}  # by pod uid
        self.stopped_at: dict[str, float] = {}  # pod name -> when its process was stopped (wall clock)
        self.errors: list[str] = []  # what went wrong, for tests to show
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._api_pool = netns.executor(f"/run/netns/{cp.ns.netns}", workers=2, name="lab-kubelet-api")
        self._client = self._call(lambda: config.new_client_from_config(config_file=str(cp.admin_kubeconfig())))
        self._core = client.CoreV1Api(self._client)
        self._watcher: threading.Thread | None = None

    # ---- life cycle

    def start(self) -> LabKubelet:
        for node in self.nodes.values():
            self._register(node)
        self._watcher = threading.Thread(target=self._watch_pods, name="lab-kubelet-watch", daemon=True)
        self._watcher.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self._api_pool.shutdown(wait=False, cancel_futures=True)

    def _call(self, fn: Callable[[], T], retry_for: float = 30.0) -> T:
        """Run an API request from the control plane's namespace, retrying while the API server is away (tests
        restart it; a kubelet keeps trying too)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self._api_pool.submit(fn).result()
            except (urllib3.exceptions.HTTPError, ApiException) as e:
                transient = not isinstance(e, ApiException) or e.status in (429, 500, 503, 504)
                if not transient or self._stop.is_set() or time.monotonic() > deadline:
                    raise
                self._stop.wait(0.2)

    # ---- nodes

    def _register(self, node: Node) -> None:
        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        if node.name in self.zones:
            labels[ZONE_LABEL] = self.zones[node.name]
        body: Any = {  # the client takes plain dicts as well as its models
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "spec": {"podCIDR": node.pod_cidr4, "podCIDRs": [node.pod_cidr4, node.pod_cidr6]},
        }
        try:
            self._call(lambda: self._core.create_node(body))
        except ApiException as e:
            if e.status != 409:
                raise
            self._call(lambda: self._core.patch_node(node.name, {"metadata": {"labels": labels}}))
        resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.ipv4},
                    {"type": "InternalIP", "address": node.ipv6},
                    {"type": "Hostname", "address": node.name},
                ],
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "lab kubelet is posting ready status",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.37.2",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "lab://kpr",
                    "kernelVersion": "",
                    "osImage": "kpr lab",
                    "machineID": node.name,
                    "systemUUID": node.name,
                    "bootID": node.name,
                },
            }
        }
        self._call(lambda: self._core.patch_node_status(node.name, status))

    # ---- pods

    def _watch_pods(self) -> None:
        netns.join(f"/run/netns/{self.cp.ns.netns}")
        resource_version = ""
        while not self._stop.is_set():
            try:
                if not resource_version:
                    listed = self._core.list_pod_for_all_namespaces()
                    resource_version = (listed.metadata.resource_version if listed.metadata else None) or ""
                    for pod in listed.items:
                        self._handle("ADDED", pod)
                stream = watch.Watch().stream(
                    self._core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,  # come back to look at _stop
                )
                for event in stream:
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        resource_version = ""  # 410 Gone: list again
                        break
                    resource_version = obj.metadata.resource_version
                    if event["type"] != "BOOKMARK":
                        self._handle(event["type"], obj)
                    if self._stop.is_set():
                        return
            except ApiException as e:
                if e.status == 410:
                    resource_version = ""
                else:
                    self._error(f"pod watch: {e.status} {e.reason}")
                    self._stop.wait(0.5)
            except Exception as e:  # the API server restarting: connection errors of every kind
                self._error(f"pod watch: {type(e).__name__}: {e}")
                self._stop.wait(0.5)

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
            del self.errors[:-50]

    def _handle(self, kind: str, pod: Any) -> None:
        if pod.spec.node_name not in self.nodes:
            return
        uid = pod.metadata.uid
        with self._lock:
            running = self.running.get(uid)
        try:
            if kind == "DELETED":
                if running is not None:
                    self._stop_pod(running)
                return
            if running is None:
                if pod.metadata.deletion_timestamp is None and pod.status.phase in (None, "Pending"):
                    self._start_pod(pod)
                return
            if pod.metadata.deletion_timestamp is not None and not running.deleting:
                running.deleting = True
                grace = float(pod.metadata.deletion_grace_period_seconds or 0)
                if grace > 1 and running.ready:
                    self._later(grace - 1, lambda: self._patch_status(running, ready=False))
                self._later(grace, lambda: self._finish_deletion(running))
                return
            want_ready = (pod.metadata.annotations or {}).get(READY_ANNOTATION) != "false"
            if want_ready != running.ready and not running.deleting:
                running.ready = want_ready
                self._patch_status(running, ready=want_ready)
        except (LabError, ApiException, OSError, urllib3.exceptions.HTTPError) as e:
            self._error(f"{pod.metadata.namespace}/{pod.metadata.name}: {e}")

    def _lab_name(self, namespace: str, name: str) -> str:
        candidate = f"{namespace}-{name}"
        if _LAB_NAME_RE.match(candidate) and candidate not in self.lab.pods:
            return candidate
        return "p" + hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:12]

    def _start_pod(self, pod: Any) -> None:
        node = self.nodes[pod.spec.node_name]
        tcp, udp, stream = [], [], []
        for container in pod.spec.containers:
            for port in container.ports or []:
                if port.protocol == "UDP":
                    udp.append(port.container_port)
                elif (port.name or "").startswith("stream"):
                    stream.append(port.container_port)
                elif port.protocol in (None, "TCP"):
                    tcp.append(port.container_port)
        lab_pod = self.lab.add_pod(node, self._lab_name(pod.metadata.namespace, pod.metadata.name), echo=False)
        try:
            if tcp or udp or stream:
                self.lab.start_echo(lab_pod, pod.metadata.name, tcp_ports=tcp, udp_ports=udp, stream_ports=stream)
        except BaseException:
            self.lab.remove_pod(lab_pod.name)
            raise
        ready = (pod.metadata.annotations or {}).get(READY_ANNOTATION) != "false"
        containers = [(c.name, c.image or "") for c in pod.spec.containers]
        running = _Running(
            pod.metadata.uid, pod.metadata.namespace, pod.metadata.name, lab_pod, ready, containers, _now()
        )
        with self._lock:
            self.running[running.uid] = running
        self._patch_status(running, ready=ready, started=True)

    def _patch_status(self, running: _Running, *, ready: bool, started: bool = False) -> None:
        node = self.nodes[running.pod.node]
        now = _now()
        flag = "True" if ready else "False"
        status: dict[str, Any] = {
            "conditions": [
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": name,
                    "image": image,
                    "imageID": "",
                    "containerID": f"lab://{running.uid}/{name}",
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": running.started}},
                }
                for name, image in running.containers
            ],
        }
        if started:
            status.update(
                phase="Running",
                hostIP=node.ipv4,
                hostIPs=[{"ip": node.ipv4}, {"ip": node.ipv6}],
                podIP=running.pod.ipv4,
                podIPs=[{"ip": running.pod.ipv4}, {"ip": running.pod.ipv6}],
                startTime=now,
            )
            status["conditions"] += [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now},
            ]
        self._call(lambda: self._core.patch_namespaced_pod_status(running.name, running.namespace, {"status": status}))

    def _later(self, seconds: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            if self._stop.is_set():
                return
            try:
                fn()
            except Exception as e:  # a timer thread has nobody to raise to: keep it for the tests to show
                self._error(f"{type(e).__name__}: {e}")

        timer = threading.Timer(seconds, run)
        timer.daemon = True
        timer.start()

    def _finish_deletion(self, running: _Running) -> None:
        """The grace period is over: the process stops, the namespace goes, the object is deleted."""
        self._stop_pod(running)
        try:
            self._call(
                lambda: self._core.delete_namespaced_pod(
                    running.name,
                    running.namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=running.uid)
                    ),
                )
            )
        except ApiException as e:
            if e.status not in (404, 409):
                self._error(f"{running.namespace}/{running.name}: final delete: {e.status} {e.reason}")

    def _stop_pod(self, running: _Running) -> None:
        with self._lock:
            if self.running.pop(running.uid, None) is None:
                return
        self.stopped_at[running.name] = time.time()
        try:
            self.lab.remove_pod(running.pod.name)
        except LabError as e:
            self._error(f"{running.namespace}/{running.name}: {e}")

    # ---- for tests

    def pod(self, namespace: str, name: str) -> Pod:
        """The lab pod running a Pod (for traffic from inside it)."""
        with self._lock:
            for running in self.running.values():
                if (running.namespace, running.name) == (namespace, name):
                    return running.pod
        raise LabError(f"pod {namespace}/{name} is not running on a lab node")

    def wait_running(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.running) < count:
            if time.monotonic() > deadline:
                raise LabError(f"{len(self.running)} of {count} pods running after {timeout}s; errors: {self.errors}")
            time.sleep(0.05)
