"""The real control plane in the lab: fast start, Deployments and Services, RBAC, etcd compaction, restarts."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kpr.lab import Lab, sweep_stale
from kpr.lab.controlplane import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
T = TypeVar("T")


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlane]:
    """Two lab nodes and a started control plane in namespace <prefix>-cp."""
    sweep_stale()
    lab = Lab()
    try:
        lab.add_node("node1")
        lab.add_node("node2")
        plane = ControlPlane(lab).start()
    except BaseException:
        lab.close()
        raise
    yield plane
    try:
        plane.close()
        lab.assert_host_isolated()
    finally:
        lab.close()


def _eventually(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def _get(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def _apply(cp: ControlPlane, *objects: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))


def _list_rv(cp: ControlPlane, path: str) -> int:
    return int(json.loads(cp.kubectl("get", "--raw", path).stdout)["metadata"]["resourceVersion"])


def _watch_from(cp: ControlPlane, rv: int) -> list[dict[str, Any]]:
    """The events of a one-second watch of namespaces from resourceVersion rv (410 comes inside the stream)."""
    path = f"/api/v1/namespaces?watch=1&resourceVersion={rv}&timeoutSeconds=1"
    out = cp.kubectl("get", "--raw", path).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _is_gone(events: list[dict[str, Any]]) -> bool:
    return any(e["type"] == "ERROR" and e["object"].get("code") == 410 for e in events)


def test_starts_fast_and_serves_v1_37(cp: ControlPlane) -> None:
    assert cp.start_seconds is not None
    print(f"\ncontrol plane ready in {cp.start_seconds:.2f}s; phases: {cp.timings}")
    assert cp.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(cp.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == "v1.37.2"
    assert cp.server == f"https://{cp.address}:6443"
    # the serving certificate is good for loopback and IPv6 inside the namespace too
    for server in ("https://127.0.0.1:6443", f"https://[{cp.address6}]:6443"):
        assert cp.kubectl("--server", server, "get", "--raw", "/readyz").stdout.strip() == "ok"
    # and a node reaches it over the underlay (anonymously: /readyz is public)
    curl = ["curl", "-sS", "--max-time", "5", "--cacert", str(cp.dir / "ca.crt"), f"{cp.server}/readyz"]
    assert cp.lab.run("node1", curl).stdout.strip() == "ok"
    # the kubernetes Service has the first address of the v4 range, and the API server as its endpoint
    assert _get(cp, "service", "kubernetes")["spec"]["clusterIP"] == "10.96.0.1"
    slice_ = _get(cp, "endpointslice", "kubernetes")
    assert slice_["endpoints"][0]["addresses"] == [cp.address]


def test_deployment_service_and_scheduling(cp: ControlPlane) -> None:
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {"name": "web", "image": "registry.invalid/web:1", "ports": [{"containerPort": 8080}]}
                    ]
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "ipFamilyPolicy": "PreferDualStack",
            "selector": labels,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }
    _apply(cp, deployment, service)

    _eventually(lambda: _get(cp, "replicasets", "-l", "app=web")["items"], "the ReplicaSet")

    def pending() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = _get(cp, "pods", "-l", "app=web")["items"]
        return items if len(items) == 2 and all(p["status"].get("phase") == "Pending" for p in items) else None

    pods = _eventually(pending, "2 pending pods")
    assert all("nodeName" not in p["spec"] for p in pods)  # no node yet

    svc = _get(cp, "service", "web")["spec"]
    v4, v6 = (ipaddress.ip_address(ip) for ip in svc["clusterIPs"])
    assert v4 in ipaddress.ip_network("10.96.0.0/16") and v6 in ipaddress.ip_network("fd00:96::/108")
    assert 30000 <= svc["ports"][0]["nodePort"] <= 32767
    slices = _eventually(
        lambda: _get(cp, "endpointslices", "-l", "kubernetes.io/service-name=web")["items"], "the EndpointSlices"
    )
    assert {s["addressType"] for s in slices} <= {"IPv4", "IPv6"}

    # A node, registered the way a kubelet does it: the object, then its status through the status subresource.
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node1", "labels": {"kubernetes.io/hostname": "node1", "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]},
    }
    _apply(cp, node)
    resources = {"cpu": "2", "memory": "4Gi", "pods": "110"}
    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "lab node"}],
        "addresses": [
            {"type": "InternalIP", "address": "172.16.0.1"},
            {"type": "InternalIP", "address": "fd00:16::1"},
            {"type": "Hostname", "address": "node1"},
        ],
    }
    cp.kubectl("patch", "node", "node1", "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))
    assert _get(cp, "node", "node1")["spec"].get("taints") is None  # TaintNodesByCondition is off

    def bound() -> bool:
        items = _get(cp, "pods", "-l", "app=web")["items"]
        return len(items) == 2 and all(p["spec"].get("nodeName") == "node1" for p in items)

    _eventually(bound, "the scheduler to bind both pods to node1", timeout=10)


def test_rbac_for_the_kpr_service_account(cp: ControlPlane) -> None:
    for manifest in ("serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml"):
        cp.kubectl("apply", "-f", str(DEPLOY / manifest))
    kubeconfig = cp.service_account_kubeconfig("kube-system", "kpr")
    config = yaml.safe_load(kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == cp.server
    assert "certificate-authority-data" in config["clusters"][0]["cluster"]

    as_kpr = ("--kubeconfig", str(kubeconfig))
    whoami = json.loads(cp.kubectl(*as_kpr, "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == "system:serviceaccount:kube-system:kpr"
    listed = cp.kubectl(*as_kpr, "get", "services,endpointslices", "-A", "-o", "name").stdout.split()
    assert "service/kubernetes" in listed
    assert "endpointslice.discovery.k8s.io/kubernetes" in listed
    denied = cp.kubectl(*as_kpr, "get", "secrets", "-A", check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_compaction_expires_old_resource_versions_once_the_watch_cache_relists(cp: ControlPlane) -> None:
    before = _list_rv(cp, "/api/v1/namespaces")
    cp.kubectl("create", "namespace", "compaction")
    revision = cp.compact_etcd()
    assert revision > before > 0
    assert cp.compact_etcd() >= revision  # compacting again at the same revision is not an error

    # etcd has forgotten `before`, but the API server's watch cache still holds it ...
    assert not _is_gone(_watch_from(cp, before))
    # ... until it re-lists from etcd, here because the API server restarts.
    cp.stop_apiserver()
    cp.start_apiserver()
    assert _is_gone(_watch_from(cp, before))
    exact = f"/api/v1/namespaces?resourceVersion={before}&resourceVersionMatch=Exact"
    old_list = cp.kubectl("get", "--raw", exact, check=False)
    assert old_list.returncode != 0 and "too old" in old_list.stderr  # served by etcd: compacted


def test_compaction_without_watch_cache_expires_watches_at_once(cp: ControlPlane) -> None:
    plane = ControlPlane(cp.lab, "cp2", watch_cache=False).start()
    try:
        before = _list_rv(plane, "/api/v1/namespaces")
        plane.kubectl("create", "namespace", "compaction")
        assert plane.compact_etcd() > before
        assert _is_gone(_watch_from(plane, before))
        assert _is_gone(_watch_from(plane, 1))
    finally:
        plane.close()


def test_apiserver_restart_keeps_objects(cp: ControlPlane) -> None:
    uid = _get(cp, "deployment", "web")["metadata"]["uid"]
    began = time.monotonic()
    cp.stop_apiserver()
    stopped = time.monotonic() - began
    assert cp.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode != 0
    cp.start_apiserver()
    print(f"\nkube-apiserver stopped in {stopped:.2f}s, restarted in {time.monotonic() - began - stopped:.2f}s")
    assert _get(cp, "deployment", "web")["metadata"]["uid"] == uid
    assert {p["spec"]["nodeName"] for p in _get(cp, "pods", "-l", "app=web")["items"]} == {"node1"}
    assert _get(cp, "node", "node1")["status"]["allocatable"]["pods"] == "110"
    cp.kubectl("create", "configmap", "after-restart", "--from-literal=ok=yes")
    assert "kube-apiserver" in cp.log("kube-apiserver")
