"""Connection lifecycle: rollouts and readiness flaps never cut live connections, as with kube-proxy.

kube-proxy never deletes TCP conntrack entries (an established connection keeps its pod while the pod runs, whatever
its endpoint's conditions) and deletes UDP ones only when their endpoint stops serving or leaves; new connections avoid
endpoints that are not ready while ready ones exist; healthCheckNodePort counts ready local endpoints only. Each test
here drives a Service through the conditions the EndpointSlice controller writes during a pod's life (starting, ready,
unready, terminating, stopping, gone) while real clients hold connections:

- `ext`, an external client on the underlay, reaches the NodePorts of node1 (tc path, conntrack, masquerade to node2);
- `client`, a pod on node1, reaches the ClusterIPs (socket path: TCP connects straight to the pod; a connected UDP
  socket that kpr pointed at a backend that stops serving is destroyed, so the application reconnects).

Two nodes, each with its own agent (--devices eth0). Every test has its own Service, pods and manifest file.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_backends, read_services
from kpr.lab import External, Lab, Node, Pod
from kpr.lab.cluster import (
    LabAgent,
    endpoint_slice,
    finish_client_loop,
    finish_holder,
    pods_in_states,
    service,
    start_client_loop,
    start_holder,
    wait_until,
    write_manifest,
)

pytestmark = [pytest.mark.datapath, pytest.mark.slow]

HTTP, STREAM, DNS = 80, 90, 53  # service ports: short TCP, held TCP, UDP
SLICE_PORTS = [("http", 8080, "TCP"), ("stream", 9000, "TCP"), ("dns", 8080, "UDP")]
MAP_STATE = {
    "starting": "not-serving",
    "ready": "active",
    "unready": "not-serving",
    "terminating": "terminating",
    "stopping": "not-serving",
}
SOCKET_ENDED = {"ECONNABORTED", "EDESTADDRREQ"}  # what a connected UDP socket reports once kpr destroyed it


@dataclass
class Env:
    lab: Lab
    n1: Node
    n2: Node
    client: Pod
    ext: External
    agents: dict[str, LabAgent]
    manifests: Path

    def pod(self, node: Node, name: str) -> Pod:
        return self.lab.add_pod(node, name, stream_ports=(9000,))


def node_object(n: Node) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name},
        "status": {"addresses": [{"type": "InternalIP", "address": n.ipv4}]},
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    lab = Lab()
    try:
        n1, n2 = lab.add_node("node1"), lab.add_node("node2")
        client = lab.add_pod(n1, "client", echo=False)
        ext = lab.add_external("ext")
        manifests = tmp_path_factory.mktemp("lifecycle-manifests")
        write_manifest(manifests, "nodes.yaml", [node_object(n1), node_object(n2)])
        agents = {n.name: LabAgent(lab, n, manifests, extra_args=["--devices", "eth0"]).start() for n in (n1, n2)}
        for agent in agents.values():
            agent.wait_started()
        yield Env(lab, n1, n2, client, ext, agents, manifests)
        lab.assert_host_isolated()
    finally:
        lab.close()


@dataclass
class Svc:
    """One test's Service: ClusterIP `vip`, NodePorts base+0 (http), +1 (stream), +2 (dns) unless `node_port` is 0,
    and its pods' states."""

    env: Env
    name: str
    vip: str
    node_port: int
    states: dict[Pod, str] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, pod, what happened)
    extra: dict[str, Any] = field(default_factory=dict)  # more Service spec fields

    def objects(self) -> list[dict[str, Any]]:
        ports: list[Any] = [("http", HTTP, 8080, "TCP"), ("stream", STREAM, 9000, "TCP"), ("dns", DNS, 8080, "UDP")]
        if self.node_port:
            ports = [(*p, self.node_port + i) for i, p in enumerate(ports)]
        return [
            service(self.name, [self.vip], ports, **({"type": "NodePort"} | self.extra)),
            endpoint_slice(self.name, pods_in_states(self.states), SLICE_PORTS),
        ]

    def set(self, **states: str) -> None:
        """Publish new conditions (pod name=state; "gone" leaves the slice) and wait until both nodes have them."""
        pods = {p.name: p for p in self.states}
        for name, state in states.items():
            pod = pods.get(name) or self.env.lab.pods[name]
            self.states[pod] = state
            self.events.append((time.time(), name, state))
        write_manifest(self.env.manifests, f"{self.name}.yaml", self.objects())
        for node in (self.env.n1, self.env.n2):
            wait_until(lambda node=node: self.applied(node), 15, f"{self.name} {states} on {node.name}")
        self.states = {p: s for p, s in self.states.items() if s != "gone"}

    def applied(self, node: Node) -> bool:
        # ready endpoints take new flows; when none is, the serving terminating ones do (KEP-1669)
        usable = {f"{p.ipv4}:9000/TCP" for p, s in self.states.items() if s == "ready"} or {
            f"{p.ipv4}:9000/TCP" for p, s in self.states.items() if s == "terminating"
        }
        row = next((r for r in read_services(node.bpffs_dir) if r.frontend == f"{self.vip}:{STREAM}/TCP"), None)
        if row is None or {b.address for b in row.scopes[0].backends} != usable:
            return False
        states = {b.address: b.state for b in read_backends(node.bpffs_dir)}
        for pod, state in self.states.items():
            have = states.get(f"{pod.ipv4}:9000/TCP")
            if have != MAP_STATE.get(state, "gone") and not (state == "gone" and have is None):
                return False
        return True

    def when(self, pod: Pod, what: str) -> float:
        return next(t for t, name, state in self.events if name == pod.name and state == what)

    def close(self) -> None:
        (self.env.manifests / f"{self.name}.yaml").unlink(missing_ok=True)
        for pod in list(self.states):
            self.env.lab.remove_pod(pod.name)


