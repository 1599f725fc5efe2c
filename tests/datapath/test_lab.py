"""The lab itself: wiring, addressing, cgroups, isolation from the host and complete teardown."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kpr.lab import HostSnapshot, Lab, LabError, Pod, host_violations, sweep_stale
from kpr.lab.plumbing import NETNS_DIR
from kpr.lab.teardown import RUN_ROOT

pytestmark = pytest.mark.datapath


def _addr(pod: Pod, family: str) -> str:
    return pod.ipv4 if family == "v4" else pod.ipv6


def _lab_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


def _assert_gone(lab: Lab, bpffs_dirs: list[Path]) -> None:
    assert _lab_netns(lab.prefix) == []
    assert not lab.cgroup.exists()
    assert not (RUN_ROOT / lab.prefix).exists()
    for path in bpffs_dirs:
        assert not path.exists()


def _wait_exec(pid: int, comm: str, timeout: float = 5.0) -> None:
    """Wait until the spawn wrapper (nsenter → sh) has exec'd the program, i.e. it sits in its cgroup."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"pid {pid} never became {comm}"
        time.sleep(0.005)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_client_reaches_pod_by_pod_ip(lab: Lab, proto: str, family: str) -> None:
    pod_a, client = lab.pods["pod-a"], lab.pods["client"]
    target = _addr(pod_a, family)
    result = lab.client(client, proto, target, 8080, count=5)
    assert result["errors"] == {}
    assert result["ok"] == 5
    assert result["served"] == {"pod-a": 5}
    assert result["seen_as"] == {_addr(client, family): 5}
    peer = f"[{target}]:8080" if family == "v6" else f"{target}:8080"
    assert result["peers"] == {peer: 5}


def test_udp_connected_and_sequence(lab: Lab) -> None:
    pod_b, client = lab.pods["pod-b"], lab.pods["client"]
    udp = lab.client(client, "udp", pod_b.ipv6, 8080, count=3, connected=True)
    assert udp["served"] == {"pod-b": 3}
    assert udp["peers"] == {f"[{pod_b.ipv6}]:8080": 3}
    tcp = lab.client(client, "tcp", pod_b.ipv4, 8080, count=3, sequence=True)
    assert tcp["sequence"] == ["pod-b"] * 3


def test_closed_port_is_refused(lab: Lab) -> None:
    result = lab.client(lab.pods["client"], "tcp", lab.pods["pod-c"].ipv4, 9, count=2, timeout=1)
    assert result["ok"] == 0
    assert result["errors"] == {"ECONNREFUSED": 2}
    assert result["first_error_after_ms"] is not None
    assert result["error_latency_ms"]["max"] < 500


def test_addressing(lab: Lab) -> None:
    node = lab.nodes["node1"]
    assert (node.number, node.ipv4, node.ipv6) == (1, "172.16.0.1", "fd00:16::1")
    assert (node.pod_cidr4, node.pod_cidr6) == ("10.244.1.0/24", "fd00:244:1::/64")
    assert (node.gateway4, node.gateway6) == ("10.244.1.1", "fd00:244:1::1")
    assert node.netns == f"{lab.prefix}-node1"
    assert node.bpffs_dir == Path(f"/sys/fs/bpf/{lab.prefix}-node1")
    assert not node.bpffs_dir.exists()  # the agent makes it
    pods = [lab.pods[name] for name in ("pod-a", "pod-b", "pod-c", "client")]
    assert [p.ipv4 for p in pods] == ["10.244.1.11", "10.244.1.12", "10.244.1.13", "10.244.1.14"]
    assert [p.ipv6 for p in pods] == ["fd00:244:1::11", "fd00:244:1::12", "fd00:244:1::13", "fd00:244:1::14"]
    assert all(len(p.host_veth) <= 15 for p in pods)
    assert len({p.host_veth for p in pods}) == len(pods)
    bridge_ports = lab.run(node, ["ip", "-o", "link", "show", "master", "cni0"]).stdout
    for pod in pods:
        assert f" {pod.host_veth}@" in bridge_ports
    sysctl = lab.run(node, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]).stdout.split()
    assert sysctl == ["1", "1"]


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_pods_on_two_nodes_reach_each_other(lab_factory: Callable[..., Lab], family: str) -> None:
    lab = lab_factory()
    node1, node2 = lab.add_node("node1"), lab.add_node("node2")
    assert node2.number == 2 and node2.ipv4 == "172.16.0.2"
    web1 = lab.add_pod(node1, "web1")
    web2 = lab.add_pod(node2, "web2")
    assert web2.ipv4 == "10.244.2.11"
    for src, dst in ((web1, web2), (web2, web1)):
        for proto in ("tcp", "udp"):
            result = lab.client(src, proto, _addr(dst, family), 8080, count=3)
            assert result["served"] == {dst.name: 3}, result
            assert result["seen_as"] == {_addr(src, family): 3}  # routed, not NATed


