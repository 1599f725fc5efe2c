"""The real-Kubernetes tier: kpr against kube-apiserver, kube-controller-manager and kube-scheduler (v1.37.2, built
by scripts/k8s-build.sh into .cache/k8s/bin), with the lab kubelet running pods on two lab nodes in two zones.

Everything talks to the API as a cluster would: kpr's agents with the `kpr` ServiceAccount's token bound to exactly
deploy/clusterrole.yaml; the tests with kubectl (inside the control plane's namespace: the API server is never
reachable from the host network).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kpr.lab import Lab, Node, Pod
from kpr.lab.cluster import wait_until
from kpr.lab.kubernetes import KubernetesLab, deployment


class Cluster(KubernetesLab):
    """The tier's two-node cluster; n1 is in zone-a, n2 in zone-b."""

    @property
    def n1(self) -> Node:
        return self.nodes[0]

    @property
    def n2(self) -> Node:
        return self.nodes[1]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    lab = Lab()
    started: Cluster | None = None
    try:
        started = Cluster.start(lab)
        # a client pod on node1, for traffic from inside the cluster
        started.apply(deployment("client", 1, ports=(), node="node1"))
        started.wait_rollout("default", "client")
        yield started
        lab.assert_host_isolated()
    finally:
        if started is not None:
            started.close()
        lab.close()


@pytest.fixture
def client_pod(cluster: Cluster) -> Pod:
    (pod,) = cluster.pods("default", "app=client")
    return cluster.pod("default", pod["metadata"]["name"])


def wait_programmed(cluster: Cluster, node: Node, frontend: str, backends: int, timeout: float = 15) -> float:
    """Until `frontend` ("10.96.0.10:80/TCP") has `backends` backends in the node's maps; returns the seconds taken."""
    from kpr.datapath.inspect import read_services

    started = time.monotonic()

    def count() -> bool:
        row = next((r for r in read_services(node.bpffs_dir) if r.frontend == frontend), None)
        return row is not None and len(row.scopes[0].backends) == backends

    wait_until(count, timeout, f"{frontend} with {backends} backends on {node.name}")
    return time.monotonic() - started
