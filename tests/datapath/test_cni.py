"""CNI chaining: kpr-cni after the reference `bridge` + `host-local` plugins, driven as a container runtime drives a
conflist (ADD in order with prevResult, CHECK and DEL with the ADD's result, DEL in reverse).

One lab node runs the real agent with --socket-lb=hostns-only and the echo pods pod-a, pod-b, pod-c as backends. Each
chained pod is a network namespace the test makes (`<prefix>-chainedN`), wired by the bridge plugin to the node's cni0
with an address from 10.244.1.200-250 / fd00:244:1::c8-fa, and runs its clients in a cgroup under the node's, so the
node's socket hooks see its connects (and, in hostns-only mode, leave them alone: the veth translates them).
The plugins run inside the node's namespace, as a runtime runs them on a node; nothing touches the root namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath.inspect import read_conntrack, read_counters, read_services
from kpr.lab import CLIENT_PATH, Lab, Node, Pod
from kpr.lab.cluster import LabAgent, endpoint_slice, pod_endpoints, service, wait_until, write_manifest

pytestmark = pytest.mark.datapath

ROOT = Path(__file__).resolve().parents[2]
CONFLIST = ROOT / "deploy" / "cni" / "10-kpr-chained.conflist"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
KPR_CNI = Path(sys.executable).with_name("kpr-cni")  # the console script of `pip install -e .`

WEB4, WEB6, EMPTY4, EMPTY6 = "10.96.7.10", "fd00:96::7:10", "10.96.7.11", "fd00:96::7:11"
TCP_PORT, UDP_PORT = 80, 53
PORTS = [("http", TCP_PORT, 8080, "TCP"), ("dns", UDP_PORT, 8080, "UDP")]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
NO_DAD = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
POD_PROGRAMS = {"ingress kpr_pod_in4", "ingress kpr_pod_in6", "egress kpr_pod_out4", "egress kpr_pod_out6"}


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Invoked:
    """One plugin execution: exit status, parsed stdout (None when empty), stderr."""

    returncode: int
    output: dict[str, Any] | None
    stderr: str


@dataclass
class ChainedPod:
    name: str
    netns: str
    cgroup: Path
    container_id: str
    result: dict[str, Any] | None = None  # the conflist's ADD result, kept as a runtime keeps it for CHECK and DEL

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def veth(self) -> str:
        """The host-side veth, from the bridge plugin's result (neither the bridge nor in a sandbox)."""
        assert self.result is not None
        names = [i["name"] for i in self.result["interfaces"] if "sandbox" not in i and i["name"] != "cni0"]
        assert len(names) == 1, self.result
        return str(names[0])

    def address(self, family: int) -> str:
        assert self.result is not None
        for ip in self.result["ips"]:
            addr = ip["address"].split("/")[0]
            if (":" in addr) == (family == 6):
                return str(addr)
        raise AssertionError(f"no IPv{family} address in {self.result}")