def test_third_node_gets_routes_both_ways(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    nodes = [lab.add_node(f"n{i}") for i in (1, 2, 3)]
    pods = [lab.add_pod(node, f"p{node.number}", udp_ports=()) for node in nodes]
    for src in pods:
        for dst in pods:
            result = lab.client(src, "tcp", dst.ipv6, 8080)
            assert result["served"] == {dst.name: 1}, (src.name, dst.name, result)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_external_reaches_node_underlay_address(lab_factory: Callable[..., Lab], family: str) -> None:
    lab = lab_factory()
    node = lab.add_node("node1")
    ext = lab.add_external()
    assert (ext.ipv4, ext.ipv6) == ("172.16.0.201", "fd00:16::201")
    lab.start_echo(node, tcp_ports=(30080,), udp_ports=(30080,))
    target = node.ipv4 if family == "v4" else node.ipv6
    for proto in ("tcp", "udp"):
        result = lab.client(ext, proto, target, 30080, count=2)
        assert result["served"] == {"node1": 2}, result
        assert result["seen_as"] == {(ext.ipv4 if family == "v4" else ext.ipv6): 2}


def test_external_has_no_route_to_pods(lab: Lab) -> None:
    ext = lab.add_external("outside")
    result = lab.client(ext, "tcp", lab.pods["pod-a"].ipv4, 8080, timeout=0.5)
    assert result["ok"] == 0
    assert result["errors"] == {"ENETUNREACH": 1}


def test_spawned_process_is_in_pod_cgroup_and_netns(lab: Lab) -> None:
    pod = lab.pods["pod-a"]
    proc = lab.spawn(pod, ["sleep", "60"])
    _wait_exec(proc.pid, "sleep")
    lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
    unified = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    assert unified == [f"/{lab.prefix}/node1/pod-a"]
    assert lab.cgroup_root / unified[0].lstrip("/") == pod.cgroup
    assert str(proc.pid) in (pod.cgroup / "cgroup.procs").read_text().split()
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(NETNS_DIR / pod.netns).st_ino
    # The mounts are the host's (nsenter --net, not `ip netns exec`): the agent would see bpffs and cgroup2.
    assert os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    # The echo server that add_pod started runs in the pod's cgroup too.
    assert len((pod.cgroup / "cgroup.procs").read_text().split()) == 2


def test_run_reports_failures(lab: Lab) -> None:
    assert lab.run("client", ["sh", "-c", "exit 3"], check=False).returncode == 3
    with pytest.raises(subprocess.CalledProcessError, match="boom"):
        lab.run("client", ["sh", "-c", "echo boom >&2; exit 1"])
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run("client", ["sleep", "30"], timeout=0.2)


def test_root_namespace_stays_isolated(lab: Lab) -> None:
    lab.add_external()
    lab.assert_host_isolated()
    root_routes = subprocess.run(["ip", "route", "get", "10.244.1.11"], capture_output=True, text=True).stdout
    assert "cni0" not in root_routes and "veth" not in root_routes


def test_host_violations_detects_leaks() -> None:
    before = HostSnapshot(
        routes=frozenset({("-4", "main", "unicast", "default", "192.0.2.1", "eth0")}),
        addresses=frozenset({("eth0", "192.0.2.2/24")}),
        links=frozenset({"lo", "eth0"}),
    )
    leaked = HostSnapshot(
        routes=before.routes
        | {
            ("-4", "main", "unicast", "10.244.1.0/24", "", "cni0"),
            ("-6", "main", "unicast", "fd00:244:1::/64", "", "x"),
        },
        addresses=before.addresses | {("cni0", "10.96.0.10/32")},
        links=before.links | {"kpr12345x", "cni0"},
    )
    problems = host_violations(before, leaked, "kpr12345", {"cni0"})
    assert len(problems) == 5, problems
    assert host_violations(before, before, "kpr12345", {"cni0"}) == []


def test_remove_pod(lab: Lab) -> None:
    node, pod_b = lab.nodes["node1"], lab.pods["pod-b"]
    lab.remove_pod("pod-b")
    assert "pod-b" not in lab.pods
    assert not (NETNS_DIR / pod_b.netns).exists()
    assert not pod_b.cgroup.exists()
    assert pod_b.host_veth not in lab.run(node, ["ip", "-o", "link"]).stdout
    result = lab.client("client", "tcp", pod_b.ipv4, 8080, timeout=0.5)
    assert result["ok"] == 0
    pod_d = lab.add_pod(node, "pod-d")
    assert pod_d.ipv4 == "10.244.1.15"  # addresses are not reused while fresh ones remain
    assert lab.client("client", "udp", pod_d.ipv6, 8080)["served"] == {"pod-d": 1}
    with pytest.raises(LabError):
        lab.remove_pod("pod-b")


def test_names_are_checked(lab: Lab) -> None:
    with pytest.raises(LabError):
        lab.add_pod("node1", "pod-a")
    with pytest.raises(LabError):
        lab.add_node("ul")
    with pytest.raises(LabError):
        lab.add_pod("node9", "pod-z")
    with pytest.raises(LabError):
        Lab(prefix="has-dash")


def test_close_removes_everything(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    node = lab.add_node("node1")
    lab.add_pod(node, "pod-a")
    lab.add_external()
    sleeper = lab.spawn("pod-a", ["sleep", "60"])
    _wait_exec(sleeper.pid, "sleep")
    # What an agent would leave: pinned maps in a bpffs directory, one level deep too.
    (node.bpffs_dir / "sub").mkdir(parents=True)
    for pin in (node.bpffs_dir / "m", node.bpffs_dir / "sub" / "m"):
        spec = ["type", "hash", "key", "4", "value", "4", "entries", "8", "name", "m"]
        subprocess.run(["bpftool", "map", "create", str(pin), *spec], check=True)
    assert (RUN_ROOT / lab.prefix / "owner").read_text().split()[0] == str(os.getpid())
    assert _lab_netns(lab.prefix)
    lab.close()
    assert sleeper.poll() is not None
    _assert_gone(lab, [node.bpffs_dir])
    lab.close()  # idempotent
    with pytest.raises(LabError):
        lab.add_node("node2")


def test_context_manager_cleans_up_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), Lab() as lab:
        lab.add_node("node1")
        raise RuntimeError("inside")
    _assert_gone(lab, [])


def test_sweep_stale_removes_a_dead_owners_lab(lab_factory: Callable[..., Lab]) -> None:
    live = lab_factory()
    live.add_node("node1")
    dead = lab_factory()
    node = dead.add_node("node1")
    echo = dead.add_pod(node, "pod-a")
    node.bpffs_dir.mkdir()
    (RUN_ROOT / dead.prefix / "owner").write_text(f"{_dead_pid()}\n")
    echo_pids = (echo.cgroup / "cgroup.procs").read_text().split()
    assert echo_pids

    swept = sweep_stale()
    assert dead.prefix in swept
    assert live.prefix not in swept
    _assert_gone(dead, [node.bpffs_dir])
    assert sorted(_lab_netns(live.prefix)) == [f"{live.prefix}-node1", f"{live.prefix}-ul"]
    assert live.cgroup.is_dir()
    dead.close()  # after a sweep, close() finds nothing left and does not complain


def test_failed_add_pod_leaves_nothing_half_made(lab: Lab) -> None:
    with pytest.raises(LabError, match="echo server"):
        lab.add_pod("node1", "broken", tcp_ports=(70000,))
    assert "broken" not in lab.pods
    assert not (NETNS_DIR / f"{lab.prefix}-broken").exists()
    assert not (lab.nodes["node1"].cgroup / "broken").exists()
    assert lab.add_pod("node1", "broken", echo=False).name == "broken"  # the name is free again
