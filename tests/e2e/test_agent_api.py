"""The real agent process against an API server speaking the real list/watch protocol, in a lab node.

The fake API server runs in this process but its listening socket lives in the lab node's network namespace, so the
agent reaches it on the node's own loopback and nothing touches the host network.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_services
from kpr.lab import Lab, Pod
from kpr.lab.cluster import (
    LabAgent,
    endpoint_slice,
    finish_client_loop,
    listen_in,
    pod_endpoints,
    service,
    start_client_loop,
    wait_until,
)
from tests.e2e.fake_apiserver import FakeApiServer

pytestmark = [pytest.mark.e2e, pytest.mark.datapath]

PORTS = [("http", 80, 8080, "TCP")]
SLICE_PORTS = [("http", 8080, "TCP")]


@dataclass
class ApiCluster:
    lab: Lab
    api: FakeApiServer
    agent: LabAgent
    pods: list[Pod]
    client: Pod

    def programmed(self) -> dict[str, list[str]]:
        return {r.frontend: [b.address for b in r.scopes[0].backends] for r in read_services(self.agent.node.bpffs_dir)}

    def wait_backends(self, frontend: str, pods: list[Pod] | None, timeout: float = 20) -> None:
        """Until `frontend` has exactly these pods as backends (None: until it is gone)."""
        want = None if pods is None else sorted(f"{p.ipv4}:8080/TCP" for p in pods)
        wait_until(
            lambda: (
                (sorted(self.programmed()[frontend]) == want) if want is not None else frontend not in self.programmed()
            ),
            timeout,
            f"{frontend} -> {want}",
        )

    def served(self, vip: str, count: int = 60, port: int = 80) -> dict[str, Any]:
        return self.lab.client(self.client, "tcp", vip, port, count=count, timeout=1)


def node_object(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {}},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.16.0.1"}]},
    }


def lab_with_api(tmp_path: Path, extra_args: Sequence[str] = ()) -> Iterator[ApiCluster]:
    """A lab node with three pods and a client, the fake API server in the node, and an agent watching it."""
    lab = Lab()
    api: FakeApiServer | None = None
    try:
        node = lab.add_node("node1")
        pods = [lab.add_pod(node, n) for n in ("pod-a", "pod-b", "pod-c")]
        client = lab.add_pod(node, "client", echo=False)
        api = FakeApiServer(listen_in(node.netns), bookmark_interval=0.5).start()
        api.apply(node_object("node1"))
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        agent = LabAgent(lab, node, kubeconfig=kubeconfig, extra_args=["--watch-idle-timeout", "3", *extra_args])
        agent.start().wait_started()
        yield ApiCluster(lab, api, agent, pods, client)
        lab.assert_host_isolated()
    finally:
        if api is not None:
            api.stop()
        lab.close()


@pytest.fixture
def api_cluster(tmp_path: Path) -> Iterator[ApiCluster]:
    yield from lab_with_api(tmp_path)


def web(api: FakeApiServer, name: str, vip: str, pods: list[Pod], port: int = 80) -> None:
    api.apply(service(name, [vip], [("http", port, 8080, "TCP")]))
    api.apply(endpoint_slice(name, pod_endpoints(pods), SLICE_PORTS))


def test_a_service_scaled_changed_and_deleted_while_another_serves_a_steady_loop(api_cluster: ApiCluster) -> None:
    c = api_cluster
    a, b, d = c.pods
    web(c.api, "steady", "10.96.4.1", c.pods)
    c.wait_backends("10.96.4.1:80/TCP", c.pods)
    loop = start_client_loop(c.lab, c.client, "10.96.4.1", 80, seconds=12)

    vip, fe = "10.96.4.10", "10.96.4.10:80/TCP"
    web(c.api, "web", vip, [a])  # created with 1 endpoint
    c.wait_backends(fe, [a])
    assert c.served(vip)["served"] == {"pod-a": 60}
    c.api.apply(endpoint_slice("web", pod_endpoints([a, b, d]), SLICE_PORTS))  # 1 -> 3
    c.wait_backends(fe, [a, b, d])
    assert set(c.served(vip)["served"]) == {"pod-a", "pod-b", "pod-c"}
    c.api.apply(endpoint_slice("web", [], SLICE_PORTS))  # 3 -> 0
    c.wait_backends(fe, [])
    assert c.served(vip, count=5)["errors"] == {"ECONNREFUSED": 5}
    c.api.apply(endpoint_slice("web", pod_endpoints([b]), SLICE_PORTS))  # 0 -> 1
    c.wait_backends(fe, [b])
    assert c.served(vip)["served"] == {"pod-b": 60}
    c.api.apply(service("web", [vip], [("http", 81, 8080, "TCP")]))  # the port changes
    c.wait_backends(fe, None)
    c.wait_backends("10.96.4.10:81/TCP", [b])
    assert c.served(vip, port=81)["served"] == {"pod-b": 60}
    c.api.delete("Service", "web")
    c.api.delete("EndpointSlice", "web-v4")
    wait_until(lambda: set(c.programmed()) == {"10.96.4.1:80/TCP"}, 20, "web to be gone")

    steady = finish_client_loop(loop)
    assert steady["errors"] == {} and steady["ok"] == steady["attempts"] > 300
    c.api.delete("Service", "steady")
    c.api.delete("EndpointSlice", "steady-v4")
    wait_until(lambda: c.programmed() == {}, 20, "every service gone")
    assert read_services(c.agent.node.bpffs_dir) == []  # the maps end empty


def test_cut_watches_410_and_a_restarted_api_server_lose_nothing(api_cluster: ApiCluster) -> None:
    c = api_cluster
    a, b, d = c.pods
    web(c.api, "web", "10.96.4.20", c.pods)
    web(c.api, "gone", "10.96.4.21", [a])
    c.wait_backends("10.96.4.20:80/TCP", c.pods)
    c.wait_backends("10.96.4.21:80/TCP", [a])
    loop = start_client_loop(c.lab, c.client, "10.96.4.20", 80, seconds=15)

    # A watch cut mid-stream: the agent resumes from its resourceVersion and sees the change made meanwhile.
    c.api.drop_watches()
    c.api.apply(endpoint_slice("web", pod_endpoints([a, b]), SLICE_PORTS))
    c.wait_backends("10.96.4.20:80/TCP", [a, b])

    # 410 Gone: history compacted while the watch was down; the relist also removes what was deleted meanwhile.
    c.api.delete("Service", "gone")
    c.api.compact()
    c.api.drop_watches()
    c.wait_backends("10.96.4.21:80/TCP", None)
    assert "resourceVersion expired; relisting" in c.agent.log()

    # The same as HTTP 410, then an API server restored with a new history (etcd restore): relist again.
    c.api.expired_as_http = True
    c.api.apply(endpoint_slice("web", pod_endpoints([a, b, d]), SLICE_PORTS))
    c.api.restart(new_history=True)
    c.wait_backends("10.96.4.20:80/TCP", [a, b, d])
    c.api.apply(endpoint_slice("web", pod_endpoints([d]), SLICE_PORTS))
    c.wait_backends("10.96.4.20:80/TCP", [d])

    result = finish_client_loop(loop)
    assert result["errors"] == {}, result["errors"]  # no backend was ever lost on the way
    assert result["ok"] == result["attempts"]


def test_a_silent_watch_is_restarted_and_bookmarks_move_the_resume_point(api_cluster: ApiCluster) -> None:
    c = api_cluster
    web(c.api, "web", "10.96.4.30", c.pods[:1])
    c.wait_backends("10.96.4.30:80/TCP", c.pods[:1])
    c.api.clear_requests()
    c.api.pause_bookmarks(True)  # silence: the agent's 3 s idle timeout must restart the watches
    time.sleep(5)
    c.api.pause_bookmarks(False)
    assert c.agent.log().count("watch interrupted; resuming") >= 3
    watches = [q for _, path, q in c.api.requests if q.get("watch") in ("true", "1")]
    assert watches and all(q.get("resourceVersion") not in (None, "", "0") for q in watches)  # resumed, not relisted
    c.api.apply(endpoint_slice("web", pod_endpoints(c.pods[:2]), SLICE_PORTS))
    c.wait_backends("10.96.4.30:80/TCP", c.pods[:2])


def test_an_agent_restarted_while_the_api_is_unreachable_keeps_traffic_on_the_pinned_maps(
    api_cluster: ApiCluster, tmp_path: Path
) -> None:
    c = api_cluster
    web(c.api, "web", "10.96.4.40", c.pods)
    c.wait_backends("10.96.4.40:80/TCP", c.pods)
    before = c.programmed()
    objects = [c.api.get("Service", "web"), c.api.get("EndpointSlice", "web-v4"), c.api.get("Node", "node1", "")]

    port = int(c.api.url.rsplit(":", 1)[1])
    c.api.stop()  # connections are refused from now on
    c.agent.stop(signal.SIGKILL)
    c.agent.start()
    wait_until(lambda: '"maps adopted"' in c.agent.log(this_run=True), 60, "the agent to adopt the maps")
    loop = start_client_loop(c.lab, c.client, "10.96.4.40", 80, seconds=4)
    result = finish_client_loop(loop)
    assert result["errors"] == {} and set(result["served"]) == {"pod-a", "pod-b", "pod-c"}
    assert c.programmed() == before
    assert '"first full sync done"' not in c.agent.log(this_run=True)  # nothing programmed without the lists

    # The API comes back (a new server on the same address): the agent lists, syncs, writes nothing new.
    c.api = FakeApiServer(listen_in(c.agent.node.netns, port=port), bookmark_interval=0.5).start()
    for obj in objects:
        assert obj is not None
        c.api.apply(obj)
    wait_until(lambda: '"first full sync done"' in c.agent.log(this_run=True), 60, "the first sync")
    assert c.programmed() == before
    assert '"service programmed"' not in c.agent.log(this_run=True)
