"""kpr against the real Kubernetes control plane: Deployments, rollouts, Service changes, topology, dual-stack,
compaction and restarts, with the real EndpointSlice controller writing the slices kpr programs."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import pytest

from kpr.datapath.inspect import read_services
from kpr.k8s.events import Series
from kpr.lab import Node, Pod
from kpr.lab.cluster import (
    LabAgent,
    finish_client_loop,
    finish_holder,
    start_client_loop,
    start_holder,
    wait_until,
)
from kpr.lab.kubernetes import deployment, selector_service
from tests.k8s.conftest import Cluster, wait_programmed

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

SOCKET_ENDED = {"ECONNABORTED", "EDESTADDRREQ"}


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_status(cluster: Cluster, node: Node, port: int) -> tuple[int, int]:
    script = (
        "import json,sys,urllib.request,urllib.error\n"
        "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=3); s,b=r.status,r.read()\n"
        "except urllib.error.HTTPError as e:\n s,b=e.code,e.read()\n"
        "print(json.dumps([s,json.loads(b)['localEndpoints']]))"
    )
    out = cluster.lab.run(cluster.ext, [sys.executable, "-c", script, f"http://{node.ipv4}:{port}/"]).stdout
    status, count = json.loads(out)
    return status, count


def test_a_deployment_is_served_and_followed_through_scaling_and_deletion(cluster: Cluster, client_pod: Pod) -> None:
    c = cluster
    c.apply(deployment("web", 3, spread=True), selector_service("web", type="NodePort"))
    c.wait_rollout("default", "web")
    info = c.service("web")
    vip, http_np = info["ips"][0], info["node_ports"]["http"]
    for node in (c.n1, c.n2):
        wait_programmed(c, node, f"{vip}:80/TCP", 3)
    east_west = c.lab.client(client_pod, "tcp", vip, 80, count=60)
    north_south = c.lab.client(c.ext, "tcp", c.n1.ipv4, http_np, count=60)
    udp = c.lab.client(client_pod, "udp", vip, 53, count=60, connected=True)
    for result in (east_west, north_south, udp):
        assert result["ok"] == 60 and set(result["served"]) == c.pod_names("web"), result
    assert east_west["peers"] == {f"{vip}:80": 60}

    for replicas in (5, 1):
        c.kubectl("scale", "deployment/web", f"--replicas={replicas}")
        c.wait_rollout("default", "web")
        # From the moment the API shows every replica ready (or the surplus gone from the ready set), both nodes'
        # maps follow within a second.
        slowest = max(wait_programmed(c, node, f"{vip}:80/TCP", replicas, timeout=1.0) for node in (c.n1, c.n2))
        print(f"scaled to {replicas}: maps followed {slowest * 1000:.0f} ms after the rollout status")
        served = c.lab.client(client_pod, "tcp", vip, 80, count=40)
        assert served["ok"] == 40 and set(served["served"]) == c.pod_names("web")

    c.kubectl("delete", "service", "web")
    wait_until(
        lambda: not any(r.frontend.startswith(f"{vip}:") for r in read_services(c.n1.bpffs_dir)), 5, "web unprogrammed"
    )
    gone = c.lab.client(client_pod, "tcp", vip, 80, count=3, timeout=1)
    assert gone["ok"] == 0, gone  # no longer a Service: the address leads nowhere
    c.kubectl("delete", "deployment", "web")


def test_rollout_restart_under_load_fails_no_request_and_resets_no_connection_of_a_serving_pod(
    cluster: Cluster, client_pod: Pod
) -> None:
    c = cluster
    c.apply(deployment("roll", 3, spread=True), selector_service("roll", type="NodePort"))
    c.wait_rollout("default", "roll")
    info = c.service("roll")
    vip, nps = info["ips"][0], info["node_ports"]
    for node in (c.n1, c.n2):
        wait_programmed(c, node, f"{vip}:90/TCP", 3)
    old = c.pod_names("roll")
    holders = {
        "ext": start_holder(c.lab, c.ext, tcp=(c.n1.ipv4, nps["stream"]), connections=9, udp=(c.n1.ipv4, nps["dns"])),
        "pod": start_holder(c.lab, client_pod, tcp=(vip, 90), connections=9, udp=(vip, 53)),
    }
    loops = {
        "ext": start_client_loop(c.lab, c.ext, c.n1.ipv4, nps["http"], 30, interval=0.02),
        "pod": start_client_loop(c.lab, client_pod, vip, 80, 30, interval=0.02),
    }
    time.sleep(1.0)
    c.kubectl("rollout", "restart", "deployment/roll")
    c.wait_rollout("default", "roll", timeout=90)
    wait_until(lambda: old <= set(c.kubelet.stopped_at), 30, "every old pod stopped")
    short = {where: finish_client_loop(loop) for where, loop in loops.items()}
    results = {where: finish_holder(proc) for where, proc in holders.items()}

    assert not (c.pod_names("roll") & old)
    for where, loop in short.items():
        assert loop["errors"] == {} and loop["ok"] > 300, f"{where}: {loop['errors']}"
    survived = 0
    for where, result in results.items():
        for conn in result["tcp"]:
            assert conn["pod"] is not None, f"{where}: a connection attempt failed: {conn}"
            if conn["end"] is None:
                continue
            stopped = c.kubelet.stopped_at.get(conn["pod"])
            assert stopped is not None and conn["end"] == "closed", f"{where}: {conn}"
            assert conn["ended"] >= stopped - 0.05, f"{where}: ended while its pod still served: {conn}"
            survived += conn["pod"] in old
        udp = result["udp"]
        gaps = [b[0] - a[0] for a, b in zip(udp["answers"], udp["answers"][1:], strict=False)]
        assert max(gaps) < 1.0, f"{where}: UDP unanswered for {max(gaps):.2f}s"
        assert {reason for _, reason in udp["failures"]} <= SOCKET_ENDED, f"{where}: {udp['failures']}"
    assert survived > 0, "no held connection lived on an old pod until it stopped"
    c.kubectl("delete", "deployment/roll", "service/roll")


def test_type_changes_up_to_local_policy_and_its_health_check(cluster: Cluster, client_pod: Pod) -> None:
    c = cluster
    c.apply(deployment("morph", 1, node="node1"), selector_service("morph"))
    c.wait_rollout("default", "morph")
    vip = c.service("morph")["ips"][0]
    wait_programmed(c, c.n1, f"{vip}:80/TCP", 1)
    assert c.lab.client(client_pod, "tcp", vip, 80, count=5)["ok"] == 5

    c.kubectl("patch", "service/morph", "--type=merge", "-p", '{"spec":{"type":"NodePort"}}')
    np = c.service("morph")["node_ports"]["http"]
    wait_programmed(c, c.n2, f"0.0.0.0:{np}/TCP", 1)  # a NodePort: served on every node address
    assert c.lab.client(c.ext, "tcp", c.n2.ipv4, np, count=5)["ok"] == 5  # remote backend: masqueraded

    lb_ip = "172.16.100.7"
    c.kubectl("patch", "service/morph", "--type=merge", "-p", '{"spec":{"type":"LoadBalancer"}}')
    c.kubectl(  # what a cloud controller does once it has a load balancer
        "patch", "service/morph", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}}),
    )  # fmt: skip
    wait_programmed(c, c.n1, f"{lb_ip}:80/TCP", 1)
    assert c.lab.client(c.ext, "tcp", lb_ip, 80, count=5)["served"] == {next(iter(c.pod_names("morph"))): 5}

    c.kubectl("patch", "service/morph", "--type=merge", "-p", '{"spec":{"externalTrafficPolicy":"Local"}}')
    health = c.service("morph")["health"]
    assert health, "the API server allocates a healthCheckNodePort for Local LoadBalancers"
    wait_until(lambda: http_status(c, c.n1, health) == (200, 1), 10, "node1: 200 with one local endpoint")
    assert http_status(c, c.n2, health) == (503, 0)
    # Local: node2 has no endpoint and drops; node1 keeps the client's address
    assert c.lab.client(c.ext, "tcp", c.n2.ipv4, np, count=2, timeout=0.5)["errors"] == {"timeout": 2}
    seen = c.lab.client(c.ext, "tcp", c.n1.ipv4, np, count=5)
    assert seen["seen_as"] == {c.ext.ipv4: 5}
    c.kubectl("delete", "deployment/morph", "service/morph")


def test_prefer_close_keeps_traffic_in_the_zone_until_the_hints_go(cluster: Cluster, client_pod: Pod) -> None:
    c = cluster
    c.apply(deployment("topo", 4, spread=True), selector_service("topo", trafficDistribution="PreferClose"))
    c.wait_rollout("default", "topo")
    vip = c.service("topo")["ips"][0]

    def hinted() -> bool:
        slices = c.get("endpointslices", "-l", "kubernetes.io/service-name=topo")["items"]
        eps = [ep for s in slices for ep in s.get("endpoints") or []]
        return len(eps) == 4 and all(ep.get("hints", {}).get("forZones") for ep in eps)

    wait_until(hinted, 15, "the EndpointSlice controller to write zone hints")
    wait_programmed(c, c.n1, f"{vip}:80/TCP", 2)  # node1 is zone-a: its two endpoints only
    local = {p["metadata"]["name"] for p in c.pods("default", "app=topo") if p["spec"]["nodeName"] == "node1"}
    served = c.lab.client(client_pod, "tcp", vip, 80, count=60)
    assert served["ok"] == 60 and set(served["served"]) == local

    c.kubectl("patch", "service/topo", "--type=json", "-p", '[{"op":"remove","path":"/spec/trafficDistribution"}]')
    wait_programmed(c, c.n1, f"{vip}:80/TCP", 4)
    served = c.lab.client(client_pod, "tcp", vip, 80, count=80)
    assert set(served["served"]) == c.pod_names("topo")
    c.kubectl("delete", "deployment/topo", "service/topo")


def test_a_dual_stack_service_is_served_over_both_families(cluster: Cluster, client_pod: Pod) -> None:
    c = cluster
    c.apply(
        deployment("dual", 2, spread=True),
        selector_service("dual", type="NodePort", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]),
    )
    c.wait_rollout("default", "dual")
    info = c.service("dual")
    v4, v6 = info["ips"]
    assert ":" in v6 and ":" not in v4
    wait_programmed(c, c.n1, f"[{v6}]:80/TCP", 2)
    names = c.pod_names("dual")
    for vip in (v4, v6):
        for proto, port in (("tcp", 80), ("udp", 53)):
            result = c.lab.client(client_pod, proto, vip, port, count=30, connected=proto == "udp")
            assert result["ok"] == 30 and set(result["served"]) == names, (vip, proto, result)
    np = info["node_ports"]["http"]
    ext6 = c.lab.client(c.ext, "tcp", c.n1.ipv6, np, count=20)
    assert ext6["ok"] == 20 and ext6["peers"] == {fmt(c.n1.ipv6, np): 20}
    c.kubectl("delete", "deployment/dual", "service/dual")


def programmed_services(node: Node) -> dict[str, int]:
    """Frontend -> backend count, as the node's maps hold them."""
    return {r.frontend: len(r.scopes[0].backends) for r in read_services(node.bpffs_dir)}


