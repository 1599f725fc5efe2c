"""The lab: Kubernetes-shaped nodes, pods and external clients made of network namespaces on this machine.

Layout (N: node number 1, 2, …; k: pod number within its node, 1, 2, …; prefix e.g. "kpr3fa9c"):

    <prefix>-ul      underlay: bridge br0 (L2 between nodes and externals), ports n<N> and x<k>
    <prefix>-<node>  node N: eth0 172.16.0.N/24 fd00:16::N/64 on the underlay; bridge cni0 10.244.N.1/24
                     fd00:244:N::1/64 for its pods; forwarding on; routes to every other node's pod CIDRs
    <prefix>-<pod>   pod: eth0 10.244.N.(10+k)/24 fd00:244:N::(10+k)/64, default routes via cni0
    <prefix>-<ext>   external client: eth0 172.16.0.(200+k)/24 fd00:16::(200+k)/64 on the underlay

Cgroups (cgroup v2): <mount>/<prefix>/<node>/<pod> and <mount>/<prefix>/<ext>; a node's agent attaches its socket
programs to <mount>/<prefix>/<node> and so sees exactly that node's processes. bpffs: /sys/fs/bpf/<prefix>-<node>
(made by the agent, removed by the lab). Runtime state: /run/kpr-lab/<prefix>/ with an `owner` file (the creating
pid), which is how sweep_stale() tells a crashed lab from a live one.

Nothing is ever created in the root network namespace: veth pairs are made inside one lab namespace with the peer
placed directly into another (`ip -n A link add … peer name … netns B`). Processes run with
`nsenter --net=/run/netns/NAME` (never `ip netns exec`, whose private /sys hides /sys/fs/bpf and the cgroup2 mount)
and move themselves into their cgroup before exec.

Prefixes are a lowercase letter followed by lowercase letters and digits, never a dash: everything a lab makes is
named "<prefix>-…", so the prefix of any lab object is the text before its first dash and one lab's cleanup can never
match another's.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

RUN_ROOT = Path("/run/kpr-lab")
NETNS_DIR = Path("/run/netns")
BPFFS_ROOT = Path("/sys/fs/bpf")
ECHO_PATH = Path(__file__).with_name("echo.py")
CLIENT_PATH = Path(__file__).with_name("client.py")

UNDERLAY = "ul"  # the underlay namespace is <prefix>-ul
UNDERLAY_BRIDGE = "br0"
POD_BRIDGE = "cni0"
MAX_NODES = 199  # 172.16.0.N; externals start at .201
MAX_PODS_PER_NODE = 244  # 10.244.N.(10+k) <= .254
MAX_EXTERNALS = 54  # 172.16.0.(200+k) <= .254
# What must never become reachable from the root namespace because of a lab.
WATCHED_NETWORKS = ("10.244.0.0/16", "172.16.0.0/24", "10.96.0.0/12", "fd00::/8")
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/32")  # every node's pod CIDR: what --cluster-cidr is in the lab

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_IFNAMSIZ = 15


class LabError(RuntimeError):
    """The lab could not be set up (or torn down) as asked."""


class RunError(subprocess.CalledProcessError):
    """A command run with Lab.run(check=True) failed; str() includes its stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        err = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return f"{text}\nstderr: {err[-2000:]}" if err else text


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    number: int
    netns: str
    cgroup: Path
    bpffs_dir: Path
    ipv4: str  # underlay address
    ipv6: str
    pod_cidr4: str
    pod_cidr6: str
    gateway4: str  # the cni0 address, the pods' default gateway
    gateway6: str


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    node: str  # the node's name
    netns: str
    cgroup: Path
    ipv4: str
    ipv6: str
    host_veth: str  # the node-side end of the pod's veth, a port of cni0


@dataclass(frozen=True, slots=True)
class External:
    name: str
    number: int
    netns: str
    cgroup: Path
    ipv4: str
    ipv6: str


Where = Node | Pod | External | str