@pytest.fixture
def svc_factory(env: Env) -> Iterator[Any]:
    made: list[Svc] = []

    def make(name: str, vip: str, node_port: int, **extra: Any) -> Svc:
        svc = Svc(env, name, vip, node_port, extra=extra)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


def answers_after(udp: dict[str, Any], t: float) -> list[str]:
    return [pod for when, pod in udp.get("answers", []) if when > t]


def largest_gap(udp: dict[str, Any]) -> float:
    times = [when for when, _ in udp.get("answers", [])]
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def held(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The held TCP connections that got an answer (attempts that failed to connect are reported separately)."""
    return [c for c in result["tcp"] if c["pod"] is not None]


# ---- UDP: flows and connected sockets move when their endpoint stops serving or leaves -------------------------


@pytest.mark.parametrize("how", ["stopping", "unready", "gone"])
def test_udp_clients_move_to_a_live_endpoint_within_a_second_when_theirs_stops_serving(
    env: Env, svc_factory: Any, how: str
) -> None:
    """kube-proxy flushes the UDP conntrack entries of an endpoint that stops serving or leaves. kpr deletes the tc
    flows and destroys the connected sockets its socket hooks pointed there: the old pod keeps running (it would keep
    answering otherwise), yet within a second every answer comes from the live endpoint."""
    index = ["stopping", "unready", "gone"].index(how)
    svc = svc_factory(f"udp{index}", f"10.96.20.{index + 1}", 30200 + 10 * index)
    old, new = env.pod(env.n1, f"u{index}old"), env.pod(env.n2, f"u{index}new")
    svc.set(**{old.name: "ready"})
    on_pod = start_holder(env.lab, env.client, udp=(svc.vip, DNS))  # socket path: connected to `old`
    on_ext = start_holder(env.lab, env.ext, udp=(env.n1.ipv4, svc.node_port + 2))  # tc path via node1
    time.sleep(1.0)
    svc.set(**{new.name: "ready"})
    time.sleep(0.5)
    svc.set(**{old.name: how})
    stopped = svc.when(old, how)
    time.sleep(2.5)
    results = {"pod": finish_holder(on_pod), "ext": finish_holder(on_ext)}

    for where, udp in ((w, r["udp"]) for w, r in results.items()):
        assert set(answers_after(udp, stopped - 2.0)[:5]) == {old.name}, f"{where}: was not on the old pod first"
        late = answers_after(udp, stopped + 1.0)
        assert len(late) >= 20 and set(late) == {new.name}, f"{where}: answers 1 s after: {set(late)}"
        assert largest_gap(udp) < 1.0, f"{where}: no answer for {largest_gap(udp):.2f}s"
    # the socket kpr pointed at the old pod was destroyed once, and reconnected through the hook to the new one
    pod_failures = results["pod"]["udp"]["failures"]
    assert {reason for _, reason in pod_failures} <= SOCKET_ENDED and len(pod_failures) == 1, pod_failures
    assert stopped <= pod_failures[0][0] <= stopped + 1.0
    assert results["pod"]["udp"]["sockets"] == 2
    assert results["ext"]["udp"]["failures"] == []  # the tc flow moved by itself: the client saw nothing
    log = env.agents["node1"].log()
    assert "connected UDP sockets of ended backends destroyed" in log
    assert "UDP flows of backends that stopped serving ended" in log


# ---- TCP: held connections keep their pod; new ones avoid it ---------------------------------------------------


def test_held_tcp_connections_keep_their_pod_through_terminating_stopping_and_leaving_the_slice(
    env: Env, svc_factory: Any
) -> None:
    """Established connections (local and masqueraded remote backends on the tc path, direct ones on the socket path)
    keep working while their endpoint terminates, stops serving and even leaves the slice while the pod still runs
    (kube-proxy keeps TCP conntrack entries); new connections go to the ready endpoint only. Once the connections
    end, the backends kept for them are released."""
    svc = svc_factory("tcpkeep", "10.96.21.1", 30300)
    local, remote, fresh = env.pod(env.n1, "k-local"), env.pod(env.n2, "k-remote"), env.pod(env.n1, "k-fresh")
    svc.set(**{local.name: "ready", remote.name: "ready"})
    on_ext = start_holder(env.lab, env.ext, tcp=(env.n1.ipv4, svc.node_port + 1), connections=8)
    on_pod = start_holder(env.lab, env.client, tcp=(svc.vip, STREAM), connections=8)
    time.sleep(1.0)
    svc.set(**{fresh.name: "ready", local.name: "terminating", remote.name: "terminating"})
    for where, host, port in ((env.ext, env.n1.ipv4, svc.node_port), (env.client, svc.vip, HTTP)):
        new = env.lab.client(where, "tcp", host, port, count=20)
        assert new["served"] == {fresh.name: 20}, new  # new connections avoid terminating endpoints
    svc.set(**{local.name: "stopping", remote.name: "stopping"})
    time.sleep(1.0)
    svc.set(**{local.name: "gone", remote.name: "gone"})  # left the slice; the pods still run
    time.sleep(1.0)
    backends = {b.address: b for b in read_backends(env.n1.bpffs_dir)}
    for pod in (local, remote):
        kept = backends[f"{pod.ipv4}:9000/TCP"]
        assert kept.state == "gone" and kept.flows > 0 and not kept.frontends, kept
    explain = (
        env.agents["node1"]
        .kpr(
            "explain",
            "--bpffs-dir",
            str(env.n1.bpffs_dir),
            "--external",
            env.ext.ipv4,
            f"{env.n1.ipv4}:{svc.node_port + 1}",
        )
        .stdout
    )
    assert "(gone)" in explain and "stay on them until they end" in explain
    time.sleep(1.0)
    results = {"ext": finish_holder(on_ext), "pod": finish_holder(on_pod)}

    for where, result in results.items():
        assert [c for c in result["tcp"] if c["end"] is not None] == [], f"{where}: a held connection ended"
        conns = held(result)
        assert len(conns) == 8 and {c["pod"] for c in conns} <= {local.name, remote.name}
        assert all(c["ok"] > 50 for c in conns), [c["ok"] for c in conns]
    assert {c["pod"] for c in held(results["ext"])} == {local.name, remote.name}  # 8 connections over two pods
    # the connections are closed now: the backends kept for them go once their flows' closing time has passed
    wait_until(
        lambda: all(b.state != "gone" for b in read_backends(env.n1.bpffs_dir)),
        25,
        "gone backends released after their flows ended",
    )


def test_a_readiness_flap_resets_no_connection_and_sends_no_new_one_to_the_unready_pod(
    env: Env, svc_factory: Any
) -> None:
    svc = svc_factory("flap", "10.96.22.1", 30400)
    flapping, steady = env.pod(env.n1, "f-flap"), env.pod(env.n2, "f-steady")
    svc.set(**{flapping.name: "ready", steady.name: "starting"})
    on_ext = start_holder(env.lab, env.ext, tcp=(env.n1.ipv4, svc.node_port + 1), connections=4)
    time.sleep(0.5)  # all four on the only ready pod
    svc.set(**{steady.name: "ready"})
    svc.set(**{flapping.name: "unready"})
    for where, host, port in ((env.ext, env.n1.ipv4, svc.node_port), (env.client, svc.vip, HTTP)):
        new = env.lab.client(where, "tcp", host, port, count=30)
        assert new["served"] == {steady.name: 30}, new
    time.sleep(1.0)
    svc.set(**{flapping.name: "ready"})
    time.sleep(0.5)
    result = finish_holder(on_ext)
    assert [c for c in result["tcp"] if c["end"] is not None] == []
    assert [c["pod"] for c in held(result)] == [flapping.name] * 4


# ---- healthCheckNodePort --------------------------------------------------------------------------------------


def health(env: Env, node: Node, port: int) -> tuple[int, int, dict[str, str]]:
    script = (
        "import json,sys,urllib.request,urllib.error\n"
        "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=3); s,h,b=r.status,dict(r.headers),r.read()\n"
        "except urllib.error.HTTPError as e:\n s,h,b=e.code,dict(e.headers),e.read()\n"
        "print(json.dumps([s,json.loads(b)['localEndpoints'],h]))"
    )
    out = env.lab.run(env.ext, [sys.executable, "-c", script, f"http://{node.ipv4}:{port}/"]).stdout
    status, count, headers = json.loads(out)
    return status, count, headers


def test_health_check_node_port_counts_ready_local_endpoints_only(env: Env, svc_factory: Any) -> None:
    """kube-proxy's TestHealthCheckNodePortWhenTerminating: 200 with the count of ready local endpoints, else 503;
    terminating endpoints do not count (the load balancer drains the node). Served whether or not the node programs
    a frontend for the service (allocateLoadBalancerNodePorts: false and no ingress yet: no NodePort, no LB IP)."""
    lb = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
    svc = svc_factory("hc", "10.96.23.1", 30500, healthCheckNodePort=32500, **lb)
    bare = svc_factory("hcbare", "10.96.23.2", 0, healthCheckNodePort=32510, allocateLoadBalancerNodePorts=False, **lb)
    one, two = env.pod(env.n1, "h-one"), env.pod(env.n1, "h-two")
    svc.set(**{one.name: "ready", two.name: "ready"})
    assert health(env, env.n1, 32500)[:2] == (200, 2)
    assert health(env, env.n2, 32500)[:2] == (503, 0)
    svc.set(**{two.name: "terminating"})
    status, count, headers = health(env, env.n1, 32500)
    assert (status, count, headers.get("X-Load-Balancing-Endpoint-Weight")) == (200, 1, "1")
    svc.set(**{one.name: "terminating"})  # terminating only: the node is drained
    assert health(env, env.n1, 32500)[:2] == (503, 0)
    svc.set(**{one.name: "gone", two.name: "gone"})
    assert health(env, env.n1, 32500)[:2] == (503, 0)

    lone = env.pod(env.n1, "h-bare")
    bare.set(**{lone.name: "ready"})
    assert health(env, env.n1, 32510)[:2] == (200, 1)
    assert {r.kind for r in read_services(env.n1.bpffs_dir) if r.service == "default/hcbare"} == {"ClusterIP"}


# ---- the agent restarted in the middle of a rollout -------------------------------------------------------------


def test_draining_and_gone_flows_survive_agent_restarts_mid_rollout(env: Env, svc_factory: Any) -> None:
    """The agent is SIGKILLed and restarted while endpoints drain, and again after they left the slice: standby and
    gone backends are adopted from the pinned maps with their ids, so the flows on them keep going."""
    svc = svc_factory("restart", "10.96.24.1", 30600)
    local, remote, fresh = env.pod(env.n1, "r-local"), env.pod(env.n2, "r-remote"), env.pod(env.n1, "r-fresh")
    svc.set(**{local.name: "ready", remote.name: "ready"})
    on_ext = start_holder(env.lab, env.ext, tcp=(env.n1.ipv4, svc.node_port + 1), connections=8)
    time.sleep(0.5)
    svc.set(**{fresh.name: "ready", local.name: "terminating", remote.name: "terminating"})
    agent = env.agents["node1"]
    for step in ("draining", "gone"):
        if step == "gone":
            svc.set(**{local.name: "gone", remote.name: "gone"})
        agent.stop(signal.SIGKILL)
        agent.start()
        agent.wait_started()
        time.sleep(1.0)
        assert "first full sync done" in agent.log(this_run=True)
    result = finish_holder(on_ext)
    assert [c for c in result["tcp"] if c["end"] is not None] == [], "a held connection ended across a restart"
    assert {c["pod"] for c in held(result)} == {local.name, remote.name}


# ---- a whole rolling update under load -----------------------------------------------------------------------


def test_a_rolling_update_under_load_fails_no_request_and_resets_no_connection_of_a_serving_pod(
    env: Env, svc_factory: Any
) -> None:
    """Three endpoints (two on node1, one on node2) replaced one after another as a Deployment's rolling update does
    (maxSurge 1, maxUnavailable 0): new pod starting → ready, old pod terminating → stopping → gone → process ends.
    Meanwhile an external client and a pod each hold TCP connections, make short ones in a loop and ping over UDP."""
    svc = svc_factory("roll", "10.96.25.1", 30700)
    olds = [env.pod(env.n1, "v1-a"), env.pod(env.n1, "v1-b"), env.pod(env.n2, "v1-c")]
    svc.set(**{p.name: "ready" for p in olds})
    holders = {
        "ext": start_holder(
            env.lab, env.ext, tcp=(env.n1.ipv4, svc.node_port + 1), connections=9, udp=(env.n1.ipv4, svc.node_port + 2)
        ),
        "pod": start_holder(env.lab, env.client, tcp=(svc.vip, STREAM), connections=9, udp=(svc.vip, DNS)),
    }
    loops = {
        "ext": start_client_loop(env.lab, env.ext, env.n1.ipv4, svc.node_port, 24, interval=0.02),
        "pod": start_client_loop(env.lab, env.client, svc.vip, HTTP, 24, interval=0.02),
    }
    killed: dict[str, float] = {}
    time.sleep(1.0)
    for i, old in enumerate(olds):
        node = env.n2 if old.node == env.n2.name else env.n1
        new = env.pod(node, f"v2-{'abc'[i]}")
        svc.set(**{new.name: "starting"})
        time.sleep(0.3)
        svc.set(**{new.name: "ready"})
        svc.set(**{old.name: "terminating"})
        time.sleep(2.0)
        svc.set(**{old.name: "stopping"})
        time.sleep(1.5)
        svc.set(**{old.name: "gone"})
        time.sleep(1.0)
        killed[old.name] = time.time()
        env.lab.remove_pod(old.name)  # the process shuts down: its held connections get a FIN
    short = {where: finish_client_loop(loop) for where, loop in loops.items()}
    results = {where: finish_holder(proc) for where, proc in holders.items()}

    for where, loop in short.items():
        assert loop["errors"] == {} and loop["ok"] > 300, f"{where}: {loop['errors']}"
    old_names = {p.name for p in olds}
    survived = 0
    for where, result in results.items():
        for conn in result["tcp"]:
            assert conn["pod"] is not None, f"{where}: a connection attempt failed: {conn}"
            if conn["end"] is None:
                continue
            # only the end of its pod's process may end a held connection, and only with a FIN
            assert conn["pod"] in old_names and conn["end"] == "closed", f"{where}: {conn}"
            assert conn["ended"] >= killed[conn["pod"]] - 0.05, f"{where}: ended while its pod served: {conn}"
            survived += conn["opened"] < svc.when(next(p for p in olds if p.name == conn["pod"]), "terminating")
        udp = result["udp"]
        assert largest_gap(udp) < 1.0, f"{where}: UDP unanswered for {largest_gap(udp):.2f}s"
        assert {reason for _, reason in udp["failures"]} <= SOCKET_ENDED, f"{where}: {udp['failures']}"
        for old in olds:
            late = set(answers_after(udp, svc.when(old, "stopping") + 1.0))
            assert old.name not in late, f"{where}: {old.name} still answered UDP a second after it stopped serving"
    assert survived > 0, "no held connection was on an old pod when it began to terminate"
