"""A full conntrack table refuses new flows and keeps established ones, and says so (reliability finding 3).

`--map-size ct=64` holds 32 flows (each takes an original and a reply entry). With an LRU table, 10 established
NodePort connections held open were all reset by 100 short connections that followed: the LRU evicted them, with no
counter and no log line. ct4/ct6 are plain hashes now, as netfilter never early-drops an established connection:
the new flows that do not fit are dropped (their SYNs retried by the clients), counted, logged once and shown by
`kpr status`, and the held connections carry on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.datapath.inspect import read_counters
from kpr.lab import Lab
from kpr.lab.cluster import (
    LabAgent,
    endpoint_slice,
    finish_holder,
    pod_endpoints,
    service,
    start_holder,
    wait_until,
    write_manifest,
)

pytestmark = [pytest.mark.datapath, pytest.mark.slow]

NODE_PORT = 30500


@pytest.fixture
def lab_agent(tmp_path: Path) -> Iterator[tuple[Lab, LabAgent]]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        backend = lab.add_pod(node, "pod-a", stream_ports=(9000,))
        lab.add_external("ext")
        ports = [("stream", 9000, "TCP"), ("http", 8080, "TCP")]
        write_manifest(
            tmp_path,
            "np.yaml",
            [
                service(
                    "np",
                    ["10.96.50.1"],
                    [("stream", 9000, 9000, "TCP", NODE_PORT), ("http", 80, 8080, "TCP", NODE_PORT + 1)],
                    type="NodePort",
                ),
                endpoint_slice("np", pod_endpoints([backend]), ports),
            ],
        )
        agent = LabAgent(lab, node, tmp_path, extra_args=["--devices", "eth0", "--map-size", "ct=64"]).start()
        agent.wait_started()
        yield lab, agent
        lab.assert_host_isolated()
    finally:
        lab.close()


def test_a_full_conntrack_table_drops_new_flows_and_keeps_established_ones(lab_agent: tuple[Lab, LabAgent]) -> None:
    lab, agent = lab_agent
    node, ext = agent.node, lab.externals["ext"]
    holder = start_holder(lab, ext, tcp=(node.ipv4, NODE_PORT), connections=10, interval=0.5)
    try:
        wait_until(lambda: read_counters(node.bpffs_dir)["tc_ct_new"] >= 10, 10, "10 held connections tracked")
        burst = lab.client(ext, "tcp", node.ipv4, NODE_PORT + 1, count=100, timeout=0.3)
    finally:
        held = finish_holder(holder)
    connections = [c for c in held["tcp"] if c["pod"] is not None]
    assert len(connections) == 10 and all(c["end"] is None for c in connections), held["tcp"]  # none reset
    assert burst["ok"] < 100 and burst["ok"] + burst["errors"].get("timeout", 0) == 100  # dropped, never reset
    assert read_counters(node.bpffs_dir)["tc_drop_ct_full"] > 0
    wait_until(lambda: '"conntrack exhausted"' in agent.log(this_run=True), 5, "the agent to say so")
    assert agent.log(this_run=True).count('"conntrack exhausted"') == 1
    status = agent.kpr("status", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir)).stdout
    assert "conntrack exhausted since" in status and "--map-size ct=N" in status
