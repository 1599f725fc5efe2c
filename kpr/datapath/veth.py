"""CNI chaining: kpr's per-packet programs on a pod's host-side veth, attached from pins (no compiler needed).

The agent (with --socket-lb=hostns-only or off) pins the programs in its bpffs directory; kpr-cni calls attach() at
pod ADD, check() at CHECK and detach() at DEL. Attaching uses replace, so a repeated ADD is harmless.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kpr.datapath import bpfsys
from kpr.datapath.loader import POD_PROGRAMS, PROGRAM_PREFIX, TC_EGRESS, TC_FILTERS, TC_INGRESS, DatapathError

POD_FILTERS = {hook_proto: pin for hook_proto, (pin, _) in POD_PROGRAMS.items()}


def _index(ipr: object, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)  # type: ignore[attr-defined]
    return found[0] if found else None


def attach(ifname: str, bpffs_dir: Path) -> list[str]:
    """Attach the pinned pod programs to `ifname` (ingress: from the pod; egress: to it). Returns "hook program"."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    fds: dict[str, int] = {}
    try:
        for pin in POD_FILTERS.values():
            path = bpffs_dir / pin
            try:
                fds[pin] = bpfsys.obj_get(str(path))
            except OSError as e:
                raise DatapathError(
                    f"{path}: {os.strerror(e.errno or errno.ENOENT)}; is the kpr agent running on this node with "
                    "--socket-lb=hostns-only (and this --bpffs-dir)?"
                ) from e
        attached = []
        with IPRoute() as ipr:
            index = _index(ipr, ifname)
            if index is None:
                raise DatapathError(f"host-side interface {ifname!r} does not exist")
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            for (hook, protocol), pin in POD_FILTERS.items():
                _, prio = TC_FILTERS[(hook, protocol)]
                name = POD_PROGRAMS[(hook, protocol)][1].replace("kpr_tc_out", "kpr_pod_out")
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    index,
                    handle=1,
                    fd=fds[pin],
                    name=name,
                    parent=TC_INGRESS if hook == "ingress" else TC_EGRESS,
                    protocol=protocol,
                    prio=prio,
                    classid=1,
                    direct_action=True,
                )
                attached.append(f"{hook} {name}")
        return attached
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
    wanted = {
        f"{hook} {POD_PROGRAMS[(hook, proto)][1].replace('kpr_tc_out', 'kpr_pod_out')}" for hook, proto in POD_FILTERS
    }
    return sorted(wanted - present)


def detach(ifname: str) -> list[str]:
    """Remove kpr's programs from `ifname`; nothing to do (not an error) when the interface is already gone."""
    from kpr.datapath.loader import detach_tc

    return detach_tc([ifname])
