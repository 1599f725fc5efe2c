"""The operator's tools against a running lab agent: status, services, explain, health and metrics endpoints,
and cleanup of kube-proxy's leftovers in a namespace holding real kube-proxy-style rules."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kpr.agent import http
from kpr.datapath import netns
from kpr.datapath.loader import attached_programs
from kpr.lab import Lab, Node
from kpr.lab.cluster import LabAgent, endpoint_slice, pod_endpoints, service, wait_until, write_manifest

pytestmark = pytest.mark.datapath

GET = """
import json, sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], method=sys.argv[2]), timeout=5)
    status, headers, body = r.status, dict(r.headers), r.read().decode()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, dict(e.headers), e.read().decode()
print(json.dumps({"status": status, "headers": headers, "body": body}))
"""


def http_get(lab: Lab, node: Node, url: str, method: str = "GET") -> dict[str, Any]:
    """A request from inside the node's namespace, where the agent listens."""
    return json.loads(lab.run(node, [sys.executable, "-c", GET, url, method]).stdout)  # type: ignore[no-any-return]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Lab, LabAgent, Path]]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        pods = [lab.add_pod(node, n) for n in ("pod-a", "pod-b")]
        lab.add_pod(node, "client", echo=False)
        write_manifest(
            tmp_path,
            "web.yaml",
            [
                service("web", ["10.96.5.10"], [("http", 80, 8080, "TCP")]),
                endpoint_slice("web", pod_endpoints(pods), [("http", 8080, "TCP")]),
            ],
        )
        agent = LabAgent(lab, node, tmp_path).start()
        agent.wait_started()
        yield lab, agent, tmp_path
        lab.assert_host_isolated()
    finally:
        lab.close()