def api_services(c: Cluster) -> dict[str, int]:
    """ClusterIP frontend -> ready endpoints, as the API holds them (ports 80/TCP only)."""
    out = {}
    for svc in c.get("services", "-A")["items"]:
        spec = svc["spec"]
        if spec.get("clusterIP") in (None, "None") or svc["metadata"]["namespace"] != "default":
            continue
        name = svc["metadata"]["name"]
        slices = c.get("endpointslices", "-l", f"kubernetes.io/service-name={name}")["items"]
        ready = {
            ep["addresses"][0]
            for s in slices
            if s["addressType"] == "IPv4"
            for ep in s.get("endpoints") or []
            if ep.get("conditions", {}).get("ready", True)
        }
        for port in spec["ports"]:
            if port["port"] == 80 and port.get("protocol", "TCP") == "TCP":
                out[f"{spec['clusterIP']}:80/TCP"] = len(ready)
    return out


def test_compaction_and_api_server_restarts_lose_nothing_and_never_stop_traffic(
    cluster: Cluster, client_pod: Pod
) -> None:
    c = cluster
    c.apply(
        deployment("steady", 2, spread=True),
        selector_service("steady"),
        deployment("churn", 1),
        selector_service("churn"),
    )
    c.wait_rollout("default", "steady")
    c.wait_rollout("default", "churn")
    vip, churn_vip = c.service("steady")["ips"][0], c.service("churn")["ips"][0]
    wait_programmed(c, c.n1, f"{vip}:80/TCP", 2)
    wait_programmed(c, c.n1, f"{churn_vip}:80/TCP", 1)
    loop = start_client_loop(c.lab, client_pod, vip, 80, 40, interval=0.02)
    agent = c.agents["node1"]
    relists_before = agent.log().count('"resourceVersion expired; relisting"')

    # 1. The API server goes away and comes back; while the agent's watches are still backing off, the cluster
    # changes and etcd is compacted: the agent's resume points are gone (410), it must relist.
    c.cp.stop_apiserver()
    time.sleep(2.0)
    c.cp.start_apiserver()
    c.kubectl("scale", "deployment/churn", "--replicas=3")
    c.apply(selector_service("late", selector="churn"))
    c.kubectl("delete", "service/churn")
    c.cp.compact_etcd()
    c.wait_rollout("default", "churn")
    late = c.service("late")["ips"][0]
    wait_programmed(c, c.n1, f"{late}:80/TCP", 3, timeout=30)  # made while the agent was not watching
    wait_until(lambda: f"{churn_vip}:80/TCP" not in programmed_services(c.n1), 30, "the deleted Service removed")
    wait_until(
        lambda: agent.log().count('"resourceVersion expired; relisting"') > relists_before, 30, "a relist on 410"
    )

    # 2. The agent restarts while the API server is down: the pinned maps keep serving.
    c.cp.stop_apiserver()
    agent.stop(signal.SIGTERM)
    agent.start()
    time.sleep(2.0)
    c.cp.start_apiserver()
    agent.wait_started(timeout=60)
    result = finish_client_loop(loop)
    assert result["errors"] == {} and result["ok"] > 500, result["errors"]
    # nothing lost, nothing left behind: node1 holds exactly the API's ClusterIP frontends on port 80
    expected = api_services(c)
    wait_until(lambda: expected.items() <= programmed_services(c.n1).items(), 15, "node1 in step after the restart")
    existing = {ip for s in c.get("services", "-A")["items"] for ip in s["spec"].get("clusterIPs", [])}
    leftovers = {f for f in programmed_services(c.n1) if f.rsplit(":", 1)[0].strip("[]") not in existing}
    assert not {f for f in leftovers if f.startswith(("10.96.", "[fd00:96"))}, leftovers
    c.kubectl("delete", "deployment/steady", "deployment/churn", "service/steady", "service/late")


