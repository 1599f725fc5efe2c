"""Namespace and veth plumbing: the `ip` and `sysctl` commands that make what kpr/lab/layout.py describes.

Nothing is ever created in the root network namespace: veth pairs are made inside one lab namespace with the peer
placed directly into another (`ip -n A link add … peer name … netns B`). Several commands for one namespace go to a
single `ip -n NS -batch -` process.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kpr.lab.errors import LabError
from kpr.lab.layout import POD_BRIDGE, UNDERLAY_BRIDGE, External, Node, Pod, mac, underlay_port

NETNS_DIR = Path("/run/netns")

NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


def sh(
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


def ip_batch(netns: str, commands: Iterable[str], *, force: bool = False) -> subprocess.CompletedProcess[str]:
    """Run several `ip` commands inside one namespace with a single process (`ip -n NS -batch -`)."""
    argv = ["ip", "-n", netns, *(["-force"] if force else []), "-batch", "-"]
    return sh(argv, input="\n".join(commands) + "\n", check=not force)


def _ip_batch_root(commands: Iterable[str]) -> None:
    # `netns add/del` are about the bind mounts in /run/netns, not about the caller's namespace.
    sh(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n", check=False)


def _sysctl(netns: str, settings: Mapping[str, str]) -> None:
    args = [f"{key}={value}" for key, value in settings.items()]
    sh(["nsenter", f"--net={NETNS_DIR / netns}", "--", "sysctl", "-q", "-w", *args])


# --------------------------------------------------------------------------------------------------------------------
# namespaces


def netns_names() -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add_netns(netns: str, sysctls: Mapping[str, str]) -> None:
    """A new named network namespace with its loopback up, no duplicate address detection, and `sysctls` set."""
    if (NETNS_DIR / netns).exists():
        raise LabError(f"network namespace {netns} already exists")
    sh(["ip", "netns", "add", netns])
    try:
        # No duplicate address detection anywhere, link-local addresses included: nothing waits for DAD.
        settings = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0", **sysctls}
        _sysctl(netns, settings)
        ip_batch(netns, ["link set lo up"])
    except BaseException:
        with contextlib.suppress(Exception):
            delete_netns([netns])
        raise


def delete_netns(names: Iterable[str]) -> None:
    names = [name for name in names if (NETNS_DIR / name).exists()]
    if not names:
        return
    _ip_batch_root([f"netns del {name}" for name in names])
    left = [name for name in names if (NETNS_DIR / name).exists()]
    if left:
        raise LabError(f"cannot delete network namespaces {left}")


# --------------------------------------------------------------------------------------------------------------------
# wiring: the underlay bridge, nodes, pods and externals


def make_underlay(underlay: str) -> None:
    """The L2 bridge between nodes and externals, inside the underlay namespace."""
    ip_batch(underlay, [f"link add {UNDERLAY_BRIDGE} type bridge mcast_snooping 0", f"link set {UNDERLAY_BRIDGE} up"])


def _attach_to_underlay(underlay: str, thing: Node | External) -> None:
    """A veth from a port of the underlay bridge to eth0 in the node's or external's namespace."""
    port = underlay_port(thing)
    ip_batch(
        underlay,
        [
            f"link add {port} type veth peer name eth0 netns {thing.netns}",
            f"link set {port} master {UNDERLAY_BRIDGE}",
            f"link set {port} up",
        ],
    )


def _routes_to(node: Node) -> list[str]:
    return [f"route add {node.pod_cidr4} via {node.ipv4}", f"route add {node.pod_cidr6} via {node.ipv6}"]


def wire_node(underlay: str, prefix: str, node: Node, others: Iterable[Node]) -> None:
    """The node on the underlay, its pod bridge, and routes between its pod CIDRs and those of the `others`."""
    others = list(others)
    _attach_to_underlay(underlay, node)
    commands = [
        "link set eth0 up",
        f"addr add {node.ipv4}/24 dev eth0",
        f"addr add {node.ipv6}/64 dev eth0 nodad",
        # A fixed MAC: a bridge that picks its MAC from its ports would change it when pods come and go,
        # and every pod's neighbour entry for the gateway would go stale.
        f"link add {POD_BRIDGE} address {mac('b', prefix, node.name)} type bridge mcast_snooping 0",
        f"addr add {node.gateway4}/24 dev {POD_BRIDGE}",
        f"addr add {node.gateway6}/64 dev {POD_BRIDGE} nodad",
        f"link set {POD_BRIDGE} up",
    ]
    for other in others:
        commands += _routes_to(other)
    ip_batch(node.netns, commands)
    for other in others:
        ip_batch(other.netns, _routes_to(node))


def wire_pod(prefix: str, node: Node, pod: Pod) -> None:
    """The pod's veth, a hairpin port of the node's cni0, its addresses and default routes via cni0."""
    ip_batch(
        node.netns,
        [
            f"link add {pod.host_veth} address {mac('h', prefix, pod.name)} type veth"
            f" peer name eth0 address {mac('p', prefix, pod.name)} netns {pod.netns}",
            f"link set {pod.host_veth} master {POD_BRIDGE}",
            # hairpin: a pod whose service traffic is balanced to itself by a tc program on its own veth
            f"link set {pod.host_veth} type bridge_slave hairpin on",
            f"link set {pod.host_veth} up",
        ],
    )
    ip_batch(
        pod.netns,
        [
            "link set eth0 up",
            f"addr add {pod.ipv4}/24 dev eth0",
            f"addr add {pod.ipv6}/64 dev eth0 nodad",
            f"route add 0.0.0.0/0 via {node.gateway4} dev eth0",
            f"route add ::/0 via {node.gateway6} dev eth0",
        ],
    )


def unwire_pod(node: Node, pod: Pod) -> None:
    """Take the pod's veth off the node's bridge now and forget its neighbour entries (best effort)."""
    # Delete the veth explicitly: a namespace is destroyed asynchronously, and the node must lose the
    # bridge port now, not some milliseconds later.
    ip_batch(
        node.netns,
        [f"link del {pod.host_veth}", f"neigh flush to {pod.ipv4}", f"neigh flush to {pod.ipv6}"],
        force=True,
    )


def wire_external(underlay: str, ext: External) -> None:
    """The external on the underlay bridge with its addresses, and no route to any pod."""
    _attach_to_underlay(underlay, ext)
    ip_batch(
        ext.netns,
        ["link set eth0 up", f"addr add {ext.ipv4}/24 dev eth0", f"addr add {ext.ipv6}/64 dev eth0 nodad"],
    )