@dataclass
class Cluster:
    lab: Lab
    node: Node
    agent: LabAgent
    backends: list[Pod]
    conflist: dict[str, Any]
    cni_path: Path
    manifests: Path
    pods: list[ChainedPod] = field(default_factory=list)

    # ---- the container runtime's part

    def invoke(
        self,
        plugin: dict[str, Any],
        command: str,
        pod: ChainedPod,
        prev_result: dict[str, Any] | None = None,
        *,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Invoked:
        """Execute one plugin of the conflist in the node's namespace, as libcni does (stdin: the plugin's config
        with the list's name and cniVersion, plus prevResult; the environment: CNI_* only)."""
        if stdin is None:
            conf = {**plugin, "cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"]}
            if prev_result is not None:
                conf["prevResult"] = prev_result
            stdin = json.dumps(conf)
        variables = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns_path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.cni_path),
            **(env or {}),
        }
        argv = ["env", "-i", f"PATH={os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"]
        argv += [f"{k}={v}" for k, v in variables.items() if v is not None]
        argv.append(str(self.cni_path / plugin["type"]))
        proc = self.lab.run(self.node, argv, check=False, input=stdin, timeout=60)
        try:
            output = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            raise AssertionError(
                f"{plugin['type']} {command} printed no JSON: {proc.stdout!r} {proc.stderr!r}"
            ) from None
        return Invoked(proc.returncode, output, proc.stderr)

    def plugin(self, kind: str) -> dict[str, Any]:
        return next(p for p in self.conflist["plugins"] if p["type"] == kind)

    def kpr_cni(self, command: str, pod: ChainedPod, **kwargs: Any) -> Invoked:
        """kpr-cni alone, with the pod's result as prevResult unless `stdin` says otherwise."""
        return self.invoke(self.plugin("kpr-cni"), command, pod, pod.result, **kwargs)

    def add(self, pod: ChainedPod, upto: str | None = None) -> dict[str, Any]:
        """ADD every plugin in order (or up to and including the plugin of type `upto`); returns the final result."""
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            done = self.invoke(plugin, "ADD", pod, prev)
            assert done.returncode == 0 and done.output is not None, f"{plugin['type']} ADD failed: {done}"
            prev = done.output
            pod.result = prev
            if plugin["type"] == upto:
                break
        assert prev is not None
        return prev

    def check(self, pod: ChainedPod) -> list[Invoked]:
        return [self.invoke(p, "CHECK", pod, pod.result) for p in self.conflist["plugins"]]

    def delete(self, pod: ChainedPod) -> list[Invoked]:
        return [self.invoke(p, "DEL", pod, pod.result) for p in reversed(self.conflist["plugins"])]

    # ---- chained pods

    def new_pod(self) -> ChainedPod:
        name = f"chained{len(self.pods) + 1}"
        pod = ChainedPod(name, f"{self.lab.prefix}-{name}", self.node.cgroup / name, f"kprtest{self.lab.prefix}{name}")
        self.pods.append(pod)
        pod.cgroup.mkdir(exist_ok=True)
        subprocess.run(["ip", "netns", "add", pod.netns], check=True, capture_output=True)
        # as the lab does for its pods: no duplicate address detection, so IPv6 addresses are usable at once
        self.in_netns(pod, ["sysctl", "-q", "-w", *NO_DAD])
        self.in_netns(pod, ["ip", "link", "set", "lo", "up"])
        return pod

    def remove_pod(self, pod: ChainedPod) -> None:
        """What a runtime does when the sandbox goes: DEL (errors are the tests' business), then the namespace."""
        if pod.result is not None and Path(pod.netns_path).exists():
            self.delete(pod)
        with contextlib.suppress(OSError):
            (pod.cgroup / "cgroup.kill").write_text("1")
        subprocess.run(["ip", "netns", "del", pod.netns], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            wait_until(lambda: not pod.cgroup.exists() or _rmdir(pod.cgroup), 5, f"{pod.cgroup} removed")

    def in_netns(self, pod: ChainedPod, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run argv in the chained pod: its network namespace, and its cgroup under the node's."""
        script = f'echo $$ > "{pod.cgroup}/cgroup.procs" && exec "$@"'
        cmd = ["nsenter", f"--net={pod.netns_path}", "--", "sh", "-c", script, "sh", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def client(self, pod: ChainedPod, proto: str, host: str, port: int, **options: Any) -> dict[str, Any]:
        argv = [sys.executable, "-I", "-S", str(CLIENT_PATH), proto, host, str(port)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is not False:
                argv += [flag] if value is True else [flag, str(value)]
        result: dict[str, Any] = json.loads(self.in_netns(pod, argv).stdout)
        return result

    # ---- what the node sees

    def attached(self, veth: str) -> list[str]:
        script = "import json,sys\nfrom kpr.datapath.veth import attached\nprint(json.dumps(attached(sys.argv[1])))"
        names: list[str] = json.loads(self.lab.run(self.node, [sys.executable, "-c", script, veth]).stdout)
        return names

    def link_exists(self, name: str) -> bool:
        return self.lab.run(self.node, ["ip", "link", "show", "dev", name], check=False).returncode == 0

    def counters(self) -> dict[str, int]:
        return read_counters(self.node.bpffs_dir)

    def diagnosis(self, pod: ChainedPod) -> str:
        """What the datapath did, for an assertion message: counters, tracked flows, the veth's filters."""
        flows = [f for f in read_conntrack(self.node.bpffs_dir) if pod.address(4) in str(f) or pod.address(6) in str(f)]
        filters = self.lab.run(self.node, ["tc", "filter", "show", "dev", pod.veth, "ingress"], check=False).stdout
        filters += self.lab.run(self.node, ["tc", "filter", "show", "dev", pod.veth, "egress"], check=False).stdout
        nonzero = {k: v for k, v in self.counters().items() if v}
        return f"\ncounters: {nonzero}\nflows of the pod: {flows[:10]}\nfilters on {pod.veth}:\n{filters}"


def _rmdir(path: Path) -> bool:
    path.rmdir()
    return True


def lab_conflist(example: dict[str, Any], node: Node, run_dir: Path) -> dict[str, Any]:
    """deploy/cni's example with the lab's addresses: the node's cni0 already holds the gateway addresses (so the
    bridge plugin is no gateway and masquerades nothing), the IPAM state stays in the lab's run dir."""
    conf = json.loads(json.dumps(example))
    conf["name"] = "kpr-lab"
    bridge, kpr = conf["plugins"]
    assert (bridge["type"], bridge["ipam"]["type"], kpr["type"]) == ("bridge", "host-local", "kpr-cni")
    n = node.number
    bridge.update(isGateway=False, ipMasq=False)
    bridge["ipam"] = {
        "type": "host-local",
        "dataDir": str(run_dir / "cni-ipam"),
        "ranges": [
            [{"subnet": node.pod_cidr4, "rangeStart": f"10.244.{n}.200", "rangeEnd": f"10.244.{n}.250",
              "gateway": node.gateway4}],
            [{"subnet": node.pod_cidr6, "rangeStart": f"fd00:244:{n}::c8", "rangeEnd": f"fd00:244:{n}::fa",
              "gateway": node.gateway6}],
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }  # fmt: skip
    kpr["bpffsDir"] = str(node.bpffs_dir)
    return conf


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert KPR_CNI.exists(), f"{KPR_CNI} is missing: `pip install -e .` installs the kpr-cni console script"
    lab = Lab()
    try:
        node = lab.add_node("node1")
        backends = [lab.add_pod(node, name) for name in ("pod-a", "pod-b", "pod-c")]
        manifests = tmp_path_factory.mktemp("cni-manifests")
        write_manifest(
            manifests,
            "services.yaml",
            [
                service("web", [WEB4, WEB6], PORTS),
                endpoint_slice("web", pod_endpoints(backends, 4), SLICE_PORTS, family=4),
                endpoint_slice("web", pod_endpoints(backends, 6), SLICE_PORTS, family=6),
                service("empty", [EMPTY4, EMPTY6], PORTS),
            ],
        )
        agent = LabAgent(lab, node, manifests, extra_args=["--socket-lb", "hostns-only"]).start()
        agent.wait_started()
        frontends = {fmt(WEB4, TCP_PORT) + "/TCP", fmt(WEB6, UDP_PORT) + "/UDP", fmt(EMPTY6, UDP_PORT) + "/UDP"}
        wait_until(lambda: frontends <= {r.frontend for r in read_services(node.bpffs_dir)}, 15, "the services")
        # CNI_PATH: the reference plugins and kpr-cni, found by their type as a runtime finds them
        cni_path = lab.run_dir / "cni-bin"
        cni_path.mkdir()
        for plugin in ("bridge", "host-local"):
            (cni_path / plugin).symlink_to(REFERENCE_PLUGINS / plugin)
        (cni_path / "kpr-cni").symlink_to(KPR_CNI)
        conflist = lab_conflist(json.loads(CONFLIST.read_text()), node, lab.run_dir)
        cl = Cluster(lab, node, agent, backends, conflist, cni_path, manifests)
        yield cl
        for pod in cl.pods:
            cl.remove_pod(pod)
        lab.assert_host_isolated()
    finally:
        lab.close()


@pytest.fixture
def pod(cluster: Cluster) -> Iterator[ChainedPod]:
    """A chained pod: the whole conflist ADDed; DEL and the namespace's removal afterwards."""
    new = cluster.new_pod()
    try:
        cluster.add(new)
        yield new
    finally:
        cluster.remove_pod(new)


@pytest.fixture
def bridged_pod(cluster: Cluster) -> Iterator[ChainedPod]:
    """A pod that only the bridge plugin has ADDed: kpr-cni has not run for it."""
    new = cluster.new_pod()
    try:
        cluster.add(new, upto="bridge")
        yield new
    finally:
        cluster.remove_pod(new)


# ---- the pod's traffic


def iptables_packets(cluster: Cluster, pod: ChainedPod, family: int, vip: str, proto: str, port: int) -> int:
    """Packets counted by the pod's own OUTPUT rule for vip:port (the service-mesh view of its egress)."""
    tool = "iptables" if family == 4 else "ip6tables"
    listing = cluster.in_netns(pod, [tool, "-w", "-nvxL", "OUTPUT"]).stdout
    for line in listing.splitlines()[2:]:
        fields = line.split()
        protos = {proto, {"tcp": "6", "udp": "17"}[proto]}
        if f"{vip}" in fields and f"dpt:{port}" in fields and protos & set(fields):
            return int(fields[0])
    raise AssertionError(f"no {tool} rule for {vip}:{port}/{proto} in:\n{listing}")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_chained_pod_reaches_every_backend_and_sees_the_cluster_ip_on_the_wire(
    cluster: Cluster, pod: ChainedPod, proto: str, family: int
) -> None:
    vip = WEB4 if family == 4 else WEB6
    port = TCP_PORT if proto == "tcp" else UDP_PORT
    tool = "iptables" if family == 4 else "ip6tables"
    # what a service mesh's sidecar rules match: the ClusterIP as the destination of the pod's own packets
    cluster.in_netns(pod, [tool, "-w", "-A", "OUTPUT", "-d", vip, "-p", proto, "--dport", str(port), "-j", "ACCEPT"])
    before = cluster.counters()
    result = cluster.client(pod, proto, vip, port, count=150)
    after = cluster.counters()
    assert result["ok"] == 150 and result["errors"] == {}, f"{result}{cluster.diagnosis(pod)}"
    assert set(result["served"]) == {"pod-a", "pod-b", "pod-c"}
    assert min(result["served"].values()) >= 15, result["served"]  # random choice: ~50 each
    # replies come back from the ClusterIP (for UDP the source recvfrom() reports), and no SNAT on the way there
    assert result["peers"] == {fmt(vip, port): 150}
    assert result["seen_as"] == {pod.address(family): 150}
    # every datagram / at least every SYN went out of the pod to the ClusterIP
    assert iptables_packets(cluster, pod, family, vip, proto, port) >= 150
    # translated per packet at the veth, not at connect(): the node's socket hooks left the pod alone
    assert after["tc_dnat"] - before["tc_dnat"] >= 150  # every datagram, every segment from the pod
    assert after["xlate_fwd"] == before["xlate_fwd"]
    # tracked by kpr's conntrack (`kpr conntrack`), without masquerade (a new source port may meet a live flow of
    # an earlier test, so flows are not counted one per request)
    prefix = fmt(pod.address(family), 0)[:-1]
    flows = [
        f
        for f in read_conntrack(cluster.node.bpffs_dir)
        if f.direction == "original"
        and f.source.startswith(prefix)
        and f.frontend == f"{fmt(vip, port)}/{proto.upper()}"
    ]
    assert flows and not any(f.masquerade for f in flows)
    assert {f.backend.rsplit(":", 1)[0].strip("[]") for f in flows} == {
        p.ipv4 if family == 4 else p.ipv6 for p in cluster.backends
    }


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_endpoints_is_refused_at_once(cluster: Cluster, pod: ChainedPod, proto: str, family: int) -> None:
    key = "tc_reject_tcp" if proto == "tcp" else "tc_reject_udp"
    before = cluster.counters()[key]
    vip = EMPTY4 if family == 4 else EMPTY6
    port = TCP_PORT if proto == "tcp" else UDP_PORT
    # a TCP reset, or an ICMP port unreachable (reported to a connected UDP socket), built at the pod's veth
    result = cluster.client(pod, proto, vip, port, count=10, timeout=2, connected=proto == "udp")
    assert result["errors"] == {"ECONNREFUSED": 10}, f"{result}{cluster.diagnosis(pod)}"
    assert result["error_latency_ms"]["max"] < 100
    assert cluster.counters()[key] - before == 10


def test_load_balancer_source_ranges_apply_to_chained_pods(cluster: Cluster, pod: ChainedPod) -> None:
    """kube-proxy's firewall checks a pod's source like any other: outside the ranges the veth drops (and counts)."""
    lb_ip = "172.16.100.9"

    def ranged(cidr: str) -> list[dict[str, Any]]:
        svc = service("ranged", ["10.96.7.12"], PORTS, type="LoadBalancer", loadBalancerSourceRanges=[cidr])
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
        return [svc, endpoint_slice("ranged", pod_endpoints(cluster.backends[:1], 4), SLICE_PORTS, family=4)]

    frontend = f"{lb_ip}:{TCP_PORT}/TCP"
    try:
        write_manifest(cluster.manifests, "ranged.yaml", ranged(f"{pod.address(4)}/32"))
        wait_until(lambda: frontend in {r.frontend for r in read_services(cluster.node.bpffs_dir)}, 15, "ranged")
        allowed = cluster.client(pod, "tcp", lb_ip, TCP_PORT, count=10)
        assert allowed["served"] == {"pod-a": 10}, f"{allowed}{cluster.diagnosis(pod)}"
        write_manifest(cluster.manifests, "ranged.yaml", ranged("192.0.2.0/24"))
        before = cluster.counters()["tc_drop_source_range"]
        wait_until(
            lambda: cluster.client(pod, "tcp", lb_ip, TCP_PORT, count=1, timeout=0.5)["errors"] == {"timeout": 1},
            15,
            "the pod outside the ranges dropped",
        )
        assert cluster.counters()["tc_drop_source_range"] > before
    finally:
        (cluster.manifests / "ranged.yaml").unlink(missing_ok=True)


def test_the_node_itself_is_still_served_at_connect(cluster: Cluster) -> None:
    """hostns-only: the node's own sockets keep socket-level load balancing."""
    before = cluster.counters()["xlate_fwd"]
    result = cluster.lab.client(cluster.node, "tcp", WEB4, TCP_PORT, count=30)
    assert result["ok"] == 30 and len(result["served"]) == 3
    assert cluster.counters()["xlate_fwd"] - before == 30


# ---- the plugin's life cycle


def test_add_prints_prev_result_unchanged_and_attaches_every_program(cluster: Cluster, bridged_pod: ChainedPod) -> None:
    pod = bridged_pod
    bridge_result = pod.result
    assert bridge_result is not None and cluster.attached(pod.veth) == []
    done = cluster.kpr_cni("ADD", pod)
    assert done.returncode == 0, done
    assert done.output == {**bridge_result, "cniVersion": "1.0.0"}
    assert set(cluster.attached(pod.veth)) == POD_PROGRAMS
    assert pod.veth in done.stderr  # the log line says which veth


def test_add_twice_is_harmless(cluster: Cluster, pod: ChainedPod) -> None:
    first = sorted(cluster.attached(pod.veth))
    again = cluster.kpr_cni("ADD", pod)
    assert again.returncode == 0 and again.output == pod.result, again
    assert sorted(cluster.attached(pod.veth)) == first and set(first) == POD_PROGRAMS
    assert all(c.returncode == 0 for c in cluster.check(pod))
    result = cluster.client(pod, "tcp", WEB4, TCP_PORT, count=30)
    assert result["ok"] == 30, result


def test_check_passes_and_fails_once_a_filter_is_removed_by_hand(cluster: Cluster, pod: ChainedPod) -> None:
    checks = cluster.check(pod)
    assert [(c.returncode, c.output) for c in checks] == [(0, None), (0, None)], checks
    cluster.lab.run(cluster.node, ["tc", "filter", "del", "dev", pod.veth, "ingress"])
    bridge_check, kpr_check = cluster.check(pod)
    assert bridge_check.returncode == 0, bridge_check  # the bridge plugin's resources are intact
    assert kpr_check.returncode != 0 and kpr_check.output is not None, kpr_check
    assert kpr_check.output["code"] == 999 and kpr_check.output["cniVersion"] == "1.0.0"
    assert pod.veth in kpr_check.output["msg"] and "ingress kpr_pod_in4" in kpr_check.output["msg"]


def test_del_removes_the_attachment_and_is_idempotent(cluster: Cluster, pod: ChainedPod) -> None:
    veth = pod.veth
    assert set(cluster.attached(veth)) == POD_PROGRAMS
    # DEL runs in reverse: kpr-cni first, while the bridge plugin's veth still exists
    kpr_del = cluster.kpr_cni("DEL", pod)
    assert (kpr_del.returncode, kpr_del.output) == (0, None), kpr_del
    assert cluster.link_exists(veth) and cluster.attached(veth) == []
    no_clsact = cluster.lab.run(cluster.node, ["tc", "qdisc", "show", "dev", veth]).stdout
    assert "clsact" not in no_clsact
    bridge_del = cluster.invoke(cluster.plugin("bridge"), "DEL", pod, pod.result)
    assert bridge_del.returncode == 0, bridge_del
    assert not cluster.link_exists(veth)
    # a runtime may DEL again: with the interface gone, and with the namespace gone too
    assert [d.returncode for d in cluster.delete(pod)] == [0, 0]
    subprocess.run(["ip", "netns", "del", pod.netns], check=True, capture_output=True)
    assert [d.returncode for d in cluster.delete(pod)] == [0, 0]
    without_netns = cluster.kpr_cni("DEL", pod, env={"CNI_NETNS": ""})
    assert without_netns.returncode == 0, without_netns


def test_del_after_the_namespace_is_gone(cluster: Cluster, pod: ChainedPod) -> None:
    veth = pod.veth
    subprocess.run(["ip", "netns", "del", pod.netns], check=True, capture_output=True)
    wait_until(lambda: not cluster.link_exists(veth), 5, "the veth to go with the namespace")
    assert [(d.returncode, d.output) for d in cluster.delete(pod)] == [(0, None), (0, None)]


# ---- errors


def _conf(cluster: Cluster, pod: ChainedPod, **changes: Any) -> dict[str, Any]:
    conf = {**cluster.plugin("kpr-cni"), "cniVersion": "1.0.0", "name": "kpr-lab", "prevResult": pod.result}
    conf.update(changes)
    return {k: v for k, v in conf.items() if v is not None}


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("invalid JSON", 6),
        ("not an object", 6),
        ("missing prevResult", 7),
        ("unknown cniVersion", 1),
        ("missing cniVersion", 7),
        ("relative bpffsDir", 7),
        ("no agent pins", 11),
        ("missing CNI_NETNS", 4),
        ("unknown CNI_COMMAND", 4),
        ("prevResult of another pod", 7),
        ("no such interface", 999),
    ],
)
def test_bad_input_is_a_cni_error_and_attaches_nothing(
    cluster: Cluster, bridged_pod: ChainedPod, case: str, code: int
) -> None:
    pod = bridged_pod
    env: dict[str, str] = {}
    stdin: str | None = None
    if case == "invalid JSON":
        stdin = '{"cniVersion": "1.0.0", "name": "kpr-lab", "type": "kpr-cni",'
    elif case == "not an object":
        stdin = '["kpr-cni"]'
    elif case == "missing prevResult":
        stdin = json.dumps(_conf(cluster, pod, prevResult=None))
    elif case == "unknown cniVersion":
        stdin = json.dumps(_conf(cluster, pod, cniVersion="9.9.9"))
    elif case == "missing cniVersion":
        stdin = json.dumps(_conf(cluster, pod, cniVersion=None))
    elif case == "relative bpffsDir":
        stdin = json.dumps(_conf(cluster, pod, bpffsDir="sys/fs/bpf/kpr"))
    elif case == "no agent pins":
        stdin = json.dumps(_conf(cluster, pod, bpffsDir=str(cluster.lab.run_dir / "no-agent-here")))
    elif case == "missing CNI_NETNS":
        stdin, env = json.dumps(_conf(cluster, pod)), {"CNI_NETNS": ""}
    elif case == "unknown CNI_COMMAND":
        stdin, env = json.dumps(_conf(cluster, pod)), {"CNI_COMMAND": "UPDATE"}
    elif case == "prevResult of another pod":
        assert pod.result is not None
        other = json.loads(json.dumps(pod.result))
        for interface in other["interfaces"]:
            if interface["name"] == pod.veth:
                interface["name"] = "vethdeadbeef"
        stdin = json.dumps(_conf(cluster, pod, prevResult=other))
    elif case == "no such interface":
        stdin, env = json.dumps(_conf(cluster, pod)), {"CNI_IFNAME": "eth9"}
    done = cluster.kpr_cni("ADD", pod, stdin=stdin, env=env)
    assert done.returncode != 0, done
    assert done.output is not None and done.output["code"] == code, done
    assert done.output["msg"] and done.output["cniVersion"] == "1.0.0"
    assert cluster.attached(pod.veth) == []
    assert "clsact" not in cluster.lab.run(cluster.node, ["tc", "qdisc", "show", "dev", pod.veth]).stdout


def test_error_messages_say_what_to_do(cluster: Cluster, bridged_pod: ChainedPod) -> None:
    pod = bridged_pod
    missing = cluster.kpr_cni("ADD", pod, stdin=json.dumps(_conf(cluster, pod, prevResult=None)))
    assert missing.output is not None and "chained plugin" in missing.output["msg"]
    no_agent = cluster.kpr_cni("ADD", pod, stdin=json.dumps(_conf(cluster, pod, bpffsDir="/nonexistent")))
    assert no_agent.output is not None and "--socket-lb=hostns-only" in no_agent.output["details"]
    env_error = cluster.kpr_cni("ADD", pod, env={"CNI_CONTAINERID": ""})
    assert env_error.output is not None and "CNI_CONTAINERID" in env_error.output["msg"]
    assert env_error.output["code"] == 4


def test_check_on_an_old_cni_version_and_version(cluster: Cluster, pod: ChainedPod) -> None:
    old = cluster.kpr_cni("CHECK", pod, stdin=json.dumps(_conf(cluster, pod, cniVersion="0.3.1")))
    assert old.returncode != 0 and old.output is not None and old.output["code"] == 1
    assert old.output["cniVersion"] == "0.3.1"
    version = cluster.kpr_cni("VERSION", pod, stdin='{"cniVersion": "1.0.0"}')
    assert version.returncode == 0
    assert version.output == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    empty = cluster.kpr_cni("VERSION", pod, stdin="", env={"CNI_CONTAINERID": ""})
    assert empty.returncode == 0 and empty.output == version.output


def test_an_older_cni_version_is_served_too(cluster: Cluster, bridged_pod: ChainedPod) -> None:
    pod = bridged_pod
    done = cluster.kpr_cni("ADD", pod, stdin=json.dumps(_conf(cluster, pod, cniVersion="0.4.0")))
    assert done.returncode == 0 and done.output is not None and done.output["cniVersion"] == "0.4.0", done
    assert set(cluster.attached(pod.veth)) == POD_PROGRAMS


# ---- hostile input (tests/unit/test_cni_input.py has every row that needs no namespace; these enter real ones)


def _not_a_namespace(cluster: Cluster, pod: ChainedPod, case: str) -> str:
    """A CNI_NETNS path that is no network namespace, made in the lab's run dir (the node shares the filesystem)."""
    path = cluster.lab.run_dir / f"{pod.name}-{case.replace(' ', '-')}"
    if case == "a FIFO":
        os.mkfifo(path)
    elif case == "an unmounted namespace file":  # what /run/netns/NAME is after `umount`
        path.write_bytes(b"")
    elif case == "the mount namespace":
        return "/proc/self/ns/mnt"
    elif case != "a missing path":
        raise AssertionError(case)
    return str(path)


NOT_A_NAMESPACE = ["a FIFO", "an unmounted namespace file", "the mount namespace", "a missing path"]


@pytest.mark.parametrize(
    ("case", "code"),
    [
        *((f"CNI_NETNS is {case}", 4) for case in NOT_A_NAMESPACE),
        ("nested 200k deep", 6),
        ("nested 200k deep in prevResult", 6),
        ("larger than 1 MiB", 6),
        ("prevResult interfaces not a list", 7),
    ],
)
def test_hostile_input_is_a_cni_error_and_attaches_nothing(
    cluster: Cluster, bridged_pod: ChainedPod, case: str, code: int
) -> None:
    pod = bridged_pod
    env: dict[str, str] = {}
    stdin: str | None = None
    if case.startswith("CNI_NETNS is "):
        env = {"CNI_NETNS": _not_a_namespace(cluster, pod, case.removeprefix("CNI_NETNS is "))}
    elif case == "nested 200k deep":
        stdin = "[" * 200_000 + "]" * 200_000
    elif case == "nested 200k deep in prevResult":
        stdin = json.dumps(_conf(cluster, pod, prevResult={"x": "@"})).replace('"@"', "[" * 200_000 + "]" * 200_000)
    elif case == "larger than 1 MiB":
        stdin = json.dumps(_conf(cluster, pod)) + " " * (1 << 20)
    elif case == "prevResult interfaces not a list":
        assert pod.result is not None
        stdin = json.dumps(_conf(cluster, pod, prevResult={**pod.result, "interfaces": pod.veth}))
    for command in ("ADD", "CHECK"):
        done = cluster.kpr_cni(command, pod, stdin=stdin, env=env)  # a hang fails on lab.run's timeout
        assert done.returncode != 0 and "Traceback" not in done.stderr, done
        assert done.output is not None and done.output["code"] == code and done.output["msg"], done
        if case.startswith("CNI_NETNS"):
            assert "CNI_NETNS" in done.output["msg"], done
    assert cluster.attached(pod.veth) == []


@pytest.mark.parametrize("case", NOT_A_NAMESPACE)
def test_del_of_a_cni_netns_that_is_not_a_namespace_succeeds_and_touches_nothing(
    cluster: Cluster, pod: ChainedPod, case: str
) -> None:
    done = cluster.kpr_cni("DEL", pod, env={"CNI_NETNS": _not_a_namespace(cluster, pod, case)})
    assert (done.returncode, done.output) == (0, None), done
    assert "nothing to do" in done.stderr, done
    assert set(cluster.attached(pod.veth)) == POD_PROGRAMS  # the pod's own attachment is not someone else's DEL


def test_cni_netns_as_proc_pid_ns_net_and_as_a_symlink(cluster: Cluster, bridged_pod: ChainedPod) -> None:
    """The namespace check accepts what the spec allows: /proc/PID/ns/net, or a bind mount or a link to one."""
    pod = bridged_pod
    link = cluster.lab.run_dir / f"{pod.name}-netns-link"
    link.symlink_to(pod.netns_path)
    with subprocess.Popen(["ip", "netns", "exec", pod.netns, "sleep", "60"]) as holder:
        try:
            by_pid = f"/proc/{holder.pid}/ns/net"
            wait_until(lambda: os.stat(by_pid).st_ino == os.stat(pod.netns_path).st_ino, 5, "sleep in the pod")
            added = cluster.kpr_cni("ADD", pod, env={"CNI_NETNS": by_pid})
            assert added.returncode == 0 and added.output == {**(pod.result or {}), "cniVersion": "1.0.0"}, added
            assert set(cluster.attached(pod.veth)) == POD_PROGRAMS
            checked = cluster.kpr_cni("CHECK", pod, env={"CNI_NETNS": str(link)})
            assert (checked.returncode, checked.output) == (0, None), checked
            deleted = cluster.kpr_cni("DEL", pod, env={"CNI_NETNS": str(link)})
            assert (deleted.returncode, deleted.output) == (0, None), deleted
            assert cluster.attached(pod.veth) == []
        finally:
            holder.kill()