def test_a_thousand_services_created_in_one_batch_are_all_programmed(cluster: Cluster) -> None:
    c = cluster
    count = 1000
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"bulk{i}", "namespace": "default", "labels": {"bulk": "yes"}},
            "spec": {"selector": {"app": "none"}, "ports": [{"port": 80, "protocol": "TCP"}]},
        }
        for i in range(count)
    ]
    started = time.monotonic()
    c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": services}))
    created = time.monotonic()
    ips = {s["spec"]["clusterIP"] for s in c.get("services", "-l", "bulk=yes")["items"]}
    assert len(ips) == count

    def programmed() -> bool:
        have = {r.frontend.rsplit(":", 1)[0] for r in read_services(c.n1.bpffs_dir)}
        return ips <= have

    wait_until(programmed, 120, f"{count} Services programmed on node1", interval=0.2)
    done = time.monotonic()
    print(
        f"{count} Services: kubectl create took {created - started:.1f} s; the last one was in node1's maps "
        f"{done - created:.1f} s after the create returned"
    )
    c.kubectl("delete", "services", "-l", "bulk=yes", "--wait=false")
    wait_until(
        lambda: not ({r.frontend.rsplit(":", 1)[0] for r in read_services(c.n1.bpffs_dir)} & ips),
        120,
        "the bulk Services removed",
        interval=0.2,
    )


