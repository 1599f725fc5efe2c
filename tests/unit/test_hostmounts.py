"""What `kpr node mount-bpffs` and `kpr node mount-cgroup` decide from a node's mount table (kpr.datapath.hostmounts).

The mount tables are the real /proc/1/mountinfo of the node layouts kpr meets (abridged): systemd's unified (cgroup
v2) and hybrid layouts, a cgroup v1-only node, a node without bpffs, and what the init containers leave behind.
tests/datapath/test_node_prepare.py carries the plans out in namespaces of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kpr.datapath.hostmounts import (
    Mount,
    NodeMountError,
    Plan,
    bpffs_plan,
    cgroup2_plan,
    cgroup2_problem,
    mounted_at,
    parse_mountinfo,
)

pytestmark = pytest.mark.unit

TARGET = "/run/kpr/cgroupv2"

UNIFIED = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 23 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 23 0:25 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:5 - bpf bpf rw,mode=700
30 22 0:26 / /run rw,nosuid,nodev,noexec,relatime shared:6 - tmpfs tmpfs rw,size=814020k,mode=755
"""

HYBRID = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
45 23 0:40 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:16 - bpf bpf rw,mode=700
"""

V1_ONLY_NO_BPFFS = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:31 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,net_cls
"""


def mounts(text: str, *extra: str) -> list[Mount]:
    return parse_mountinfo(text + "".join(line + "\n" for line in extra))


def test_mountinfo_fields_escapes_and_optional_fields() -> None:
    (mount,) = parse_mountinfo(
        "99 30 0:50 /kubepods/a\\040b /run/my\\040dir rw shared:7 master:3 unbindable - cgroup2 none rw\n"
    )
    assert mount == Mount(99, 30, "/kubepods/a b", "/run/my dir", "cgroup2", "none")
    assert parse_mountinfo("garbage\n\n") == []
    assert [m.mount_point for m in parse_mountinfo(HYBRID)][:3] == ["/", "/sys", "/sys/fs/cgroup"]


def test_the_last_mount_at_a_path_is_the_visible_one() -> None:
    stacked = mounts(UNIFIED, "40 27 0:60 / /sys/fs/bpf rw - tmpfs tmpfs rw")
    assert mounted_at(stacked, "/sys/fs/bpf/").fstype == "tmpfs"  # type: ignore[union-attr]
    assert mounted_at(stacked, "/sys/fs") is None


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (UNIFIED, Plan("keep", "/sys/fs/bpf", reason="/sys/fs/bpf is a bpf file system")),
        (HYBRID, Plan("keep", "/sys/fs/bpf", reason="/sys/fs/bpf is a bpf file system")),
        (
            V1_ONLY_NO_BPFFS,
            Plan("mount", "/sys/fs/bpf", reason="/sys/fs/bpf has no mount of its own, not a bpf file system"),
        ),
        (
            UNIFIED + "40 27 0:60 / /sys/fs/bpf rw - tmpfs tmpfs rw\n",  # something else mounted over the bpffs
            Plan("mount", "/sys/fs/bpf", reason="/sys/fs/bpf has a tmpfs mount, not a bpf file system"),
        ),
    ],
    ids=["unified", "hybrid", "none", "covered"],
)
def test_bpffs_plan(table: str, expected: Plan) -> None:
    assert bpffs_plan(parse_mountinfo(table), "/sys/fs/bpf") == expected


@pytest.mark.parametrize(
    ("table", "action", "source", "reason"),
    [
        (UNIFIED, "bind", "/sys/fs/cgroup", "a cgroup v2 node: cgroup2 is mounted at /sys/fs/cgroup"),
        (HYBRID, "bind", "/sys/fs/cgroup/unified", "a hybrid (v1 and v2) node: cgroup2 is mounted at /sys/fs/cgroup/"),
        (V1_ONLY_NO_BPFFS, "mount", "", "a cgroup v1-only node"),
        # a later start of the pod: the bind (or the mount) made the first time is kept, whatever the layout
        (UNIFIED + f"50 30 0:24 / {TARGET} rw,relatime shared:4 - cgroup2 cgroup2 rw\n", "keep", "", "root of the"),
        (V1_ONLY_NO_BPFFS + f"50 22 0:70 / {TARGET} rw,relatime shared:20 - cgroup2 cgroup2 rw\n", "keep", "", "root"),
    ],
    ids=["unified", "hybrid", "v1-only", "again-unified", "again-v1-only"],
)
def test_cgroup2_plan(table: str, action: str, source: str, reason: str) -> None:
    plan = cgroup2_plan(parse_mountinfo(table), TARGET)
    assert (plan.action, plan.target, plan.source) == (action, TARGET, source)
    assert reason in plan.reason


def test_cgroup2_plan_never_mounts_a_new_instance_where_one_is_mounted() -> None:
    """A new cgroup2 mount would reset nsdelegate and memory_recursiveprot for the whole node: bind instead."""
    for table in (UNIFIED, HYBRID):
        assert cgroup2_plan(parse_mountinfo(table), TARGET).action == "bind"
    # a container's own cgroup2 (a subtree, in its cgroup namespace) is no source for the node's root
    subtree = V1_ONLY_NO_BPFFS + "60 22 0:80 /kubepods/pod1 /var/lib/x rw - cgroup2 cgroup2 rw\n"
    assert cgroup2_plan(parse_mountinfo(subtree), TARGET).action == "mount"


def test_cgroup2_plan_refuses_what_it_cannot_make_right() -> None:
    subtree = UNIFIED + f"50 30 0:24 /kubepods {TARGET} rw - cgroup2 cgroup2 rw\n"
    with pytest.raises(NodeMountError, match="holds the cgroup2 subtree /kubepods, not the hierarchy's root"):
        cgroup2_plan(parse_mountinfo(subtree), TARGET)
    other = UNIFIED + f"50 30 0:90 / {TARGET} rw - tmpfs tmpfs rw\n"
    with pytest.raises(NodeMountError, match="has a tmpfs file system mounted"):
        cgroup2_plan(parse_mountinfo(other), TARGET)


def test_cgroup2_problem_says_what_to_do(tmp_path: Path) -> None:
    problem = cgroup2_problem(tmp_path)
    assert problem is not None and "not a cgroup v2 directory" in problem
    assert "/sys/fs/cgroup/unified on a hybrid" in problem and "kpr node mount-cgroup" in problem
    missing = cgroup2_problem(tmp_path / "nope")
    assert missing is not None and "No such file or directory" in missing


def test_the_agent_refuses_a_cgroup_v1_root_with_what_to_do(tmp_path: Path) -> None:
    from kpr.datapath.loader import DatapathError, check_cgroup2

    with pytest.raises(DatapathError, match=r"not a cgroup v2 directory: pass the node's cgroup2 mount"):
        check_cgroup2(tmp_path)
