"""Socket-level load balancing through the real agent: manifests in, BPF programs in the kernel, real sockets in
lab namespaces out. Each test uses its own Service (its own ClusterIP) on one shared lab node and agent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_counters, read_services
from kpr.lab import Lab, Pod
from kpr.lab.cluster import (
    LabAgent,
    endpoint,
    endpoint_slice,
    pod_endpoints,
    remove_manifest,
    service,
    wait_until,
    write_manifest,
)

pytestmark = pytest.mark.datapath

TCP_PORT, UDP_PORT = 80, 53
PORTS = [("http", TCP_PORT, "http", "TCP"), ("dns", UDP_PORT, 8080, "UDP")]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]


@dataclass
class Cluster:
    lab: Lab
    agent: LabAgent
    manifests: Path
    pods: list[Pod]
    client: Pod

    def apply(self, filename: str, objects: list[dict[str, Any]], *frontends: str) -> None:
        """Write manifests, then wait until every given frontend is programmed with its backends."""
        write_manifest(self.manifests, filename, objects)
        self.wait_programmed(*frontends)

    def programmed(self) -> dict[str, list[str]]:
        return {
            r.frontend: [b.address for s in r.scopes[:1] for b in s.backends]
            for r in read_services(self.agent.node.bpffs_dir)
        }

    def wait_programmed(self, *frontends: str, backends: int | None = None) -> None:
        def ready() -> bool:
            have = self.programmed()
            return all(f in have and (backends is None or len(have[f]) == backends) for f in frontends)

        wait_until(ready, 15, f"{frontends} to be programmed")

    def counters(self) -> dict[str, int]:
        return read_counters(self.agent.node.bpffs_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        pods = [lab.add_pod(node, name) for name in ("pod-a", "pod-b", "pod-c")]
        client = lab.add_pod(node, "client", echo=False)
        manifests = tmp_path_factory.mktemp("manifests")
        agent = LabAgent(lab, node, manifests).start()
        agent.wait_started()
        yield Cluster(lab, agent, manifests, pods, client)
        lab.assert_host_isolated()
    finally:
        lab.close()


def three_backend_service(name: str, v4: str, v6: str, pods: list[Pod], **spec: Any) -> list[dict[str, Any]]:
    return [
        service(name, [v4, v6], PORTS, **spec),
        endpoint_slice(name, pod_endpoints(pods, 4), SLICE_PORTS, family=4),
        endpoint_slice(name, pod_endpoints(pods, 6), SLICE_PORTS, family=6),
    ]


def fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
def test_every_backend_serves_and_the_client_sees_the_cluster_ip(cluster: Cluster, proto: str, family: int) -> None:
    v4, v6 = "10.96.1.10", "fd00:96::1:10"
    cluster.apply(
        "spread.yaml", three_backend_service("spread", v4, v6, cluster.pods), fmt(v4, 80) + "/TCP", fmt(v6, 80) + "/TCP"
    )
    vip = v4 if family == 4 else v6
    port = TCP_PORT if proto == "tcp" else UDP_PORT
    result = cluster.lab.client(cluster.client, proto, vip, port, count=300)
    assert result["errors"] == {} and result["ok"] == 300
    assert set(result["served"]) == {"pod-a", "pod-b", "pod-c"}
    assert min(result["served"].values()) >= 40, result["served"]  # random choice: ~100 each
    # getpeername (TCP) and the source of every UDP reply are the ClusterIP, never the pod
    assert result["peers"] == {fmt(vip, port): 300}
    client_ip = cluster.client.ipv4 if family == 4 else cluster.client.ipv6
    assert result["seen_as"] == {client_ip: 300}  # no SNAT: the backend sees the client pod


def test_connected_udp_and_v4_mapped_dual_stack_sockets(cluster: Cluster) -> None:
    v4, v6 = "10.96.1.11", "fd00:96::1:11"
    cluster.apply("dual.yaml", three_backend_service("dual", v4, v6, cluster.pods), fmt(v4, 80) + "/TCP")
    connected = cluster.lab.client(cluster.client, "udp", v4, UDP_PORT, count=60, connected=True)
    assert connected["ok"] == 60 and connected["peers"] == {fmt(v4, UDP_PORT): 60}
    assert len(connected["served"]) == 3
    mapped = cluster.lab.client(cluster.client, "tcp", f"::ffff:{v4}", TCP_PORT, count=60)
    assert mapped["ok"] == 60 and len(mapped["served"]) == 3
    assert list(mapped["peers"]) == [f"[::ffff:{v4}]:{TCP_PORT}"]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_endpoints_is_refused_within_100ms(cluster: Cluster, proto: str) -> None:
    v4 = "10.96.1.12"
    cluster.apply("empty.yaml", [service("empty", [v4], PORTS)], fmt(v4, 80) + "/TCP")
    before = cluster.counters()["reject_no_backend"]
    result = cluster.lab.client(cluster.client, proto, v4, TCP_PORT if proto == "tcp" else UDP_PORT, count=20)
    assert result["errors"] == {"ECONNREFUSED": 20}
    assert result["error_latency_ms"]["max"] < 100
    assert cluster.counters()["reject_no_backend"] - before == 20


def test_destinations_that_are_not_frontends_are_untouched(cluster: Cluster) -> None:
    v4 = "10.96.1.13"
    cluster.apply(
        "untouched.yaml",
        [
            service("udp-only", [v4], [("dns", 53, 8080, "UDP")]),
            endpoint_slice("udp-only", pod_endpoints(cluster.pods[:1]), [("dns", 8080, "UDP")]),
        ],
        fmt(v4, 53) + "/UDP",
    )
    before = cluster.counters()
    direct = cluster.lab.client(cluster.client, "tcp", cluster.pods[1].ipv4, 8080, count=50)
    assert direct["served"] == {"pod-b": 50}  # a pod IP is not a frontend: no translation
    wrong_proto = cluster.lab.client(cluster.client, "tcp", v4, 53, count=3, timeout=0.5)  # TCP to a UDP frontend
    wrong_port = cluster.lab.client(cluster.client, "tcp", v4, 54, count=3, timeout=0.5)
    for result in (wrong_proto, wrong_port):
        assert result["ok"] == 0 and "ECONNREFUSED" not in result["errors"]  # not ours: the VIP is unrouted
    after = cluster.counters()
    assert after["xlate_fwd"] == before["xlate_fwd"]
    assert after["reject_no_backend"] == before["reject_no_backend"]


def test_client_ip_affinity_keeps_one_backend_until_the_timeout(cluster: Cluster) -> None:
    v4, v6 = "10.96.1.14", "fd00:96::1:14"
    cluster.apply(
        "sticky.yaml",
        three_backend_service(
            "sticky",
            v4,
            v6,
            cluster.pods,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}},
        ),
        fmt(v4, 80) + "/TCP",
    )
    before = cluster.counters()
    result = cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=40, sequence=True)
    assert result["ok"] == 40 and len(set(result["sequence"])) == 1, result["sequence"]
    mid = cluster.counters()
    assert (mid["affinity_new"] - before["affinity_new"], mid["affinity_hit"] - before["affinity_hit"]) == (1, 39)
    # Idle past the timeout: the next connection is a fresh pick (which may land anywhere).
    time.sleep(1.3)
    picks = []
    for _ in range(8):
        picks.append(cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=1, sequence=True)["sequence"][0])
        time.sleep(1.1)
    after = cluster.counters()
    assert after["affinity_new"] - mid["affinity_new"] == 8
    assert len(set(picks)) > 1, picks  # 8 fresh random picks among 3 all equal: p = 3 * (1/3)^8 < 0.05%


def test_removing_an_endpoint_stops_new_connections_to_it_and_adding_one_starts_them(cluster: Cluster) -> None:
    v4, v6 = "10.96.1.15", "fd00:96::1:15"
    a, b, c = cluster.pods
    cluster.apply("scale.yaml", three_backend_service("scale", v4, v6, [a, b, c]), fmt(v4, 80) + "/TCP")
    write_manifest(cluster.manifests, "scale.yaml", three_backend_service("scale", v4, v6, [a, b]))
    cluster.wait_programmed(fmt(v4, 80) + "/TCP", backends=2)
    result = cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=150)
    assert set(result["served"]) == {"pod-a", "pod-b"} and result["ok"] == 150
    write_manifest(cluster.manifests, "scale.yaml", three_backend_service("scale", v4, v6, [a, b, c]))
    cluster.wait_programmed(fmt(v4, 80) + "/TCP", backends=3)
    result = cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=150)
    assert set(result["served"]) == {"pod-a", "pod-b", "pod-c"}
    remove_manifest(cluster.manifests, "scale.yaml")
    wait_until(lambda: fmt(v4, 80) + "/TCP" not in cluster.programmed(), 15, "the service to go")


def test_internal_traffic_policy_local(cluster: Cluster) -> None:
    v4 = "10.96.1.16"
    a = cluster.pods[0]
    remote = endpoint("10.244.9.11", "node9")  # an endpoint on another node (not reachable: must not be used)
    objects = [
        service("itp", [v4], PORTS, internalTrafficPolicy="Local"),
        endpoint_slice("itp", [*pod_endpoints([a]), remote], SLICE_PORTS),
    ]
    cluster.apply("itp.yaml", objects, fmt(v4, 80) + "/TCP")
    result = cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=50)
    assert result["served"] == {"pod-a": 50}
    # Only remote endpoints: kube-proxy drops; kpr fails the connect at once (EHOSTUNREACH) and counts a drop.
    objects[1] = endpoint_slice("itp", [remote], SLICE_PORTS)
    write_manifest(cluster.manifests, "itp.yaml", objects)
    cluster.wait_programmed(fmt(v4, 80) + "/TCP", backends=0)
    before = cluster.counters()["drop_no_local_backend"]
    result = cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=5)
    assert result["errors"] == {"EHOSTUNREACH": 5}
    assert cluster.counters()["drop_no_local_backend"] - before == 5


def test_serving_terminating_endpoints_are_used_only_when_none_is_ready(cluster: Cluster) -> None:
    v4 = "10.96.1.17"
    a, b, _ = cluster.pods
    terminating = endpoint(b.ipv4, b.node, ready=False, serving=True, terminating=True)
    objects = [service("term", [v4], PORTS), endpoint_slice("term", [*pod_endpoints([a]), terminating], SLICE_PORTS)]
    cluster.apply("term.yaml", objects, fmt(v4, 80) + "/TCP")
    assert cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=30)["served"] == {"pod-a": 30}
    objects[1] = endpoint_slice(
        "term", [endpoint(a.ipv4, a.node, ready=False, serving=False), terminating], SLICE_PORTS
    )
    write_manifest(cluster.manifests, "term.yaml", objects)
    wait_until(lambda: cluster.programmed().get(fmt(v4, 80) + "/TCP") == [f"{b.ipv4}:8080/TCP"], 15, "fallback")
    assert cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=30)["served"] == {"pod-b": 30}


def test_an_invalid_edit_keeps_the_last_good_service(cluster: Cluster) -> None:
    v4, v6 = "10.96.1.18", "fd00:96::1:18"
    good = three_backend_service("edit", v4, v6, cluster.pods)
    cluster.apply("edit.yaml", good, fmt(v4, 80) + "/TCP")
    bad = [
        dict(good[0], spec=dict(good[0]["spec"], ports=[{"name": "http", "port": 70000, "protocol": "TCP"}])),
        *good[1:],
    ]
    write_manifest(cluster.manifests, "edit.yaml", bad)
    wait_until(lambda: "70000" in cluster.agent.log(), 10, "the agent to report the bad port")
    time.sleep(0.5)
    assert len(cluster.programmed()[fmt(v4, 80) + "/TCP"]) == 3
    assert cluster.lab.client(cluster.client, "tcp", v4, TCP_PORT, count=30)["ok"] == 30


def test_kpr_services_shows_what_the_maps_hold(cluster: Cluster) -> None:
    v4, v6 = "10.96.1.19", "fd00:96::1:19"
    cluster.apply("show.yaml", three_backend_service("show", v4, v6, cluster.pods), fmt(v6, 80) + "/TCP")
    text = cluster.agent.kpr(
        "services", "--bpffs-dir", str(cluster.agent.node.bpffs_dir), "--service", "default/show"
    ).stdout
    assert "default/show:http" in text and fmt(v6, 80) + "/TCP" in text
    for pod in cluster.pods:
        assert f"{pod.ipv4}:8080/TCP (active, local)" in text
    import json

    rows = json.loads(
        cluster.agent.kpr(
            "services", "--bpffs-dir", str(cluster.agent.node.bpffs_dir), "-o", "json", "--service", "default/show"
        ).stdout
    )
    assert {r["frontend"] for r in rows} == {
        fmt(a, p) + f"/{proto}" for a in (v4, v6) for p, proto in ((80, "TCP"), (53, "UDP"))
    }