def test_a_missing_permission_is_named_in_the_log_and_in_kpr_status(cluster: Cluster) -> None:
    c = cluster
    c.kubectl("create", "serviceaccount", "kpr-limited", "-n", "kube-system")
    c.kubectl("create", "clusterrole", "kpr-limited", "--verb=list,watch", "--resource=services,nodes")
    c.kubectl(
        "create", "clusterrolebinding", "kpr-limited", "--clusterrole=kpr-limited",
        "--serviceaccount=kube-system:kpr-limited",
    )  # fmt: skip
    node = c.lab.add_node("node3")
    agent = LabAgent(c.lab, node, kubeconfig=c.cp.service_account_kubeconfig("kube-system", "kpr-limited")).start()
    try:
        wait_until(lambda: "the API server refuses this agent" in agent.log(), 30, "the refusal logged")
        line = next(json.loads(x) for x in agent.log().splitlines() if "the API server refuses this agent" in x)
        assert "endpointslices" in line["detail"] and "cannot list" in line["detail"]
        status = agent.kpr("status", "--bpffs-dir", str(node.bpffs_dir), "--cgroup-root", str(node.cgroup)).stdout
        assert "EndpointSlice forbidden" in status and "bind deploy/clusterrole.yaml" in status
    finally:
        agent.stop()
        c.kubectl("delete", "clusterrolebinding/kpr-limited", "clusterrole/kpr-limited")
        c.kubectl("delete", "serviceaccount/kpr-limited", "-n", "kube-system")