def test_status_services_and_explain_on_a_live_node(running: tuple[Lab, LabAgent, Path]) -> None:
    lab, agent, _ = running
    node = agent.node
    lab.client(lab.pods["client"], "tcp", "10.96.5.10", 80, count=20)
    args = ("--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir))
    report = json.loads(agent.kpr("status", *args, "-o", "json").stdout)
    assert report["agent"]["healthy"] and report["agent"]["services"] == 1 and report["agent"]["backends"] == 2
    assert report["missing_hooks"] == [] and len(report["programs"]) == 8
    assert {m["name"]: m["entries"] for m in report["maps"]}["services4"] == 3  # master + 2 slots
    assert report["counters"]["xlate_fwd"] >= 20 and report["warnings"] == []
    text = agent.kpr("status", *args).stdout
    assert text.startswith("Agent:        healthy") and "full: 8/8 hooks attached" in text

    explained = json.loads(
        agent.kpr(
            "explain", "--bpffs-dir", str(node.bpffs_dir), "-o", "json", lab.pods["client"].ipv4, "10.96.5.10:80/TCP"
        ).stdout
    )
    assert explained["verdict"] == "load-balanced" and explained["service"] == "default/web:http"
    assert sorted(explained["candidates"]) == [f"{lab.pods[p].ipv4}:8080/TCP" for p in ("pod-a", "pod-b")]

    agent.stop(signal.SIGTERM)
    down = agent.kpr("status", *args).stdout
    assert down.startswith("Agent:        DOWN") and "services4" in down
    assert "the agent does not answer; the maps keep serving what they hold" in down


def test_health_and_metrics_endpoints_follow_changes(running: tuple[Lab, LabAgent, Path]) -> None:
    lab, agent, manifests = running
    node = agent.node
    health = http_get(lab, node, "http://127.0.0.1:10256/healthz")
    assert health["status"] == 200
    body = json.loads(health["body"])
    # kube-proxy v1.37's ProxyHealth
    assert set(body) == {"lastUpdated", "currentTime", "nodeEligible", "healthy", "status"}
    assert body["lastUpdated"].endswith("Z") and body["nodeEligible"] is True and body["healthy"] is True
    assert set(body["status"]) == {"IPv4", "IPv6"}
    assert http_get(lab, node, "http://127.0.0.1:10256/livez")["status"] == 200
    assert http_get(lab, node, "http://127.0.0.1:10249/proxyMode")["body"] == "kpr"

    def metric(name: str) -> float:
        text = http_get(lab, node, "http://127.0.0.1:10249/metrics")["body"]
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    syncs = metric("kpr_sync_duration_seconds_count")
    ops = metric("kpr_map_operations_total")
    assert metric("kpr_backends") == 2
    write_manifest(
        manifests,
        "web.yaml",
        [
            service("web", ["10.96.5.10"], [("http", 80, 8080, "TCP")]),
            endpoint_slice("web", pod_endpoints([lab.pods["pod-a"]]), [("http", 8080, "TCP")]),
        ],
    )
    wait_until(lambda: metric("kpr_backends") == 1, 15, "the metric to follow the change")
    # pod-b held the last slot: shrink the master, delete that slot, mark the backend gone (tracked TCP flows would
    # keep it) and, no flow naming it, delete it
    assert metric("kpr_sync_duration_seconds_count") > syncs and metric("kpr_map_operations_total") == ops + 4
    later = json.loads(http_get(lab, node, "http://127.0.0.1:10256/healthz")["body"])
    assert later["lastUpdated"] > body["lastUpdated"]
    assert http_get(lab, node, "http://127.0.0.1:10256/nothing")["status"] == 404


KUBE_PROXY_IPTABLES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-A - [0:0]
:MY-OWN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 192.0.2.0/24 -j MY-OWN
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SVC-WEB -m statistic --mode random --probability 1.0 -j KUBE-SEP-A
-A KUBE-SEP-A -p tcp -j DNAT --to-destination 10.244.1.11:8080
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -j MASQUERADE
-A MY-OWN -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A INPUT -p tcp --dport 22 -j ACCEPT
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"""

KUBE_PROXY_NFT = """\
table ip kube-proxy {
  chain services { }
  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }
}
table ip6 kube-proxy {
  chain services { }
}
table inet mine {
  chain input { type filter hook input priority 0; policy accept; }
}
"""


def test_cleanup_kube_proxy_removes_its_rules_keeps_the_rest_and_can_run_twice(lab_factory: Any) -> None:
    lab = lab_factory()
    node = lab.add_node("node1")
    for restore in ("iptables-nft-restore", "iptables-legacy-restore"):
        lab.run(node, [restore], input=KUBE_PROXY_IPTABLES)
    lab.run(
        node,
        ["ip6tables-nft-restore"],
        input=KUBE_PROXY_IPTABLES.split("*filter")[0]
        .replace("10.96.0.10/32", "fd00:96::10/128")
        .replace("10.244.1.11:8080", "[fd00:244:1::11]:8080")
        .replace("192.0.2.0/24", "2001:db8::/32"),
    )
    lab.run(node, ["nft", "-f", "-"], input=KUBE_PROXY_NFT)

    kpr = [
        sys.executable,
        "-m",
        "kpr.cli.main",
        "cleanup",
        "--kube-proxy",
        "--cgroup-root",
        str(node.cgroup),
        "--bpffs-dir",
        str(node.bpffs_dir),
    ]
    first = lab.run(node, kpr).stdout
    assert "iptables-legacy -t nat: chain KUBE-SVC-WEB" in first
    assert "iptables-nft -t filter: chain KUBE-FORWARD" in first and "ip6tables-nft -t nat: chain KUBE-SEP-A" in first
    assert "nftables: table ip kube-proxy" in first and "nftables: table ip6 kube-proxy" in first

    for save in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save"):
        left = lab.run(node, [save]).stdout
        assert "KUBE-" not in left, left
        assert ":MY-OWN" in left and "-A MY-OWN -j RETURN" in left  # another tool's chain and rules stay
    assert "--dport 22 -j ACCEPT" in lab.run(node, ["iptables-nft-save"]).stdout
    tables = lab.run(node, ["nft", "list", "tables"]).stdout
    assert "kube-proxy" not in tables and "table inet mine" in tables

    second = lab.run(node, kpr).stdout
    assert "removed 0 piece(s) of kube-proxy state" in second


def test_cleanup_kube_proxy_keep_kpr_switches_a_node_while_the_agent_serves(
    running: tuple[Lab, LabAgent, Path],
) -> None:
    lab, agent, _ = running
    node = agent.node
    lab.run(node, ["iptables-nft-restore"], input=KUBE_PROXY_IPTABLES)
    out = agent.kpr(
        "cleanup", "--kube-proxy", "--keep-kpr", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir)
    ).stdout
    assert "iptables-nft -t nat: chain KUBE-SERVICES" in out and "detached" not in out
    assert "KUBE-" not in lab.run(node, ["iptables-nft-save"]).stdout
    assert len([p for p in attached_programs(node.cgroup) if p.name.startswith("kpr_")]) == 8
    assert lab.client(lab.pods["client"], "tcp", "10.96.5.10", 80, count=20)["ok"] == 20
    usage = agent.kpr("cleanup", "--keep-kpr", check=False)
    assert usage.returncode != 0 and "--keep-kpr goes with --kube-proxy" in usage.stderr


def node_manifest(name: str, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, **metadata}, "spec": {}}


def test_healthz_as_kube_proxy_answers_it_any_method_over_both_families_and_when_the_node_goes(
    running: tuple[Lab, LabAgent, Path],
) -> None:
    """kube-proxy (>= 1.28): /healthz fails with nodeEligible false for a node being deleted or tainted by the cluster
    autoscaler, so load balancers drain it; Go's server answers every method and its 0.0.0.0 listens on IPv6 too."""
    lab, agent, manifests = running
    node = agent.node
    for url in ("http://127.0.0.1:10256/healthz", "http://[::1]:10256/healthz", f"http://[{node.ipv6}]:10256/livez"):
        assert http_get(lab, node, url)["status"] == 200, url
    # an IPv6 or wildcard --metrics-bind-address serves both families too (the same listener code, in this namespace)
    registry = CollectorRegistry()
    for address, port in (("[::]", 10349), ("0.0.0.0", 10350), ("[::1]", 10351)):
        server = netns.run_in(
            f"/run/netns/{node.netns}",
            lambda a=address, p=port: http.serve(f"{a}:{p}", http.metrics_routes(registry), "m"),
        )
        try:
            urls = [f"http://[::1]:{port}/proxyMode"] + (
                [f"http://127.0.0.1:{port}/proxyMode"] if address != "[::1]" else []
            )
            assert all(http_get(lab, node, url)["body"] == "kpr" for url in urls), address
        finally:
            server.shutdown()
            server.server_close()
    head = http_get(lab, node, "http://127.0.0.1:10256/healthz", "HEAD")
    assert head["status"] == 200 and head["body"] == "" and int(head["headers"]["Content-Length"]) > 0
    assert http_get(lab, node, "http://127.0.0.1:10256/healthz", "OPTIONS")["status"] == 200
    assert http_get(lab, node, "http://127.0.0.1:10256/healthz/", "GET")["status"] == 404

    for label, obj in (
        ("deleted", node_manifest(node.name, deletionTimestamp="2026-12-05T10:00:00Z")),
        ("tainted", {**node_manifest(node.name), "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]}}),
    ):
        write_manifest(manifests, "node.yaml", [obj])
        drained = wait_until(
            lambda: (r := http_get(lab, node, "http://127.0.0.1:10256/healthz"))["status"] == 503 and r,
            10,
            f"/healthz to fail for a {label} node",
        )
        assert json.loads(drained["body"])["nodeEligible"] is False
        assert http_get(lab, node, "http://127.0.0.1:10256/livez")["status"] == 200  # alive all the same
        write_manifest(manifests, "node.yaml", [node_manifest(node.name)])
        wait_until(lambda: http_get(lab, node, "http://127.0.0.1:10256/healthz")["status"] == 200, 10, "eligible again")


SLOWLORIS = """
import json, socket, sys, time
port, held = int(sys.argv[1]), int(sys.argv[2])
conns = []
for _ in range(held):  # connections that send half a request and wait
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n")
    conns.append(s)
time.sleep(float(sys.argv[3]))
closed = 0
for s in conns:
    s.settimeout(0.5)
    try:
        closed += s.recv(1) == b""
    except TimeoutError:
        pass  # still held open by the server
    except ConnectionError:
        closed += 1
print(json.dumps({"closed": closed}))
"""


def test_half_sent_requests_cannot_pile_up_threads(
    running: tuple[Lab, LabAgent, Path],
) -> None:
    """286 connections each sending half a request used to hold a thread each, forever. Now each gets
    http.REQUEST_TIMEOUT seconds, at most http.MAX_CONNECTIONS are served at once and the rest are closed."""
    lab, agent, _ = running
    threads_before = len(list(Path(f"/proc/{agent.proc.pid}/task").iterdir()))
    wait = http.REQUEST_TIMEOUT + 1
    out = lab.run(agent.node, [sys.executable, "-c", SLOWLORIS, "10256", "286", str(wait)], timeout=60)
    result = json.loads(out.stdout)
    assert result["closed"] == 286  # the over-limit ones at once, the rest after the request timeout
    threads_after = len(list(Path(f"/proc/{agent.proc.pid}/task").iterdir()))
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    # while every slot is taken a probe is closed unanswered; once the timeout freed them, it is answered
    assert http_get(lab, agent.node, "http://127.0.0.1:10256/healthz")["status"] == 200