@dataclass(slots=True)
class _Tracked:
    proc: subprocess.Popen[Any]
    owner: str  # the name of the node, pod or external it runs in
    internal: bool  # started by the lab itself (echo servers): the lab closes its pipes


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _sh(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{shlex.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        if input:
            detail += "\ninput:\n" + input
        raise LabError(f"{shlex.join(argv)} failed with status {proc.returncode}: {detail}")
    return proc


def _ip_batch(netns: str, commands: Iterable[str], *, force: bool = False) -> subprocess.CompletedProcess[str]:
    """Run several `ip` commands inside one namespace with a single process (`ip -n NS -batch -`)."""
    argv = ["ip", "-n", netns, *(["-force"] if force else []), "-batch", "-"]
    return _sh(argv, input="\n".join(commands) + "\n", check=not force)


def _sysctl(netns: str, settings: Mapping[str, str]) -> None:
    args = [f"{key}={value}" for key, value in settings.items()]
    _sh(["nsenter", f"--net={NETNS_DIR / netns}", "--", "sysctl", "-q", "-w", *args])


def _netns_names() -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(NETNS_DIR))
    except FileNotFoundError:
        return []


def cgroup2_mount() -> Path:
    """Where the cgroup v2 hierarchy is mounted (read from /proc/mounts, not assumed)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                # /proc/mounts escapes space, tab, newline and backslash as octal.
                path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                return Path(path)
    raise LabError("no cgroup2 file system is mounted (see /proc/mounts)")


def _cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in Path(dirpath, "cgroup.procs").read_text().split()]
    return pids


def _cgroup_populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return bool(_cgroup_pids(path))
    return "populated 1" in events


def _cgroup_kill(path: Path, timeout: float = 5.0) -> None:
    """Kill every process in the cgroup subtree and wait until it is empty."""
    if not path.is_dir():
        return
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while _cgroup_populated(path):
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:  # kernels before 5.14
            for pid in _cgroup_pids(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes in {path} survive SIGKILL: {_cgroup_pids(path)}")
        time.sleep(0.005)


def _cgroup_remove(path: Path) -> None:
    """Remove a cgroup directory tree leaf first (cgroup directories are removed with rmdir, never unlink)."""
    if not path.is_dir():
        return
    _cgroup_kill(path)
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LabError(f"cannot remove cgroup {dirpath}: {exc}") from exc


def _remove_bpffs_dir(path: Path) -> None:
    """Unlink every pin under a bpffs directory of the lab, then the directory."""
    if path.parent != BPFFS_ROOT or path.is_symlink() or not path.exists():
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LabError(f"cannot remove {path}: {exc}") from exc


def _remove_bpffs_dirs(paths: Iterable[Path]) -> None:
    for path in list(paths):
        _remove_bpffs_dir(path)


def _delete_netns(names: Iterable[str]) -> None:
    names = [name for name in names if (NETNS_DIR / name).exists()]
    if not names:
        return
    _ip_batch_root([f"netns del {name}" for name in names])
    left = [name for name in names if (NETNS_DIR / name).exists()]
    if left:
        raise LabError(f"cannot delete network namespaces {left}")


def _ip_batch_root(commands: Iterable[str]) -> None:
    # `netns add/del` are about the bind mounts in /run/netns, not about the caller's namespace.
    _sh(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n", check=False)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(owner_file: Path) -> bool:
    """Whether the process that created a lab (pid and start time in its owner file) still runs."""
    try:
        fields = owner_file.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A different start time means the pid now belongs to another process.
    return len(fields) < 2 or _proc_start_time(pid) in (None, fields[1])


def _remove_remains(prefix: str, cgroup_root: Path) -> list[str]:
    """Remove every piece of lab `prefix` that the kernel still holds; return what could not be removed."""
    errors: list[str] = []
    steps: list[tuple[str, Any]] = [
        ("processes", lambda: _cgroup_kill(cgroup_root / prefix)),
        ("netns", lambda: _delete_netns(n for n in _netns_names() if n.startswith(prefix + "-"))),
        ("cgroups", lambda: _cgroup_remove(cgroup_root / prefix)),
        ("bpffs", lambda: _remove_bpffs_dirs(BPFFS_ROOT.glob(prefix + "-*"))),
        ("runtime dir", lambda: shutil.rmtree(RUN_ROOT / prefix, ignore_errors=True)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(f"{what}: {exc}")
    return errors


def sweep_stale(prefix_start: str = "kpr") -> list[str]:
    """Remove what crashed labs left behind: labs under /run/kpr-lab whose owner process is gone.

    Only labs whose prefix starts with `prefix_start` are considered; live labs (owner pid running) are never
    touched. Returns the prefixes that were swept.
    """
    if not RUN_ROOT.is_dir():
        return []
    cgroup_root = cgroup2_mount()
    swept: list[str] = []
    errors: list[str] = []
    for entry in sorted(RUN_ROOT.iterdir()):
        name = entry.name
        if name.startswith("."):  # a claim in progress: ".<prefix>.<pid>"
            pid = name.rsplit(".", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not name.startswith(prefix_start) or not _PREFIX_RE.match(name) or not entry.is_dir():
            continue
        if _owner_alive(entry / "owner"):
            continue
        errors += [f"{name}: {error}" for error in _remove_remains(name, cgroup_root)]
        swept.append(name)
    if errors:
        raise LabError("sweeping stale labs left pieces behind: " + "; ".join(errors))
    return swept


# --------------------------------------------------------------------------------------------------------------------
# the root namespace must never learn about the lab


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """What the root network namespace routes, addresses and links look like."""

    routes: frozenset[tuple[str, ...]]  # (family, table, type, dst, gateway, dev)
    addresses: frozenset[tuple[str, str]]  # (dev, address/prefixlen)
    links: frozenset[str]


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _sh(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


def host_snapshot() -> HostSnapshot:
    routes: set[tuple[str, ...]] = set()
    for family in ("-4", "-6"):
        for route in _ip_json(family, "route", "show", "table", "all"):
            routes.add(
                (
                    family,
                    str(route.get("table", "main")),
                    str(route.get("type", "unicast")),
                    str(route.get("dst", "")),
                    str(route.get("gateway", "")),
                    str(route.get("dev", "")),
                )
            )
    addresses = {
        (link["ifname"], f"{info['local']}/{info['prefixlen']}")
        for link in _ip_json("addr", "show")
        for info in link.get("addr_info", [])
        if "local" in info
    }
    links = {link["ifname"] for link in _ip_json("link", "show")}
    return HostSnapshot(frozenset(routes), frozenset(addresses), frozenset(links))


def _overlaps_watched(text: str, family: str) -> bool:
    if text == "default":
        text = "0.0.0.0/0" if family == "-4" else "::/0"
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    for watched in WATCHED_NETWORKS:
        other = ipaddress.ip_network(watched)
        if other.version == net.version and net.overlaps(other):
            return True
    return False


def host_violations(before: HostSnapshot, after: HostSnapshot, prefix: str, names: Iterable[str] = ()) -> list[str]:
    """What the lab added to the root namespace: routes or addresses for cluster ranges, lab-named interfaces."""
    problems: list[str] = []
    for family, table, kind, dst, gateway, dev in sorted(after.routes - before.routes):
        if _overlaps_watched(dst, family):
            problems.append(f"route {dst} via {gateway or '-'} dev {dev or '-'} (table {table}, {kind})")
    for dev, address in sorted(after.addresses - before.addresses):
        if _overlaps_watched(address, "-6" if ":" in address else "-4"):
            problems.append(f"address {address} on {dev}")
    lab_names = set(names)
    for link in sorted(after.links):
        if link.startswith(prefix) or (link in lab_names and link not in before.links):
            problems.append(f"interface {link}")
    return problems


# --------------------------------------------------------------------------------------------------------------------
# the lab

_OPEN_LABS: weakref.WeakSet[Lab] = weakref.WeakSet()


def _close_open_labs() -> None:
    for lab in list(_OPEN_LABS):
        with contextlib.suppress(Exception):
            lab.close()


atexit.register(_close_open_labs)


class Lab:
    """A set of lab namespaces, cgroups and processes that close() removes completely.

    Usable as a context manager; setup happens in the constructor, so `lab = Lab(); …; lab.close()` works too.
    """

    def __init__(self, prefix: str | None = None) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, cgroups, bpffs)")
        self.prefix = prefix if prefix is not None else "kpr" + secrets.token_hex(3)[:5]
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}: a lowercase letter, then 1-15 letters or digits")
        self.cgroup_root = cgroup2_mount()
        self.cgroup = self.cgroup_root / self.prefix
        self.run_dir = RUN_ROOT / self.prefix
        self.underlay = f"{self.prefix}-{UNDERLAY}"
        self._lock = threading.RLock()
        self._nodes: dict[str, Node] = {}
        self._pods: dict[str, Pod] = {}
        self._externals: dict[str, External] = {}
        self._pod_counter: dict[str, int] = {}  # node name -> last pod number handed out
        self._pod_numbers: dict[str, int] = {}  # pod name -> its number within its node
        self._link_names: set[str] = {UNDERLAY_BRIDGE}
        self._tracked: list[_Tracked] = []
        self._owned = False
        self._closed = False
        self._before = host_snapshot()
        self._claim()
        try:
            self.cgroup.mkdir(exist_ok=True)
            self._add_netns(self.underlay, {})
            _ip_batch(
                self.underlay,
                [
                    f"link add {UNDERLAY_BRIDGE} type bridge mcast_snooping 0",
                    f"link set {UNDERLAY_BRIDGE} up",
                ],
            )
        except BaseException:
            self._close_quietly()
            raise
        _OPEN_LABS.add(self)

    # ---- public views

    @property
    def nodes(self) -> Mapping[str, Node]:
        return MappingProxyType(self._nodes)

    @property
    def pods(self) -> Mapping[str, Pod]:
        return MappingProxyType(self._pods)

    @property
    def externals(self) -> Mapping[str, External]:
        return MappingProxyType(self._externals)

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, nodes={list(self._nodes)}, pods={list(self._pods)})"

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._close_quietly()

    # ---- building

    def add_node(self, name: str) -> Node:
        """A node namespace on the underlay with a pod bridge, forwarding and routes to the other nodes' pods."""
        with self._lock:
            self._check_name(name)
            number = max((node.number for node in self._nodes.values()), default=0) + 1
            if number > MAX_NODES:
                raise LabError(f"at most {MAX_NODES} nodes per lab")
            node = Node(
                name=name,
                number=number,
                netns=f"{self.prefix}-{name}",
                cgroup=self.cgroup / name,
                bpffs_dir=BPFFS_ROOT / f"{self.prefix}-{name}",
                ipv4=f"172.16.0.{number}",
                ipv6=f"fd00:16::{number}",
                pod_cidr4=f"10.244.{number}.0/24",
                pod_cidr6=f"fd00:244:{number}::/64",
                gateway4=f"10.244.{number}.1",
                gateway6=f"fd00:244:{number}::1",
            )
            self._add_netns(
                node.netns,
                {
                    "net.ipv4.ip_forward": "1",
                    "net.ipv6.conf.all.forwarding": "1",
                    "net.ipv4.conf.all.rp_filter": "0",
                    "net.ipv4.conf.default.rp_filter": "0",
                },
            )
            node.cgroup.mkdir(exist_ok=True)
            port = f"n{number}"
            self._link_names.update({port, POD_BRIDGE})
            _ip_batch(
                self.underlay,
                [
                    f"link add {port} type veth peer name eth0 netns {node.netns}",
                    f"link set {port} master {UNDERLAY_BRIDGE}",
                    f"link set {port} up",
                ],
            )
            commands = [
                "link set eth0 up",
                f"addr add {node.ipv4}/24 dev eth0",
                f"addr add {node.ipv6}/64 dev eth0 nodad",
                # A fixed MAC: a bridge that picks its MAC from its ports would change it when pods come and go,
                # and every pod's neighbour entry for the gateway would go stale.
                f"link add {POD_BRIDGE} address {_mac('b', self.prefix, name)} type bridge mcast_snooping 0",
                f"addr add {node.gateway4}/24 dev {POD_BRIDGE}",
                f"addr add {node.gateway6}/64 dev {POD_BRIDGE} nodad",
                f"link set {POD_BRIDGE} up",
            ]
            for other in self._nodes.values():
                commands += _routes_to(other)
            _ip_batch(node.netns, commands)
            for other in self._nodes.values():
                _ip_batch(other.netns, _routes_to(node))
            self._nodes[name] = node
            return node

    def add_pod(
        self,
        node: Node | str,
        name: str,
        *,
        tcp_ports: Sequence[int] = (8080,),
        udp_ports: Sequence[int] = (8080,),
        stream_ports: Sequence[int] = (),
        echo: bool = True,
    ) -> Pod:
        """A pod namespace on the node's cni0 bridge, with an echo server answering as `name` unless echo=False."""
        with self._lock:
            the_node = self._node(node)
            self._check_name(name)
            number = self._next_pod_number(the_node)
            host_veth = self._host_veth_name(the_node, name)
            pod = Pod(
                name=name,
                node=the_node.name,
                netns=f"{self.prefix}-{name}",
                cgroup=the_node.cgroup / name,
                ipv4=f"10.244.{the_node.number}.{10 + number}",
                ipv6=f"fd00:244:{the_node.number}::{10 + number}",
                host_veth=host_veth,
            )
            self._add_netns(pod.netns, {})
            self._pods[name] = pod  # from here on remove_pod() can undo it
            self._pod_numbers[name] = number
            self._link_names.add(host_veth)
            try:
                self._wire_pod(the_node, pod)
                if echo:
                    self.start_echo(pod, tcp_ports=tcp_ports, udp_ports=udp_ports, stream_ports=stream_ports)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.remove_pod(name)
                raise
            return pod

    def _wire_pod(self, node: Node, pod: Pod) -> None:
        pod.cgroup.mkdir(exist_ok=True)
        _ip_batch(
            node.netns,
            [
                f"link add {pod.host_veth} address {_mac('h', self.prefix, pod.name)} type veth"
                f" peer name eth0 address {_mac('p', self.prefix, pod.name)} netns {pod.netns}",
                f"link set {pod.host_veth} master {POD_BRIDGE}",
                # hairpin: a pod whose service traffic is balanced to itself by a tc program on its own veth
                f"link set {pod.host_veth} type bridge_slave hairpin on",
                f"link set {pod.host_veth} up",
            ],
        )
        _ip_batch(
            pod.netns,
            [
                "link set eth0 up",
                f"addr add {pod.ipv4}/24 dev eth0",
                f"addr add {pod.ipv6}/64 dev eth0 nodad",
                f"route add 0.0.0.0/0 via {node.gateway4} dev eth0",
                f"route add ::/0 via {node.gateway6} dev eth0",
            ],
        )

    def add_external(self, name: str = "ext") -> External:
        """A client namespace on the underlay bridge (outside every node), like a machine in the same L2 segment."""
        with self._lock:
            self._check_name(name)
            number = max((ext.number for ext in self._externals.values()), default=0) + 1
            if number > MAX_EXTERNALS:
                raise LabError(f"at most {MAX_EXTERNALS} externals per lab")
            ext = External(
                name=name,
                number=number,
                netns=f"{self.prefix}-{name}",
                cgroup=self.cgroup / name,
                ipv4=f"172.16.0.{200 + number}",
                ipv6=f"fd00:16::{200 + number}",
            )
            self._add_netns(ext.netns, {})
            self._externals[name] = ext
            ext.cgroup.mkdir(exist_ok=True)
            port = f"x{number}"
            self._link_names.add(port)
            _ip_batch(
                self.underlay,
                [
                    f"link add {port} type veth peer name eth0 netns {ext.netns}",
                    f"link set {port} master {UNDERLAY_BRIDGE}",
                    f"link set {port} up",
                ],
            )
            _ip_batch(
                ext.netns,
                ["link set eth0 up", f"addr add {ext.ipv4}/24 dev eth0", f"addr add {ext.ipv6}/64 dev eth0 nodad"],
            )
            return ext

    def remove_pod(self, name: str) -> None:
        """Stop the pod's processes and delete its namespace (and so its veth) and its cgroup."""
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                raise LabError(f"no pod {name!r} in lab {self.prefix}")
            node = self._nodes[pod.node]
            self._terminate([t for t in self._tracked if t.owner == name])
            _cgroup_kill(pod.cgroup)
            # Delete the veth explicitly: a namespace is destroyed asynchronously, and the node must lose the
            # bridge port now, not some milliseconds later.
            _ip_batch(
                node.netns,
                [f"link del {pod.host_veth}", f"neigh flush to {pod.ipv4}", f"neigh flush to {pod.ipv6}"],
                force=True,
            )
            _delete_netns([pod.netns])
            _cgroup_remove(pod.cgroup)
            del self._pods[name]
            self._pod_numbers.pop(name, None)

    # ---- processes

    def spawn(self, where: Where, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv in the namespace and cgroup of a node, pod or external; close() kills it (process group).

        The process gets its own session (so its whole process group can be signalled); stdin defaults to
        /dev/null. Other keyword arguments go to subprocess.Popen.
        """
        return self._spawn(where, argv, internal=False, **popen_kwargs)

    def run(
        self,
        where: Where,
        argv: Sequence[str | os.PathLike[str]],
        timeout: float = 30,
        check: bool = True,
        *,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion in a node, pod or external; text mode, output captured."""
        proc = self.spawn(
            where,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        args = [os.fspath(arg) for arg in argv]
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(args, timeout, out, err) from None
        finally:
            self._untrack(proc)
        if check and proc.returncode != 0:
            raise RunError(proc.returncode, args, out, err)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def start_echo(
        self,
        where: Where,
        name: str | None = None,
        *,
        tcp_ports: Sequence[int] = (8080,),
        udp_ports: Sequence[int] = (8080,),
        stream_ports: Sequence[int] = (),
        timeout: float = 10.0,
    ) -> subprocess.Popen[Any]:
        """Start kpr.lab.echo in a node, pod or external and return once it listens on every port."""
        owner = self._locate(where)[2]
        name = name or owner
        argv: list[str] = [sys.executable, "-I", "-S", str(ECHO_PATH), "--name", name]
        for port in tcp_ports:
            argv += ["--tcp", str(port)]
        for port in udp_ports:
            argv += ["--udp", str(port)]
        for port in stream_ports:
            argv += ["--stream", str(port)]
        log_path = self.run_dir / f"echo-{owner}-{name}.log"
        with open(log_path, "ab") as log:
            proc = self._spawn(where, argv, internal=True, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        seen = b""
        deadline = time.monotonic() + timeout
        while b"ready\n" not in seen:
            remaining = deadline - time.monotonic()
            readable = select.select([fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not readable:
                _killpg(proc, signal.SIGKILL)
                raise LabError(f"echo server in {owner} not ready after {timeout}s: {_tail(log_path)}")
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait()
                raise LabError(f"echo server in {owner} exited with {proc.returncode}: {_tail(log_path)}")
            seen += chunk
        return proc

    def client(
        self,
        where: Where,
        proto: str,
        host: str,
        port: int,
        *,
        count: int | None = None,
        duration: float | None = None,
        interval: float | None = None,
        timeout: float | None = None,
        connected: bool = False,
        sequence: bool = False,
    ) -> dict[str, Any]:
        """Run kpr.lab.client in a node, pod or external and return its JSON summary."""
        argv: list[str] = [sys.executable, "-I", "-S", str(CLIENT_PATH), proto, host, str(port)]
        if count is not None:
            argv += ["--count", str(count)]
        if duration is not None:
            argv += ["--duration", str(duration)]
        if interval is not None:
            argv += ["--interval", str(interval)]
        if timeout is not None:
            argv += ["--timeout", str(timeout)]
        if connected:
            argv.append("--connected")
        if sequence:
            argv.append("--sequence")
        per_attempt = (timeout if timeout is not None else 2.0) * 2 + (interval or 0.0)
        budget = duration + per_attempt if duration is not None else (count or 1) * per_attempt
        result: dict[str, Any] = json.loads(self.run(where, argv, timeout=budget + 30).stdout)
        return result

    # ---- isolation

    def assert_host_isolated(self) -> None:
        """Fail if the root namespace gained a route or address for a cluster range, or a lab interface."""
        problems = host_violations(self._before, host_snapshot(), self.prefix, self._link_names)
        if problems:
            raise AssertionError(f"lab {self.prefix} leaked into the root network namespace: " + "; ".join(problems))

    # ---- teardown

    def close(self) -> None:
        """Kill every process, delete every namespace, cgroup, bpffs dir and the runtime dir. Idempotent."""
        with self._lock:
            self._closed = True
            _OPEN_LABS.discard(self)
            if not self._owned:
                return
            errors: list[str] = []
            try:
                self._terminate(list(self._tracked))
            except Exception as exc:
                errors.append(f"processes: {exc}")
            for node in self._nodes.values():  # also those whose name differs from the prefix glob (none today)
                try:
                    _remove_bpffs_dir(node.bpffs_dir)
                except Exception as exc:
                    errors.append(f"bpffs: {exc}")
            errors += _remove_remains(self.prefix, self.cgroup_root)
            if errors:
                raise LabError(f"lab {self.prefix} could not be removed completely: " + "; ".join(errors))

    # ---- internals

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception as exc:
            warnings.warn(f"lab teardown failed: {exc}", RuntimeWarning, stacklevel=3)

    def _claim(self) -> None:
        """Take the prefix: atomically rename a private directory holding the owner file to /run/kpr-lab/<prefix>."""
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        if any(name.startswith(self.prefix + "-") for name in _netns_names()):
            raise LabError(f"network namespaces named {self.prefix}-* already exist: prefix in use")
        staging = RUN_ROOT / f".{self.prefix}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / "owner").write_text(f"{os.getpid()}\n{_proc_start_time(os.getpid()) or ''}\n")
        try:
            if self.run_dir.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(self.run_dir))
            os.rename(staging, self.run_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise LabError(f"lab prefix {self.prefix} is in use ({self.run_dir} exists)") from exc
        self._owned = True

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")
        if not _NAME_RE.match(name) or name == UNDERLAY:
            raise LabError(f"bad name {name!r}: lowercase letters, digits and inner dashes, not {UNDERLAY!r}")
        if name in self._nodes or name in self._pods or name in self._externals:
            raise LabError(f"{name!r} already exists in lab {self.prefix}")

    def _add_netns(self, netns: str, sysctls: Mapping[str, str]) -> None:
        if (NETNS_DIR / netns).exists():
            raise LabError(f"network namespace {netns} already exists")
        _sh(["ip", "netns", "add", netns])
        try:
            # No duplicate address detection anywhere, link-local addresses included: nothing waits for DAD.
            settings = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0", **sysctls}
            _sysctl(netns, settings)
            _ip_batch(netns, ["link set lo up"])
        except BaseException:
            with contextlib.suppress(Exception):
                _delete_netns([netns])
            raise

    def _node(self, node: Node | str) -> Node:
        name = node.name if isinstance(node, Node) else node
        try:
            return self._nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.prefix}") from None

    def _next_pod_number(self, node: Node) -> int:
        # Hand out fresh numbers first: a reused address would meet stale neighbour entries in other pods.
        last = self._pod_counter.get(node.name, 0)
        if last < MAX_PODS_PER_NODE:
            self._pod_counter[node.name] = last + 1
            return last + 1
        used = {self._pod_numbers[p.name] for p in self._pods.values() if p.node == node.name}
        for number in range(1, MAX_PODS_PER_NODE + 1):
            if number not in used:
                return number
        raise LabError(f"node {node.name} has no free pod address")

    def _host_veth_name(self, node: Node, pod: str) -> str:
        taken = {p.host_veth for p in self._pods.values() if p.node == node.name}
        candidate = f"veth-{pod}"
        if len(candidate) > _IFNAMSIZ:
            candidate = "veth" + hashlib.sha1(pod.encode()).hexdigest()[:11]
        base, n = candidate, 1
        while candidate in taken:
            suffix = str(n)
            candidate = base[: _IFNAMSIZ - len(suffix)] + suffix
            n += 1
        return candidate

    def _locate(self, where: Where) -> tuple[str, Path, str]:
        """(netns, cgroup, owner name) of a node, pod or external (or its name)."""
        name = where if isinstance(where, str) else where.name
        for table in (self._pods, self._nodes, self._externals):
            thing = table.get(name)
            if thing is not None:
                return thing.netns, thing.cgroup, thing.name
        raise LabError(f"nothing called {name!r} in lab {self.prefix}")

    def _spawn(
        self, where: Where, argv: Sequence[str | os.PathLike[str]], *, internal: bool, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        with self._lock:
            if self._closed:
                raise LabError(f"lab {self.prefix} is closed")
            netns, cgroup, owner = self._locate(where)
            for key in ("start_new_session", "process_group", "preexec_fn"):
                if key in popen_kwargs:
                    raise TypeError(f"Lab.spawn() sets {key} itself")
            popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
            # Join the cgroup first, then exec: the program's first instruction already runs under the node's
            # cgroup programs. nsenter (no --fork) and sh both exec, so proc.pid is the program's pid.
            script = f'echo $$ > {shlex.quote(str(cgroup / "cgroup.procs"))} && exec "$@"'
            cmd = ["nsenter", f"--net={NETNS_DIR / netns}", "--", "sh", "-c", script, "sh"]
            cmd += [os.fspath(arg) for arg in argv]
            proc: subprocess.Popen[Any] = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
            self._tracked.append(_Tracked(proc, owner, internal))
            return proc

    def _untrack(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._tracked = [t for t in self._tracked if t.proc is not proc]

    def _terminate(self, tracked: list[_Tracked], grace: float = 2.0) -> None:
        """SIGTERM each process group, SIGKILL what is left after `grace` seconds, reap everything."""
        for t in tracked:
            _killpg(t.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for t in tracked:
            with contextlib.suppress(subprocess.TimeoutExpired):
                t.proc.wait(max(0.0, deadline - time.monotonic()))
        for t in tracked:
            _killpg(t.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                t.proc.wait(5)
            if t.internal:
                for stream in (t.proc.stdin, t.proc.stdout, t.proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
        done = {id(t.proc) for t in tracked if t.proc.poll() is not None}
        self._tracked = [t for t in self._tracked if id(t.proc) not in done]


def _killpg(proc: subprocess.Popen[Any], sig: int) -> None:
    # Only while the leader is unreaped is its pid (= the group id) certainly ours; stragglers of a group whose
    # leader is gone are left to the cgroup kill.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _routes_to(node: Node) -> list[str]:
    return [f"route add {node.pod_cidr4} via {node.ipv4}", f"route add {node.pod_cidr6} via {node.ipv6}"]


def _mac(kind: str, prefix: str, name: str) -> str:
    """A stable, locally administered unicast MAC address for a lab interface."""
    digest = hashlib.sha1(f"{kind}/{prefix}/{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no log)"


def assert_host_isolated(lab: Lab) -> None:
    """Module-level spelling of Lab.assert_host_isolated()."""
    lab.assert_host_isolated()
