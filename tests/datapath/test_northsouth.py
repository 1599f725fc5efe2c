"""North-south traffic through the tc programs, on a two-node lab with external clients on the underlay.

node1 runs pod-a and a client pod, node2 runs pod-b and pod-c; each node has its own agent with --devices eth0, and
node1's also serves ClusterIPs from outside and knows the pods' CIDRs (--external-cluster-ip, --cluster-cidr).
External clients `ext` (allowed by loadBalancerSourceRanges) and `ext2` (not) route the LoadBalancer and external IPs
(172.16.100.0/24, fd00:100::/64) via node1, as a router or MetalLB would, and the ClusterIPs (10.96.6.0/24,
fd00:96::6:0/112) as a BGP-advertised service range would: `ext` via node1, `ext2` via node2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_backends, read_conntrack, read_counters, read_services
from kpr.lab import External, Lab, Node, Pod
from kpr.lab.cluster import LabAgent, endpoint_slice, pod_endpoints, service, wait_until, write_manifest
from kpr.lab.layout import CLUSTER_CIDRS

pytestmark = [pytest.mark.datapath, pytest.mark.slow]

PORTS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
LB4, LB6, EIP4, EIP6, RANGED4 = "172.16.100.1", "fd00:100::1", "172.16.100.3", "fd00:100::3", "172.16.100.4"


def node_object(n: Node) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name},
        "status": {"addresses": [{"type": "InternalIP", "address": n.ipv4}, {"type": "InternalIP", "address": n.ipv6}]},
    }


def slices(name: str, pods: list[Pod]) -> list[dict[str, Any]]:
    return [
        endpoint_slice(name, pod_endpoints(pods, 4), PORTS, family=4),
        endpoint_slice(name, pod_endpoints(pods, 6), PORTS, family=6),
    ]


def with_lb_status(svc: dict[str, Any], *ips: str) -> dict[str, Any]:
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}
    return svc


@dataclass
class Cluster:
    lab: Lab
    n1: Node
    n2: Node
    a: Pod
    b: Pod
    c: Pod
    client: Pod
    ext: External
    ext2: External
    agents: list[LabAgent]
    manifests: Path

    def objects(self, local_pods: list[Pod], ranges: list[str] | None = None) -> list[dict[str, Any]]:
        """Every Service of the suite; `local_pods` are the endpoints of the externalTrafficPolicy=Local one, `ranges`
        (default: `ext` only) the loadBalancerSourceRanges of the "ranged" one."""
        both = ["10.96.6.1", "fd00:96::6:1"]
        return [
            node_object(self.n1),
            node_object(self.n2),
            service("np", both, [("http", 80, 8080, "TCP", 30080), ("dns", 53, 8080, "UDP", 30053)], type="NodePort"),
            *slices("np", [self.b, self.c]),
            with_lb_status(
                service(
                    "local",
                    ["10.96.6.2", "fd00:96::6:2"],
                    [("http", 80, 8080, "TCP", 30081)],
                    type="LoadBalancer",
                    externalTrafficPolicy="Local",
                    healthCheckNodePort=32000,
                )
            ),
            *slices("local", local_pods),
            with_lb_status(
                service(
                    "lb",
                    ["10.96.6.3", "fd00:96::6:3"],
                    [("http", 80, 8080, "TCP", 30082), ("dns", 53, 8080, "UDP", 30083)],
                    type="LoadBalancer",
                    externalIPs=[EIP4, EIP6],
                ),
                LB4,
                LB6,
            ),
            *slices("lb", [self.a, self.b]),
            with_lb_status(
                service(
                    "ranged",
                    ["10.96.6.4"],
                    [("http", 80, 8080, "TCP", 30084), ("dns", 53, 8080, "UDP", 30085)],
                    type="LoadBalancer",
                    loadBalancerSourceRanges=ranges or [f"{self.ext.ipv4}/32"],
                ),
                RANGED4,
            ),
            *slices("ranged", [self.a]),
            service(
                "itp-local", ["10.96.6.5", "fd00:96::6:5"], [("http", 80, 8080, "TCP")], internalTrafficPolicy="Local"
            ),
            *slices("itp-local", [self.a, self.b]),
            service(
                "empty",
                ["10.96.6.6", "fd00:96::6:6"],
                [("http", 80, 8080, "TCP", 30090), ("dns", 53, 8080, "UDP", 30091)],
                type="NodePort",
            ),
        ]

    def counters(self, node: Node) -> dict[str, int]:
        return read_counters(node.bpffs_dir)

    def get(self, where: Any, url: str) -> dict[str, Any]:
        script = (
            "import json,sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=3); s,h,b=r.status,dict(r.headers),r.read()\n"
            "except urllib.error.HTTPError as e:\n s,h,b=e.code,dict(e.headers),e.read()\n"
            "print(json.dumps({'status':s,'headers':h,'body':json.loads(b)}))"
        )
        return json.loads(self.lab.run(where, [sys.executable, "-c", script, url]).stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    lab = Lab()
    try:
        n1, n2 = lab.add_node("node1"), lab.add_node("node2")
        a = lab.add_pod(n1, "pod-a")
        b, c = lab.add_pod(n2, "pod-b"), lab.add_pod(n2, "pod-c")
        client = lab.add_pod(n1, "client", echo=False)
        ext, ext2 = lab.add_external("ext"), lab.add_external("ext2")
        for x in (ext, ext2):
            lab.run(x, ["ip", "route", "add", "172.16.100.0/24", "via", n1.ipv4])
            lab.run(x, ["ip", "-6", "route", "add", "fd00:100::/64", "via", n1.ipv6])
        for x, n in ((ext, n1), (ext2, n2)):  # node1 serves ClusterIPs from outside, node2 does not
            lab.run(x, ["ip", "route", "add", "10.96.6.0/24", "via", n.ipv4])
            lab.run(x, ["ip", "-6", "route", "add", "fd00:96::6:0/112", "via", n.ipv6])
        manifests = tmp_path_factory.mktemp("ns-manifests")
        cl = Cluster(lab, n1, n2, a, b, c, client, ext, ext2, [], manifests)
        write_manifest(manifests, "all.yaml", cl.objects([b]))
        node1_flags = ["--external-cluster-ip", "--cluster-cidr", ",".join(CLUSTER_CIDRS)]
        cl.agents = [
            LabAgent(lab, n1, manifests, extra_args=["--devices", "eth0", *node1_flags]).start(),
            LabAgent(lab, n2, manifests, extra_args=["--devices", "eth0"]).start(),
        ]
        for agent in cl.agents:
            agent.wait_started()
        wait_until(
            lambda: all(any(r.frontend == "0.0.0.0:30084/TCP" for r in read_services(n.bpffs_dir)) for n in (n1, n2)),
            20,
            "both nodes programmed",
        )
        yield cl
        lab.assert_host_isolated()
    finally:
        lab.close()


def addr(node: Node, family: int) -> str:
    return node.ipv4 if family == 4 else node.ipv6


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("proto", "port"), [("tcp", 30080), ("udp", 30053)])
def test_nodeport_cluster_policy_masquerades_to_backends_on_another_node(
    cluster: Cluster, proto: str, port: int, family: int
) -> None:
    c = cluster
    target = addr(c.n1, family)
    result = c.lab.client(c.ext, proto, target, port, count=60, timeout=2, connected=proto == "udp")
    assert result["ok"] == 60, result["errors"]
    assert set(result["served"]) == {"pod-b", "pod-c"}  # node2's pods, reached through node1
    assert result["seen_as"] == {target: 60}  # masqueraded to node1's address
    assert result["peers"] == {fmt(target, port): 60}  # the client sees the NodePort answer


def test_nodeport_local_policy_drops_without_a_local_backend_and_keeps_the_client_address(cluster: Cluster) -> None:
    c = cluster
    before = c.counters(c.n1)["tc_drop_no_local"]
    dropped = c.lab.client(c.ext, "tcp", c.n1.ipv4, 30081, count=2, timeout=0.5)
    assert dropped["ok"] == 0 and dropped["errors"] == {"timeout": 2}  # dropped, as kube-proxy does: no reset
    assert c.counters(c.n1)["tc_drop_no_local"] > before
    for family in (4, 6):
        served = c.lab.client(c.ext, "tcp", addr(c.n2, family), 30081, count=20)
        assert served["served"] == {"pod-b": 20}
        assert served["seen_as"] == {addr(c.ext, family): 20}  # no masquerade: the backend sees the real client


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("proto", "port"), [("tcp", 80), ("udp", 53)])
@pytest.mark.parametrize("kind", ["LoadBalancer", "ExternalIP"])
def test_load_balancer_and_external_ips(cluster: Cluster, kind: str, proto: str, port: int, family: int) -> None:
    c = cluster
    vip = {("LoadBalancer", 4): LB4, ("LoadBalancer", 6): LB6, ("ExternalIP", 4): EIP4, ("ExternalIP", 6): EIP6}[
        (kind, family)
    ]
    result = c.lab.client(c.ext, proto, vip, port, count=60, timeout=2, connected=proto == "udp")
    assert result["ok"] == 60, result["errors"]
    assert set(result["served"]) == {"pod-a", "pod-b"}  # a local and a remote backend
    assert result["peers"] == {fmt(vip, port): 60}


def test_load_balancer_source_ranges(cluster: Cluster) -> None:
    c = cluster
    allowed = c.lab.client(c.ext, "tcp", RANGED4, 80, count=10)
    assert allowed["served"] == {"pod-a": 10}
    before = c.counters(c.n1)["tc_drop_source_range"]
    blocked = c.lab.client(c.ext2, "tcp", RANGED4, 80, count=2, timeout=0.5)
    assert blocked["ok"] == 0 and blocked["errors"] == {"timeout": 2}
    assert c.counters(c.n1)["tc_drop_source_range"] > before


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("proto", "port"), [("tcp", 30090), ("udp", 30091)])
def test_no_endpoints_is_answered_with_a_reset_or_port_unreachable_at_once(
    cluster: Cluster, proto: str, port: int, family: int
) -> None:
    c = cluster
    key = "tc_reject_tcp" if proto == "tcp" else "tc_reject_udp"
    before = c.counters(c.n1)[key]
    result = c.lab.client(c.ext, proto, addr(c.n1, family), port, count=5, timeout=2, connected=True)
    assert result["errors"] == {"ECONNREFUSED": 5}
    assert result["error_latency_ms"]["max"] < 100
    assert c.counters(c.n1)[key] - before == 5


def test_load_balancer_source_ranges_apply_to_pods_and_the_node_as_kube_proxys_firewall(cluster: Cluster) -> None:
    """kube-proxy's firewall chain checks every source, in-cluster ones too: a pod or the node outside the ranges is
    refused (at connect(), with EPERM, where kube-proxy's drop makes the client wait), one inside is served; when a
    range holds the node's IP, the LoadBalancer IPs count as allowed sources (kube-proxy's node-IP rule)."""
    c = cluster

    def refused() -> int:
        return c.counters(c.n1)["reject_source_range"]

    before = refused()
    for who in (c.client, c.n1):
        result = c.lab.client(who, "tcp", RANGED4, 80, count=3, timeout=2)
        assert result["errors"] == {"EPERM": 3} and result["error_latency_ms"]["max"] < 100, (who.name, result)
    udp = c.lab.client(c.client, "udp", RANGED4, 53, count=2, timeout=1)
    assert udp["errors"] == {"EPERM": 2}  # sendmsg() is refused the same way
    assert refused() - before == 8
    try:
        write_manifest(c.manifests, "all.yaml", c.objects([c.b], [f"{c.ext.ipv4}/32", f"{c.client.ipv4}/32"]))
        wait_until(lambda: c.lab.client(c.client, "tcp", RANGED4, 80, count=1)["ok"] == 1, 15, "the pod allowed")
        assert c.lab.client(c.client, "tcp", RANGED4, 80, count=10)["served"] == {"pod-a": 10}
        assert c.lab.client(c.n1, "tcp", RANGED4, 80, count=2, timeout=2)["errors"] == {"EPERM": 2}
        write_manifest(c.manifests, "all.yaml", c.objects([c.b], ["172.16.0.0/24"]))  # holds node1's IP
        wait_until(lambda: c.lab.client(c.n1, "tcp", RANGED4, 80, count=1)["ok"] == 1, 15, "the node allowed")
        assert c.lab.client(c.client, "tcp", RANGED4, 80, count=2, timeout=2)["errors"] == {"EPERM": 2}
        rows = [r for r in read_services(c.n1.bpffs_dir) if r.frontend == f"{RANGED4}:80/TCP"]
        assert "source-ranges" in rows[0].scopes[0].flags
    finally:
        write_manifest(c.manifests, "all.yaml", c.objects([c.b]))
    wait_until(lambda: c.lab.client(c.ext, "tcp", RANGED4, 80, count=1)["ok"] == 1, 15, "back to ext only")


def test_health_check_node_port_follows_local_endpoints(cluster: Cluster) -> None:
    c = cluster

    def check(node: Node) -> dict[str, Any]:
        return c.get(c.ext, f"http://{node.ipv4}:32000/")

    def expect(node: Node, status: int, count: int) -> bool:
        got = check(node)
        return got["status"] == status and got["body"]["localEndpoints"] == count

    first = check(c.n2)
    assert first["status"] == 200 and first["headers"]["X-Load-Balancing-Endpoint-Weight"] == "1"
    # the IPv6 listener reports the IPv6 endpoints (kube-proxy's IPv6 proxier has its own health server)
    over_v6 = c.get(c.ext, f"http://[{c.n2.ipv6}]:32000/")
    assert over_v6["status"] == 200 and over_v6["body"]["localEndpoints"] == 1
    assert first["body"] == {
        "service": {"namespace": "default", "name": "local"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    other = check(c.n1)
    assert other["status"] == 503 and other["headers"]["X-Load-Balancing-Endpoint-Weight"] == "0"  # as kube-proxy 1.37
    try:
        write_manifest(c.manifests, "all.yaml", c.objects([c.b, c.c]))
        wait_until(lambda: expect(c.n2, 200, 2), 15, "two local endpoints on node2")
        write_manifest(c.manifests, "all.yaml", c.objects([]))
        wait_until(lambda: expect(c.n2, 503, 0), 15, "no local endpoint on node2")
    finally:
        write_manifest(c.manifests, "all.yaml", c.objects([c.b]))
        wait_until(lambda: expect(c.n2, 200, 1), 15, "back to one")


STREAM = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
sent = ok = 0; errors = []
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    line = f"ping {sent}\n".encode(); sent += 1
    try:
        s.sendall(line); got = b""
        while not got.endswith(b"\n"): got += s.recv(100) or b"!"
        ok += got == line
    except OSError as e:
        errors.append(str(e)); break
    time.sleep(0.02)
print(json.dumps({"sent": sent, "ok": ok, "errors": errors}))
"""


