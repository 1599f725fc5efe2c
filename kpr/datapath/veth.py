"""CNI chaining: kpr's per-packet programs on a pod's host-side veth, attached from pins (no compiler needed).

The agent (with --socket-lb=hostns-only or off) pins the programs in its bpffs directory; kpr-cni calls attach() at
pod ADD, check() at CHECK and detach() at DEL. Attaching uses replace, so a repeated ADD is harmless.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kpr.datapath import bpfsys
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
