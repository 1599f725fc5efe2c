"""The node's bpffs and cgroup2 mounts, made when the node has not made them (the DaemonSet's init containers).

kpr pins its maps in a bpffs and attaches its socket programs to the root of the cgroup v2 hierarchy. systemd mounts
both on most nodes; where it has not, `kpr node mount-bpffs` and `kpr node mount-cgroup` do, as Cilium's
`mount-bpf-fs` and `mount-cgroup` init containers do. They run in a privileged container and act in the node's own
mount (and cgroup) namespace, entered from the host's /proc (setns(2) from this process, so the node needs no
`mount` or `nsenter` binary; Cilium copies a static binary onto the node for the same reason). The decisions are
pure functions of the node's mount table (bpffs_plan, cgroup2_plan), table-tested in tests/unit/test_hostmounts.py.

cgroup2 at a fixed path (default /run/kpr/cgroupv2), which the agent's pod mounts whatever the node's layout:
- a path that already holds the root of the cgroup2 hierarchy (a previous start) is kept;
- a node that mounts cgroup2 somewhere (/sys/fs/cgroup on unified nodes, /sys/fs/cgroup/unified on hybrid ones) gets
  a bind mount of it. Not a new cgroup2 mount: the kernel applies a cgroup2 mount's options (nsdelegate,
  memory_recursiveprot, ...) to the one hierarchy, so a new mount without systemd's options would silently turn them
  off for the whole node (systemd, runc and lxcfs have all been bitten by this);
- a cgroup v1-only node gets a new cgroup2 mount, in the node's cgroup namespace. Every process of such a node is
  in the v2 hierarchy's root, so programs attached there see every socket, as on any other node; the v1 controllers
  are untouched.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kpr.datapath import statfs
from kpr.datapath.statfs import BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC

CGROUP_SUPER_MAGIC = 0x27E0EB  # cgroup v1
TMPFS_MAGIC = 0x01021994  # /sys/fs/cgroup on v1 and hybrid nodes
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RELATIME, MS_BIND = 0x2, 0x4, 0x8, 0x200000, 0x1000
MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME  # what systemd uses for bpffs and cgroup2


class NodeMountError(RuntimeError):
    """The node's mounts cannot be made right; the message says what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/PID/mountinfo (proc(5)): the fields kpr decides on."""

    mount_id: int
    parent_id: int
    root: str  # the directory of the file system that is mounted here ("/" unless a bind of a subtree)
    mount_point: str
    fstype: str
    source: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do at a path: "keep" what is there, "bind" `source` onto it, or "mount" a new file system."""

    action: str
    target: str
    source: str = ""
    reason: str = ""


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a /proc/PID/mountinfo, in its order (a mount comes after the one it is mounted on)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3:
            continue
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
            )
        )
    return mounts


def mounted_at(mounts: Iterable[Mount], path: str) -> Mount | None:
    """The mount visible at exactly `path` (the last one mounted there), or None."""
    found = None
    for mount in mounts:
        if mount.mount_point == path.rstrip("/") or (path == "/" and mount.mount_point == "/"):
            found = mount
    return found


def bpffs_plan(mounts: Iterable[Mount], target: str) -> Plan:
    """Keep a bpffs at `target`, else mount one there (over whatever else is mounted)."""
    here = mounted_at(mounts, target)
    if here is not None and here.fstype == "bpf":
        return Plan("keep", target, reason=f"{target} is a bpf file system")
    what = f"a {here.fstype} mount" if here is not None else "no mount of its own"
    return Plan("mount", target, reason=f"{target} has {what}, not a bpf file system")


def cgroup2_plan(mounts: Iterable[Mount], target: str) -> Plan:
    """Make `target` the root of the node's cgroup2 hierarchy: keep, bind the node's own mount, or mount one."""
    mounts = list(mounts)
    here = mounted_at(mounts, target)
    if here is not None and here.fstype == "cgroup2":
        if here.root != "/":
            raise NodeMountError(
                f"{target} holds the cgroup2 subtree {here.root}, not the hierarchy's root: kpr's socket programs "
                f"would see only that part of the node. Unmount it (umount {target}) and start the pod again"
            )
        return Plan("keep", target, reason=f"{target} is the root of the cgroup2 hierarchy")
    if here is not None:
        raise NodeMountError(
            f"{target} has a {here.fstype} file system mounted; kpr expects the cgroup2 hierarchy there or nothing. "
            f"Unmount it, or give the DaemonSet another path"
        )
    roots = [m for m in mounts if m.fstype == "cgroup2" and m.root == "/" and m.mount_point != target]
    if roots:
        source = roots[0].mount_point
        v1 = any(m.fstype == "cgroup" for m in mounts)
        layout = "a hybrid (v1 and v2) node" if v1 else "a cgroup v2 node"
        return Plan("bind", target, source, reason=f"{layout}: cgroup2 is mounted at {source}")
    return Plan(
        "mount",
        target,
        reason="a cgroup v1-only node (no cgroup2 mount): every process is in the root of the unmounted v2 "
        "hierarchy, which kpr's programs attach to",
    )


def cgroup2_problem(path: Path) -> str | None:
    """Why `path` cannot be kpr's --cgroup-root (not cgroup v2) and what to do on this kind of node; None if it can."""
    try:
        magic = statfs.fs_type(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if magic == CGROUP2_SUPER_MAGIC:
        return None
    hint = (
        "pass the node's cgroup2 mount (or a directory in it) as --cgroup-root: /sys/fs/cgroup/unified on a hybrid "
        "(v1 and v2) node; on a cgroup v1-only node mount one first (mkdir -p /run/kpr/cgroupv2 && "
        "mount -t cgroup2 none /run/kpr/cgroupv2; the DaemonSet's mount-cgroup init container does this: "
        "kpr node mount-cgroup)"
    )
    if magic in (CGROUP_SUPER_MAGIC, TMPFS_MAGIC):
        return f"{path} is part of a cgroup v1 layout, not cgroup v2: {hint}"
    return f"{path} is not a cgroup v2 directory: {hint}"


# ---- acting in the node's namespaces ----


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_host(proc: Path, pid: int, cgroup: bool = False) -> None:
    """Move this process into the mount namespace (and with `cgroup`, the cgroup namespace) of `pid` as seen in the
    procfs at `proc` (the host's /proc mounted at /hostproc in the init container). From then on paths are the
    node's. The process must be single-threaded (the kernel refuses a shared fs_struct)."""
    kinds = [("cgroup", CLONE_NEWCGROUP)] if cgroup else []
    kinds.append(("mnt", CLONE_NEWNS))  # last: the host's /proc path is gone once the mount namespace changed
    fds = []
    try:
        for name, _ in kinds:
            path = proc / str(pid) / "ns" / name
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                raise NodeMountError(
                    f"cannot open {path}: {e.strerror}; the init container needs the host's /proc at {proc} "
                    "and privileges (privileged: true)"
                ) from None
        for fd, (name, kind) in zip(fds, kinds, strict=True):
            if _libc().setns(fd, kind) != 0:
                err = ctypes.get_errno()
                raise NodeMountError(f"setns into the {name} namespace of pid {pid}: {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)
    os.chdir("/")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2)."""
    ret = _libc().mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    if ret != 0:
        err = ctypes.get_errno()
        what = f"mount -t {fstype}" if fstype else "mount --bind"
        raise NodeMountError(f"{what} {source} {target}: {os.strerror(err)}")


def own_mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def ensure_bpffs(target: str) -> Plan:
    """Mount a bpffs at `target` in the current mount namespace unless one is there; the plan carried out."""
    plan = bpffs_plan(own_mounts(), target)
    if plan.action == "mount":
        Path(target).mkdir(parents=True, exist_ok=True)
        mount("bpf", target, "bpf", MOUNT_FLAGS, "mode=0700")
        if statfs.fs_type(target) != BPF_FS_MAGIC:
            raise NodeMountError(f"mounted a bpf file system at {target}, but it is still not one there")
    return plan


def ensure_cgroup2(target: str) -> Plan:
    """Make `target` the root of the cgroup2 hierarchy in the current mount namespace; the plan carried out."""
    plan = cgroup2_plan(own_mounts(), target)
    if plan.action == "keep":
        return plan
    Path(target).mkdir(parents=True, exist_ok=True)
    if plan.action == "bind":
        mount(plan.source, target, None, MS_BIND)
    else:
        if "cgroup2" not in Path("/proc/filesystems").read_text().split():
            raise NodeMountError("this kernel has no cgroup2 file system (Linux >= 4.5 has it); kpr cannot run here")
        mount("cgroup2", target, "cgroup2", MOUNT_FLAGS)
    if statfs.fs_type(target) != CGROUP2_SUPER_MAGIC:
        raise NodeMountError(f"made {target} a cgroup2 mount, but it is still not one there")
    return plan
