"""CNI chaining: kpr's per-packet programs on a pod's host-side veth, attached from pins (no compiler needed).

The agent (with --socket-lb=hostns-only or off) pins the programs in its bpffs directory; kpr-cni calls attach() at
pod ADD, check() at CHECK and detach() at DEL. Attaching uses replace, so a repeated ADD is harmless.
pod_end() and host_end() read the two ends of a pod's veth over netlink, for kpr-cni to find and check the host side.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.datapath import bpfsys, netns
from kpr.datapath.loader import POD_PROGRAMS, PROGRAM_PREFIX, TC_EGRESS, TC_INGRESS, DatapathError, attach_filters

POD_PINS = {hook_proto: pin for hook_proto, (pin, _, _) in POD_PROGRAMS.items()}
POD_FILTER_NAMES = {hook_proto: name for hook_proto, (_, _, name) in POD_PROGRAMS.items()}


def _index(ipr: object, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)  # type: ignore[attr-defined]
    return found[0] if found else None


def attach(ifname: str, bpffs_dir: Path) -> list[str]:
    """Attach the pinned pod programs to `ifname` (ingress: from the pod; egress: to it). Returns "hook program"."""
    from pyroute2 import IPRoute

    fds: dict[tuple[str, int], int] = {}
    try:
        for hook_proto, pin in POD_PINS.items():
            path = bpffs_dir / pin
            try:
                fds[hook_proto] = bpfsys.obj_get(str(path))
            except OSError as e:
                raise DatapathError(
                    f"{path}: {os.strerror(e.errno or errno.ENOENT)}; is the kpr agent running on this node with "
                    "--socket-lb=hostns-only (and this --bpffs-dir)?"
                ) from e
        with IPRoute() as ipr:
            index = _index(ipr, ifname)
            if index is None:
                raise DatapathError(f"host-side interface {ifname!r} does not exist")
            programs = {hook_proto: (fd, POD_FILTER_NAMES[hook_proto]) for hook_proto, fd in fds.items()}
            return [f"{hook} {name}" for hook, name in attach_filters(ipr, index, programs)]
    finally:
        for fd in fds.values():
            os.close(fd)


def attached(ifname: str) -> list[str]:
    """The kpr programs attached to `ifname` ("hook program"); [] when it has none or does not exist."""
    from pyroute2 import IPRoute

    found = []
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            return []
        for parent, hook in ((TC_INGRESS, "ingress"), (TC_EGRESS, "egress")):
            for msg in ipr.get_filters(index=index, parent=parent):
                options = msg.get_attr("TCA_OPTIONS")
                name = options.get_attr("TCA_BPF_NAME") if options else None
                if name and name.startswith(PROGRAM_PREFIX):
                    found.append(f"{hook} {name}")
    return found


def check(ifname: str) -> list[str]:
    """What is missing on `ifname` for a chained pod ([] when everything is attached)."""
    present = set(attached(ifname))
    return sorted({f"{hook} {name}" for (hook, _), name in POD_FILTER_NAMES.items()} - present)


def detach(ifname: str) -> list[str]:
    """Remove kpr's programs from `ifname`; nothing to do (not an error) when the interface is already gone."""
    from kpr.datapath.loader import detach_tc

    return detach_tc([ifname])


# ---- the two ends of a pod's veth (what kpr-cni checks before attaching) ----


@dataclass(frozen=True, slots=True)
class PodEnd:
    """A pod's interface, as the pod's network namespace sees it."""

    index: int
    kind: str | None  # IFLA_INFO_KIND ("veth" ...)
    peer_index: int | None  # IFLA_LINK: the peer's ifindex, in the peer's namespace
    peer_nsid: int | None  # IFLA_LINK_NETNSID: the peer's namespace, as the pod's namespace numbers it
    our_nsid: int | None  # the caller's namespace, as the pod's namespace numbers it


@dataclass(frozen=True, slots=True)
class HostEnd:
    """A link of the caller's namespace, as that namespace sees it."""

    name: str
    kind: str | None
    peer_index: int | None  # IFLA_LINK
    peer_nsid: int | None  # IFLA_LINK_NETNSID
    pod_nsid: int | None  # the pod's namespace, as the caller's namespace numbers it


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _nsid(ipr: Any, fd: int) -> int | None:
    """The id this namespace gives the namespace `fd` (None when it has none)."""
    found = ipr.get_netnsid(fd=fd)
    nsid = found.get("nsid") if found else None
    return nsid if isinstance(nsid, int) and nsid >= 0 else None


def _link(ipr: Any, **match: Any) -> Any | None:
    """The link matching `match` (ifname= or index=), or None when there is none (ENODEV)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", **match)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def pod_end(ns_fd: int, ifname: str) -> PodEnd | None:
    """`ifname` in the network namespace `ns_fd` (entered from a short-lived thread), or None when it does not exist.
    OSError EINVAL: `ns_fd` is not a network namespace (any more)."""
    from pyroute2 import IPRoute

    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:

        def inside() -> PodEnd | None:
            with IPRoute() as ipr:
                link = _link(ipr, ifname=ifname)
                if link is None:
                    return None
                return PodEnd(
                    index=link["index"],
                    kind=_kind(link),
                    peer_index=link.get_attr("IFLA_LINK"),
                    peer_nsid=link.get_attr("IFLA_LINK_NETNSID"),
                    our_nsid=_nsid(ipr, host_fd),
                )

        return netns.run_in(ns_fd, inside, name="kpr-cni-netns")
    finally:
        os.close(host_fd)


def host_end(index: int, pod_ns_fd: int) -> HostEnd | None:
    """The link with ifindex `index` in the caller's namespace, or None when there is none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = _link(ipr, index=index)
        if link is None:
            return None
        return HostEnd(
            name=str(link.get_attr("IFLA_IFNAME")),
            kind=_kind(link),
            peer_index=link.get_attr("IFLA_LINK"),
            peer_nsid=link.get_attr("IFLA_LINK_NETNSID"),
            pod_nsid=_nsid(ipr, pod_ns_fd),
        )
