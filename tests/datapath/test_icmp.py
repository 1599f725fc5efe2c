"""ICMP errors of translated flows, end to end: path MTU discovery through a NodePort and unreachables from backends.

node1 runs the agent (tc on eth0) and pod-a; node2 runs pod-b and no agent. node1 reaches node2's pods through a
router namespace `rtr` whose link to node2 has an MTU of 1400 (everything else: 1500), so a full-sized packet
node1 masquerades on toward pod-b draws a Fragmentation Needed (IPv4) or Packet Too Big (IPv6) from the router.
The router sends it to node1's address (the masquerade source); kpr translates it for the external client, whose
TCP then lowers its segment size. Without the translation the client never learns and a large upload stalls.

Mirrors kube-proxy's reliance on netfilter's RELATED NAT of ICMP errors (nf_nat_icmp_reply_translation), which
kube-proxy's own tests take for granted; pkg/proxy/conntrack's cleanup leaves RELATED entries alone for this reason.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kpr.datapath.inspect import read_counters, read_services
from kpr.lab import External, Lab, Node, Pod
from kpr.lab.cluster import LabAgent, endpoint_slice, pod_endpoints, service, wait_until, write_manifest

pytestmark = [pytest.mark.datapath, pytest.mark.slow]

SMALL_MTU = 1400
UPLOAD = 2 * 1024 * 1024  # bytes in one line to the echo stream; it sends the line back
BIG, CLOSED_LOCAL, CLOSED_REMOTE = 30400, 30410, 30411  # NodePorts

# An upload of one long line to the echo stream, then the echoed line read back: fails on a stalled path.
UPLOAD_SCRIPT = """
import json, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started = time.monotonic()
try:
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"x" * size + b"\\n")
    got = b""
    while not got.endswith(b"\\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    print(json.dumps({"ok": len(got) > size, "echoed": len(got), "mss": mss, "seconds": time.monotonic() - started}))
except OSError as e:
    print(json.dumps({"ok": False, "error": repr(e), "seconds": time.monotonic() - started}))
"""


@dataclass
class Path:
    lab: Lab
    node1: Node
    local: Pod
    remote: Pod
    ext: External
    agent: LabAgent

    def upload(self, host: str, port: int) -> dict[str, object]:
        out = self.lab.run(self.ext, [sys.executable, "-c", UPLOAD_SCRIPT, host, str(port), str(UPLOAD)], timeout=60)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def related(self) -> int:
        return read_counters(self.node1.bpffs_dir)["tc_icmp_related"]


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    lab = Lab()
    try:
        node1, node2 = lab.add_node("node1"), lab.add_node("node2")
        local = lab.add_pod(node1, "pod-a", stream_ports=(9000,))
        remote = lab.add_pod(node2, "pod-b", stream_ports=(9000,))
        ext = lab.add_external("ext")
        rtr = lab.add_external("rtr")  # on the underlay like a client; forwards toward node2 over the small link
        lab.run(node2, ["ip", "link", "add", "tor0", "mtu", str(SMALL_MTU), "type", "veth", "peer", "name", "n2"])
        lab.run(node2, ["ip", "link", "set", "n2", "netns", f"/run/netns/{rtr.netns}"])
        for where, dev, v4, v6 in (
            (node2, "tor0", "172.16.62.2/30", "fd00:62::2/64"),
            (rtr, "n2", "172.16.62.1/30", "fd00:62::1/64"),
        ):
            lab.run(where, ["ip", "link", "set", dev, "mtu", str(SMALL_MTU), "up"])
            lab.run(where, ["ip", "addr", "add", v4, "dev", dev])
            lab.run(where, ["ip", "addr", "add", v6, "dev", dev, "nodad"])
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            lab.run(rtr, ["sysctl", "-qw", f"{key}=1"])
        # node1 -> node2's pods via rtr; rtr -> node2 over the small link; node2 -> node1 back the same way
        lab.run(node1, ["ip", "route", "replace", node2.pod_cidr4, "via", rtr.ipv4])
        lab.run(node1, ["ip", "-6", "route", "replace", node2.pod_cidr6, "via", rtr.ipv6])
        lab.run(rtr, ["ip", "route", "add", node2.pod_cidr4, "via", "172.16.62.2"])
        lab.run(rtr, ["ip", "-6", "route", "add", node2.pod_cidr6, "via", "fd00:62::2"])
        lab.run(node2, ["ip", "route", "replace", f"{node1.ipv4}/32", "via", "172.16.62.1"])
        lab.run(node2, ["ip", "-6", "route", "replace", f"{node1.ipv6}/128", "via", "fd00:62::1"])
        manifests = tmp_path_factory.mktemp("icmp-manifests")
        stream = [("stream", 9000, "TCP")]
        closed = [("dns", 9999, "UDP")]  # nothing listens there: the backend answers port unreachable
        write_manifest(
            manifests,
            "icmp.yaml",
            [
                service("big", ["10.96.40.1", "fd00:96::40:1"], [("stream", 9000, 9000, "TCP", BIG)], type="NodePort"),
                endpoint_slice("big", pod_endpoints([remote], 4), stream),
                endpoint_slice("big", pod_endpoints([remote], 6), stream, family=6),
                service(
                    "closed-local",
                    ["10.96.40.2", "fd00:96::40:2"],
                    [("dns", 53, 9999, "UDP", CLOSED_LOCAL)],
                    type="NodePort",
                ),
                endpoint_slice("closed-local", pod_endpoints([local], 4), closed),
                endpoint_slice("closed-local", pod_endpoints([local], 6), closed, family=6),
                service(
                    "closed-remote",
                    ["10.96.40.3", "fd00:96::40:3"],
                    [("dns", 53, 9999, "UDP", CLOSED_REMOTE)],
                    type="NodePort",
                ),
                endpoint_slice("closed-remote", pod_endpoints([remote], 4), closed),
                endpoint_slice("closed-remote", pod_endpoints([remote], 6), closed, family=6),
            ],
        )
        agent = LabAgent(lab, node1, manifests, extra_args=["--devices", "eth0"]).start()
        agent.wait_started()
        wait_until(
            lambda: any(r.frontend == f"[::]:{CLOSED_REMOTE}/UDP" for r in read_services(node1.bpffs_dir)),
            10,
            "node1 programmed",
        )
        yield Path(lab, node1, local, remote, ext, agent)
        agent.stop()
        lab.assert_host_isolated()
    finally:
        lab.close()


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_through_a_nodeport_to_a_backend_on_another_node(path: Path, family: int) -> None:
    host = path.node1.ipv4 if family == 4 else path.node1.ipv6
    before = path.related()
    result = path.upload(host, BIG)
    assert result["ok"], result
    assert path.related() > before  # the router's errors were translated for the client
    # the client's TCP learnt the path: its segments now fit the small link (IPv4: 20 + 20 bytes of headers)
    headers = 40 if family == 4 else 60
    assert int(result["mss"]) <= SMALL_MTU - headers, result  # type: ignore[call-overload]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("port", [CLOSED_LOCAL, CLOSED_REMOTE], ids=["local-backend", "remote-backend"])
def test_a_backends_port_unreachable_reaches_the_client_from_the_nodeport(path: Path, port: int, family: int) -> None:
    """A connected UDP socket hears ECONNREFUSED, which it only does when the error quotes what it sent (its own
    address and port to the NodePort) and the error's checksums are right; untranslated, it would time out."""
    host = path.node1.ipv4 if family == 4 else path.node1.ipv6
    before = path.related()
    result = path.lab.client(path.ext, "udp", host, port, count=3, timeout=1, connected=True)
    assert result["errors"] == {"ECONNREFUSED": 3}, result
    assert path.related() >= before + 3
