"""Names and addresses of the lab: what each node, pod and external client is called and where it sits.

Layout (N: node number 1, 2, …; k: pod number within its node, 1, 2, …; prefix e.g. "kpr3fa9c"):

    <prefix>-ul      underlay: bridge br0 (L2 between nodes and externals), ports n<N> and x<k>
    <prefix>-<node>  node N: eth0 172.16.0.N/24 fd00:16::N/64 on the underlay; bridge cni0 10.244.N.1/24
                     fd00:244:N::1/64 for its pods; forwarding on; routes to every other node's pod CIDRs
    <prefix>-<pod>   pod: eth0 10.244.N.(10+k)/24 fd00:244:N::(10+k)/64, default routes via cni0
    <prefix>-<ext>   external client: eth0 172.16.0.(200+k)/24 fd00:16::(200+k)/64 on the underlay

Cgroups (cgroup v2): <mount>/<prefix>/<node>/<pod> and <mount>/<prefix>/<ext>; a node's agent attaches its socket
programs to <mount>/<prefix>/<node> and so sees exactly that node's processes. bpffs: /sys/fs/bpf/<prefix>-<node>
(made by the agent, removed by the lab).

Prefixes are a lowercase letter followed by lowercase letters and digits, never a dash: everything a lab makes is
named "<prefix>-…", so the prefix of any lab object is the text before its first dash and one lab's cleanup can never
match another's.

Nothing here touches the system: kpr/lab/plumbing.py makes what these describe.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kpr.lab.errors import LabError

BPFFS_ROOT = Path("/sys/fs/bpf")

UNDERLAY = "ul"  # the underlay namespace is <prefix>-ul
UNDERLAY_BRIDGE = "br0"
POD_BRIDGE = "cni0"
MAX_NODES = 199  # 172.16.0.N; externals start at .201
MAX_PODS_PER_NODE = 244  # 10.244.N.(10+k) <= .254
MAX_EXTERNALS = 54  # 172.16.0.(200+k) <= .254
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:244::/32")  # every node's pod CIDR: what --cluster-cidr is in the lab

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_IFNAMSIZ = 15


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


def lab_prefix(prefix: str | None) -> str:
    """The given prefix once checked, or a fresh random one."""
    prefix = prefix if prefix is not None else "kpr" + secrets.token_hex(3)[:5]
    if not PREFIX_RE.match(prefix):
        raise LabError(f"bad lab prefix {prefix!r}: a lowercase letter, then 1-15 letters or digits")
    return prefix


def check_name(name: str) -> None:
    """Raise LabError unless `name` can name a node, pod or external."""
    if not _NAME_RE.match(name) or name == UNDERLAY:
        raise LabError(f"bad name {name!r}: lowercase letters, digits and inner dashes, not {UNDERLAY!r}")


def node_at(prefix: str, lab_cgroup: Path, name: str, number: int) -> Node:
    return Node(
        name=name,
        number=number,
        netns=f"{prefix}-{name}",
        cgroup=lab_cgroup / name,
        bpffs_dir=BPFFS_ROOT / f"{prefix}-{name}",
        ipv4=f"172.16.0.{number}",
        ipv6=f"fd00:16::{number}",
        pod_cidr4=f"10.244.{number}.0/24",
        pod_cidr6=f"fd00:244:{number}::/64",
        gateway4=f"10.244.{number}.1",
        gateway6=f"fd00:244:{number}::1",
    )


def pod_at(prefix: str, node: Node, name: str, number: int, host_veth: str) -> Pod:
    return Pod(
        name=name,
        node=node.name,
        netns=f"{prefix}-{name}",
        cgroup=node.cgroup / name,
        ipv4=f"10.244.{node.number}.{10 + number}",
        ipv6=f"fd00:244:{node.number}::{10 + number}",
        host_veth=host_veth,
    )


def external_at(prefix: str, lab_cgroup: Path, name: str, number: int) -> External:
    return External(
        name=name,
        number=number,
        netns=f"{prefix}-{name}",
        cgroup=lab_cgroup / name,
        ipv4=f"172.16.0.{200 + number}",
        ipv6=f"fd00:16::{200 + number}",
    )


def underlay_port(thing: Node | External) -> str:
    """The name of its veth's end on the underlay bridge: n<N> for a node, x<k> for an external."""
    return f"{'n' if isinstance(thing, Node) else 'x'}{thing.number}"


def host_veth_name(pod: str, taken: Iterable[str]) -> str:
    """The node-side veth name of a pod: veth-<pod> when it fits IFNAMSIZ, else a hash; never one in `taken`."""
    taken = set(taken)
    candidate = f"veth-{pod}"
    if len(candidate) > _IFNAMSIZ:
        candidate = "veth" + hashlib.sha1(pod.encode()).hexdigest()[:11]
    base, n = candidate, 1
    while candidate in taken:
        suffix = str(n)
        candidate = base[: _IFNAMSIZ - len(suffix)] + suffix
        n += 1
    return candidate


def mac(kind: str, prefix: str, name: str) -> str:
    """A stable, locally administered unicast MAC address for a lab interface."""
    digest = hashlib.sha1(f"{kind}/{prefix}/{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))