def test_a_long_tcp_stream_survives_other_changes_and_a_removed_backend_refuses_new_flows(cluster: Cluster) -> None:
    c = cluster
    # A line echo on pod-c only (port 9000), published by its own NodePort service.
    c.lab.spawn(c.c, ["socat", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"])
    stream_svc = [
        service("stream", ["10.96.6.9"], [("echo", 9000, 9000, "TCP", 30099)], type="NodePort"),
        endpoint_slice("stream", pod_endpoints([c.c]), [("echo", 9000, "TCP")]),
    ]
    write_manifest(c.manifests, "stream.yaml", stream_svc)
    wait_until(
        lambda: any(r.frontend == "0.0.0.0:30099/TCP" and r.scopes[0].backends for r in read_services(c.n1.bpffs_dir)),
        15,
        "stream service",
    )
    time.sleep(0.3)  # let socat listen
    stream = c.lab.spawn(c.ext, [sys.executable, "-c", STREAM, c.n1.ipv4, "30099", "4"], stdout=-1, text=True)
    for i in range(6):  # other services come and go meanwhile
        write_manifest(
            c.manifests,
            "churn.yaml",
            [
                service(f"churn{i}", [f"10.96.7.{i + 1}"], [("http", 80, 8080, "TCP", 31000 + i)], type="NodePort"),
                endpoint_slice(f"churn{i}", pod_endpoints([c.a]), PORTS),
            ],
        )
        time.sleep(0.4)
    (c.manifests / "churn.yaml").unlink()
    out, _ = stream.communicate(timeout=30)
    result = json.loads(out)
    assert result["errors"] == [] and result["ok"] == result["sent"] > 100

    backend = f"{c.c.ipv4}:9000/TCP"
    assert any(f.backend == backend for f in read_conntrack(c.n1.bpffs_dir))
    write_manifest(c.manifests, "stream.yaml", [stream_svc[0], endpoint_slice("stream", [], [("echo", 9000, "TCP")])])
    # The endpoint left the slice: its backend stays (marked gone) while the stream's closing flow may still use it,
    # as kube-proxy leaves TCP conntrack entries alone; new flows find no backend and are reset.
    wait_until(
        lambda: any(b.address == backend and b.state == "gone" for b in read_backends(c.n1.bpffs_dir)),
        15,
        "the removed backend kept, marked gone",
    )
    refused = c.lab.client(c.ext, "tcp", c.n1.ipv4, 30099, count=2, timeout=2)
    assert refused["errors"] == {"ECONNREFUSED": 2}  # new flows find no backend: reset
    (c.manifests / "stream.yaml").unlink()


def test_pods_and_the_node_reach_nodeports_and_load_balancer_ips(cluster: Cluster) -> None:
    c = cluster
    own = c.lab.client(c.client, "tcp", c.n1.ipv4, 30080, count=30)  # socket LB on node1
    other = c.lab.client(c.client, "tcp", c.n2.ipv4, 30080, count=30)  # tc on node2
    from_node = c.lab.client(c.n1, "tcp", LB4, 80, count=30)  # socket LB for the node's own processes
    for result in (own, other):
        assert result["ok"] == 30 and set(result["served"]) == {"pod-b", "pod-c"}
    assert from_node["ok"] == 30 and set(from_node["served"]) == {"pod-a", "pod-b"}
    assert from_node["peers"] == {f"{LB4}:80": 30}


@pytest.mark.parametrize("family", [4, 6])
def test_external_cluster_ip_serves_clusterips_from_outside_under_both_internal_policies(
    cluster: Cluster, family: int
) -> None:
    """kube-proxy DNATs a ClusterIP packet from outside the node (a routed or BGP-advertised service range); with
    --external-cluster-ip kpr does too. Cluster policy: node2's endpoints, masqueraded so replies come back through
    node1. internalTrafficPolicy=Local: node1's endpoint only. node2 runs without the flag: left to routing."""
    c = cluster
    cluster_ip, local_ip = ("10.96.6.1", "10.96.6.5") if family == 4 else ("fd00:96::6:1", "fd00:96::6:5")
    remote = c.lab.client(c.ext, "tcp", cluster_ip, 80, count=30)
    assert remote["ok"] == 30 and set(remote["served"]) == {"pod-b", "pod-c"}, remote["errors"]
    assert remote["seen_as"] == {addr(c.n1, family): 30}  # masqueraded to node1's address
    assert remote["peers"] == {fmt(cluster_ip, 80): 30}  # the client sees the ClusterIP answer
    udp = c.lab.client(c.ext, "udp", cluster_ip, 53, count=20, connected=True)
    assert udp["ok"] == 20 and udp["peers"] == {fmt(cluster_ip, 53): 20}
    local = c.lab.client(c.ext, "tcp", local_ip, 80, count=30)
    assert local["served"] == {"pod-a": 30}  # internalTrafficPolicy=Local: node1's endpoint, never node2's
    assert local["seen_as"] == {addr(c.ext, family): 30}  # DIFFERENT FROM KUBE-PROXY: no masquerade (README)
    assert local["peers"] == {fmt(local_ip, 80): 30}
    # node2 runs without the flag: ext2 routes the ClusterIPs via node2, which leaves them to routing (no route)
    unserved = c.lab.client(c.ext2, "tcp", cluster_ip, 80, count=1, timeout=0.5)
    assert unserved["ok"] == 0
    explained = (
        c.agents[0]
        .kpr(
            "explain", "--bpffs-dir", str(c.n1.bpffs_dir), "--external", addr(c.ext, family), f"{fmt(local_ip, 80)}/TCP"
        )
        .stdout
    )
    assert "ClusterIP frontend" in explained and "load-balanced" in explained, explained


def test_cluster_cidr_lets_pods_of_other_nodes_reach_local_policy_frontends(cluster: Cluster) -> None:
    """kube-proxy's detect-local: a pod (source in --cluster-cidr) reaching an externalTrafficPolicy=Local NodePort
    of a node without a local endpoint is served from every endpoint, where an external client is dropped."""
    c = cluster
    for family in (4, 6):
        from_pod = c.lab.client(c.c, "tcp", addr(c.n1, family), 30081, count=20)  # pod-c, on node2
        assert from_pod["ok"] == 20 and from_pod["served"] == {"pod-b": 20}, from_pod["errors"]
        assert from_pod["seen_as"] == {addr(c.n1, family): 20}  # pod-b is on node2: masqueraded through node1
    dropped = c.lab.client(c.ext, "tcp", c.n1.ipv4, 30081, count=1, timeout=0.5)
    assert dropped["errors"] == {"timeout": 1}  # not a pod: the Local policy stands


def test_kpr_conntrack_lists_the_flows(cluster: Cluster) -> None:
    c = cluster
    c.lab.client(c.ext, "tcp", c.n1.ipv4, 30080, count=3)
    text = c.agents[0].kpr("conntrack", "--bpffs-dir", str(c.n1.bpffs_dir), "--address", c.ext.ipv4).stdout
    lines = text.splitlines()
    assert lines[0].split() == ["PROTO", "DIR", "SOURCE", "DESTINATION", "FRONTEND", "BACKEND", "NAT", "IDLE"]
    assert any(f"{c.n1.ipv4}:30080" in line and "original" in line and f"{c.n1.ipv4}:6" in line for line in lines)
    rows = json.loads(c.agents[0].kpr("conntrack", "--bpffs-dir", str(c.n1.bpffs_dir), "-o", "json").stdout)
    assert {r["direction"] for r in rows} == {"original", "reply"}