def test_a_conflicting_service_gets_kprs_warning_event(cluster: Cluster) -> None:
    """Two Services claim one externalIP:port: the one that does not get it has a Warning Event from each node's
    kpr (`kubectl get events` and `kubectl describe service` show it: the Event names the Service's uid)."""
    c = cluster
    claim: dict[str, Any] = {"externalIPs": ["192.0.2.50"], "ports": [("http", 80, 8080, "TCP")]}
    c.apply(selector_service("ext-a", selector="client", **claim))  # the client pod: one backend
    for node in (c.n1, c.n2):
        wait_programmed(c, node, "192.0.2.50:80/TCP", 1)
    c.apply(selector_service("ext-b", selector="nothing", **claim))
    try:

        def kpr_events() -> list[dict[str, Any]]:
            found = c.get("events", "-n", "default", "--field-selector", "reason=FrontendConflict")["items"]
            return [e for e in found if e.get("reportingComponent") == "kpr"]

        events = wait_until(lambda: len(kpr_events()) == 2 and kpr_events(), 30, "an Event from each node's kpr")
        uid = c.get("service", "-n", "default", "ext-b")["metadata"]["uid"]
        assert {e["reportingInstance"] for e in events} == {"kpr-node1", "kpr-node2"}
        for e in events:
            assert e["type"] == "Warning" and e["involvedObject"]["name"] == "ext-b"
            assert e["involvedObject"]["uid"] == uid and "already served for default/ext-a" in e["message"]
        assert "FrontendConflict" in c.kubectl("describe", "service", "-n", "default", "ext-b")
        # The series patch kpr sends for repeats (a strategic merge patch) is what the real API server takes.
        name = events[0]["metadata"]["name"]
        patch = json.dumps(Series(name, "default", {}, count=3, last_seen_wall=time.time()).patch())
        c.kubectl("patch", "events.v1.events.k8s.io", "-n", "default", name, "--type=strategic", "-p", patch)
        assert c.get("events.v1.events.k8s.io", "-n", "default", name)["series"]["count"] == 3
    finally:
        c.kubectl("delete", "service", "-n", "default", "ext-a", "ext-b")
