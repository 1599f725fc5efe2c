"""NodePorts on the node addresses kube-proxy serves them on: --nodeport-addresses with CIDRs and keywords, every
local address by default (kube-proxy's iptables mode), addresses followed as they come and go, and 127.0.0.1 for
the node's own sockets (kube-proxy's localhost NodePorts), never a pod's own loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_nodeport_addresses
from kpr.lab import External, Lab, Node, Pod
from kpr.lab.cluster import LabAgent, endpoint_slice, pod_endpoints, service, wait_until, write_manifest

pytestmark = [pytest.mark.datapath, pytest.mark.slow]

NODE_PORT = 30300
SECONDARY = "172.16.60.1"  # on a second device of node1: no default route goes through it


@dataclass
class Env:
    lab: Lab
    node: Node
    backend: Pod
    client: Pod
    ext: External
    manifests: Path

    def agent(self, *args: str) -> LabAgent:
        agent = LabAgent(self.lab, self.node, self.manifests, extra_args=["--devices", "eth0", *args]).start()
        agent.wait_started()
        return agent

    def served(self, where: Any, host: str, proto: str = "tcp", timeout: float = 1.0) -> bool:
        result = self.lab.client(where, proto, host, NODE_PORT, count=1, timeout=timeout)
        return bool(result["ok"] == 1 and result["served"] == {"pod-a": 1})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        backend = lab.add_pod(node, "pod-a")
        client = lab.add_pod(node, "client", echo=False)
        ext = lab.add_external("ext")
        # a second device no default route uses (no dummy module here: a veth pair inside the node)
        lab.run(node, ["ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1"])
        lab.run(node, ["ip", "link", "set", "dummy0", "up"])
        lab.run(ext, ["ip", "route", "add", "172.16.60.0/24", "via", node.ipv4])
        manifests = tmp_path_factory.mktemp("nodeport-manifests")
        node_object = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name},
            "status": {
                "addresses": [{"type": "InternalIP", "address": a} for a in (node.ipv4, node.ipv6)],
            },
        }
        ports = [("http", 80, 8080, "TCP", NODE_PORT), ("dns", 53, 8080, "UDP", NODE_PORT)]
        write_manifest(
            manifests,
            "np.yaml",
            [
                node_object,
                service("np", ["10.96.30.1", "fd00:96::30:1"], ports, type="NodePort"),
                endpoint_slice("np", pod_endpoints([backend], 4), [("http", 8080, "TCP"), ("dns", 8080, "UDP")]),
                endpoint_slice(
                    "np", pod_endpoints([backend], 6), [("http", 8080, "TCP"), ("dns", 8080, "UDP")], family=6
                ),
            ],
        )
        yield Env(lab, node, backend, client, ext, manifests)
        lab.assert_host_isolated()
    finally:
        lab.close()


def test_by_default_every_node_address_serves_nodeports_and_new_ones_within_a_second(env: Env) -> None:
    agent = env.agent()
    try:
        addresses = read_nodeport_addresses(env.node.bpffs_dir)
        assert {env.node.ipv4, env.node.ipv6, env.node.gateway4, "127.0.0.1"} <= set(addresses)
        assert addresses["127.0.0.1"] and not addresses[env.node.ipv4]  # loopback: the node's own sockets only
        assert "::1" not in addresses  # IPv6 loopback never serves NodePorts, as with kube-proxy
        for host in (env.node.ipv4, env.node.ipv6):
            for proto in ("tcp", "udp"):
                assert env.served(env.ext, host, proto), (host, proto)
        assert env.served(env.client, env.node.gateway4)  # the node's bridge address, from a pod
        assert env.served(env.node, "127.0.0.1")  # the node itself: kube-proxy's localhost NodePorts
        local = env.lab.client(env.client, "tcp", "127.0.0.1", NODE_PORT, count=1, timeout=1)
        assert local["errors"] == {"ECONNREFUSED": 1}  # a pod's 127.0.0.1 is its own: left alone

        # an address added to a device no default route uses serves NodePorts within a second, and stops likewise
        assert not env.served(env.ext, SECONDARY, timeout=0.5)
        added = time.monotonic()
        env.lab.run(env.node, ["ip", "addr", "add", f"{SECONDARY}/32", "dev", "dummy0"])
        wait_until(lambda: env.served(env.ext, SECONDARY, timeout=0.3), 1.0, "the new address to serve NodePorts")
        print(f"a new address served NodePorts {1000 * (time.monotonic() - added):.0f} ms after it was added")
        env.lab.run(env.node, ["ip", "addr", "del", f"{SECONDARY}/32", "dev", "dummy0"])
        wait_until(
            lambda: SECONDARY not in read_nodeport_addresses(env.node.bpffs_dir), 1.0, "the address to be forgotten"
        )
        assert not env.served(env.ext, SECONDARY, timeout=0.5)
        status = agent.kpr("status", "--bpffs-dir", str(env.node.bpffs_dir), "--cgroup-root", str(env.node.cgroup))
        assert f"NodePorts on: {env.node.gateway4}" in status.stdout or env.node.ipv4 in status.stdout
        explained = agent.kpr(
            "explain", "--bpffs-dir", str(env.node.bpffs_dir), env.client.ipv4, f"{env.node.ipv4}:{NODE_PORT}/TCP"
        ).stdout
        assert "NodePort frontend 0.0.0.0:30300/TCP serves it" in explained and ": load-balanced" in explained
    finally:
        agent.stop()
        env.lab.run(env.node, ["ip", "addr", "flush", "dev", "dummy0"])


def test_nodeport_addresses_primary_serves_the_node_ip_only(env: Env) -> None:
    env.lab.run(env.node, ["ip", "addr", "add", f"{SECONDARY}/32", "dev", "dummy0"])
    agent = env.agent("--nodeport-addresses", "primary")
    try:
        assert set(read_nodeport_addresses(env.node.bpffs_dir)) == {env.node.ipv4, env.node.ipv6}
        assert env.served(env.ext, env.node.ipv4) and env.served(env.ext, env.node.ipv6)
        assert not env.served(env.ext, SECONDARY, timeout=0.5)
        assert env.lab.client(env.node, "tcp", "127.0.0.1", NODE_PORT, count=1, timeout=1)["ok"] == 0
    finally:
        agent.stop()
        env.lab.run(env.node, ["ip", "addr", "flush", "dev", "dummy0"])


def test_nodeport_addresses_cidrs_select_per_family(env: Env) -> None:
    """A CIDR list selects the addresses of its family; a family it has no CIDR for keeps all of its addresses."""
    env.lab.run(env.node, ["ip", "addr", "add", f"{SECONDARY}/32", "dev", "dummy0"])
    agent = env.agent("--nodeport-addresses", "172.16.60.0/24")
    try:
        addresses = set(read_nodeport_addresses(env.node.bpffs_dir))
        assert SECONDARY in addresses and env.node.ipv4 not in addresses and env.node.ipv6 in addresses
        assert env.served(env.ext, SECONDARY) and env.served(env.ext, env.node.ipv6)
        assert not env.served(env.ext, env.node.ipv4, timeout=0.5)
    finally:
        agent.stop()
        env.lab.run(env.node, ["ip", "addr", "flush", "dev", "dummy0"])
