"""`kpr node ...` (the DaemonSet's init containers) and the kpr-cni shim, for real, in namespaces of their own.

- mount-bpffs and mount-cgroup enter a stand-in "node": a process in a private mount namespace (and for the cgroup
  v1-only case a private cgroup namespace, so a new cgroup2 mount cannot touch the real hierarchy's options), seen
  through this machine's /proc as the init containers see the node's through /hostproc. Their mounts exist only
  there and vanish with it; the host's mounts are never touched.
- the shim runs the real nsenter into an agent's mount and pid namespaces (a stand-in agent in namespaces of its own,
  holding the lock on its bpffs directory, with a stub kpr-cni), and then the real kpr-cni with a real agent on a
  lab pod's veth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath import statfs
from kpr.datapath.hostmounts import BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, Mount, mounted_at, parse_mountinfo
from kpr.lab import Lab
from kpr.lab.cluster import LabAgent

pytestmark = pytest.mark.datapath

KPR_CNI = Path(sys.executable).with_name("kpr-cni")


@contextmanager
def stand_in(argv: list[str], ready: str = "ready") -> Iterator[subprocess.Popen[str]]:
    """A process that prints `ready` once set up and then waits; killed (and its namespaces gone) afterwards."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().strip()
        assert line == ready, f"{argv}: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield proc
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def fake_node(setup: str = "", cgroup: bool = False) -> Any:  # a context manager of the node's process
    """A stand-in node: private mount namespace (and cgroup namespace), after running the sh `setup` in it."""
    argv = ["unshare", "--mount", "--propagation", "private", *(["--cgroup"] if cgroup else [])]
    return stand_in([*argv, "sh", "-ec", f"{setup}\necho ready\nexec sleep 600"])


def node_mounts(pid: int) -> list[Mount]:
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())


def kpr_node(*args: str, pid: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kpr.cli.main", "node", *args, "--host-proc", "/proc", "--host-pid", str(pid)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# ---- kpr node mount-bpffs / mount-cgroup


def test_mount_bpffs_mounts_one_in_the_nodes_namespace_once(tmp_path: Path) -> None:
    target = str(tmp_path / "bpf")
    with fake_node() as node:
        first = kpr_node("mount-bpffs", "--path", target, pid=node.pid)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == f"bpffs: {target} has no mount of its own, not a bpf file system; " + (
            f"mounted one at {target}"
        )
        assert mounted_at(node_mounts(node.pid), target).fstype == "bpf"  # type: ignore[union-attr]
        assert statfs.fs_type(f"/proc/{node.pid}/root{target}") == BPF_FS_MAGIC
        assert mounted_at(node_mounts(os.getpid()), target) is None  # only in the node's namespace
        again = kpr_node("mount-bpffs", "--path", target, pid=node.pid)
        assert again.stdout.strip() == f"bpffs: {target} is a bpf file system; kept it"
        assert [m.mount_point for m in node_mounts(node.pid)].count(target) == 1


def test_mount_cgroup_binds_the_nodes_own_cgroup2_mount(tmp_path: Path) -> None:
    target = str(tmp_path / "cgroupv2")
    with fake_node() as node:
        source = next(m for m in node_mounts(node.pid) if m.fstype == "cgroup2" and m.root == "/")
        first = kpr_node("mount-cgroup", "--path", target, pid=node.pid)
        assert first.returncode == 0, first.stderr
        src = source.mount_point
        assert first.stdout.strip().endswith(f"cgroup2 is mounted at {src}; bound {src} to {target}"), first.stdout
        made = mounted_at(node_mounts(node.pid), target)
        assert made is not None and (made.fstype, made.root) == ("cgroup2", "/")
        assert statfs.fs_type(f"/proc/{node.pid}/root{target}") == CGROUP2_SUPER_MAGIC
        # a bind: the very directory of the node's mount (the same inode on the same superblock), not a new mount
        assert os.path.samefile(f"/proc/{node.pid}/root{target}", f"/proc/{node.pid}/root{source.mount_point}")
        assert mounted_at(node_mounts(os.getpid()), target) is None
        again = kpr_node("mount-cgroup", "--path", target, pid=node.pid)
        assert again.stdout.strip() == f"cgroup2: {target} is the root of the cgroup2 hierarchy; kept it"


def test_mount_cgroup_on_a_cgroup_v1_only_node_mounts_cgroup2(tmp_path: Path) -> None:
    target = str(tmp_path / "cgroupv2")
    # the node: every cgroup2 mount gone (in its private mount namespace only), in a cgroup namespace of its own
    v1_only = 'for m in $(findmnt -rn -t cgroup2 -o TARGET | sort -r); do umount "$m"; done'
    with fake_node(v1_only, cgroup=True) as node:
        assert not [m for m in node_mounts(node.pid) if m.fstype == "cgroup2"]
        first = kpr_node("mount-cgroup", "--path", target, pid=node.pid)
        assert first.returncode == 0, first.stderr
        assert "a cgroup v1-only node" in first.stdout and f"mounted cgroup2 at {target}" in first.stdout
        assert statfs.fs_type(f"/proc/{node.pid}/root{target}") == CGROUP2_SUPER_MAGIC
        assert mounted_at(node_mounts(os.getpid()), target) is None
        again = kpr_node("mount-cgroup", "--path", target, pid=node.pid)
        assert again.stdout.strip() == f"cgroup2: {target} is the root of the cgroup2 hierarchy; kept it"


def test_mount_cgroup_without_the_hosts_proc_says_what_it_needs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kpr.cli.main", "node", "mount-cgroup", "--host-proc", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot open {tmp_path}/1/ns/cgroup" in result.stderr and "privileged" in result.stderr


# ---- the kpr-cni shim


def install_shim(tmp_path: Path, host_bpffs_dir: Path, agent_bpffs_dir: Path, kpr_cni: Path) -> Path:
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    argv = [sys.executable, "-m", "kpr.cli.main", "node", "install-cni", "--cni-bin-dir", str(bin_dir)]
    argv += ["--host-bpffs-dir", str(host_bpffs_dir), "--bpffs-dir", str(agent_bpffs_dir), "--kpr-cni", str(kpr_cni)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return bin_dir / "kpr-cni"


def cni_env(command: str, netns: str, **extra: str) -> list[str]:
    variables = {"CNI_COMMAND": command, "CNI_CONTAINERID": "kprshimtest", "CNI_NETNS": netns, "CNI_IFNAME": "eth0"}
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return ["env", "-i", f"PATH={path}", *(f"{k}={v}" for k, v in {**variables, **extra}.items())]


STUB = """#!/bin/sh
if [ "$CNI_COMMAND" = VERSION ]; then  # asked by install-cni
    echo '{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}'
    exit 0
fi
# what the stub sees: the agent-only mount, its own pid and pid namespace, a working /proc/thread-self
out=@OUT@
cat @PRIVATE@/marker > "$out/marker" 2>/dev/null
echo $$ > "$out/pid"
readlink /proc/self/ns/pid > "$out/pidns"
readlink /proc/thread-self/ns/net > "$out/netns"
readlink /proc/self/ns/mnt > "$out/mntns"
cat > "$out/stdin"
echo '{"cniVersion":"1.0.0","interfaces":[]}'
"""


def test_the_shim_runs_kpr_cni_in_the_agents_mount_and_pid_namespaces(tmp_path: Path) -> None:
    bpffs_dir, private, out = tmp_path / "bpffs" / "kpr", tmp_path / "private", tmp_path / "seen"
    for d in (bpffs_dir, private, out):
        d.mkdir(parents=True)
    stub = tmp_path / "kpr-cni"
    stub.write_text(STUB.replace("@OUT@", str(out)).replace("@PRIVATE@", str(private)))
    stub.chmod(0o755)
    # the agent: its own mount and pid namespaces, a mount only it sees, the lock on its bpffs directory
    agent_script = textwrap.dedent(f"""
        import fcntl, os, subprocess, time
        subprocess.run(["mount", "-t", "tmpfs", "agent-only", "{private}"], check=True)
        open("{private}/marker", "w").write("seen from the agent's mount namespace")
        fd = os.open("{bpffs_dir}", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("ready", flush=True)
        time.sleep(600)
    """)
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]
    with stand_in([*argv, sys.executable, "-c", agent_script]) as agent:
        shim = install_shim(tmp_path, bpffs_dir, bpffs_dir, stub)
        conf = json.dumps({"cniVersion": "1.0.0", "name": "kpr-test"})
        result = subprocess.run(
            [*cni_env("ADD", "/run/netns/none"), str(shim)], input=conf, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result
        assert json.loads(result.stdout) == {"cniVersion": "1.0.0", "interfaces": []}
        seen = {p.name: p.read_text().strip() for p in out.iterdir()}
        assert seen["marker"] == "seen from the agent's mount namespace"
        assert not (private / "marker").exists()  # not in ours
        assert (
            seen["pidns"] == os.readlink(f"/proc/{agent.pid}/ns/pid_for_children") != os.readlink("/proc/self/ns/pid")
        )
        assert int(seen["pid"]) < 10  # a process of the agent's small pid namespace
        assert seen["mntns"] != os.readlink("/proc/self/ns/mnt")
        assert seen["netns"] == os.readlink("/proc/self/ns/net")  # the node's network namespace, where CNI runs
        assert json.loads(seen["stdin"]) == json.loads(conf)


def test_the_shim_with_the_real_kpr_cni_and_agent_on_a_lab_pod(lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory()
    node = lab.add_node("node1")
    pod = lab.add_pod(node, "chained", echo=False)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    agent = LabAgent(lab, node, manifests, extra_args=["--socket-lb", "hostns-only"]).start()
    agent.wait_started()
    shim = install_shim(tmp_path, node.bpffs_dir, node.bpffs_dir, KPR_CNI)
    netns = f"/run/netns/{pod.netns}"
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": pod.host_veth}, {"name": "eth0", "sandbox": netns}],
        "ips": [{"address": f"{pod.ipv4}/24", "interface": 1}],
    }
    conf = json.dumps({"cniVersion": "1.0.0", "name": "kpr-lab", "type": "kpr-cni", "bpffsDir": str(node.bpffs_dir),
                       "prevResult": prev})  # fmt: skip

    def cni(command: str) -> subprocess.CompletedProcess[str]:
        return lab.run(node, [*cni_env(command, netns), str(shim)], input=conf, check=False, timeout=60)

    def attached() -> list[str]:
        script = "import json,sys\nfrom kpr.datapath.veth import attached\nprint(json.dumps(attached(sys.argv[1])))"
        names: list[str] = json.loads(lab.run(node, [sys.executable, "-c", script, pod.host_veth]).stdout)
        return names

    added = cni("ADD")
    assert added.returncode == 0, added
    assert json.loads(added.stdout) == prev
    assert len(attached()) == 4, attached()
    checked = cni("CHECK")
    assert (checked.returncode, checked.stdout) == (0, ""), checked
    deleted = cni("DEL")
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted
    assert attached() == []

    agent.stop()
    refused = cni("ADD")
    assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == 11, refused
    assert attached() == []
    gone = cni("DEL")
    assert (gone.returncode, gone.stdout) == (0, "") and "no kpr agent runs here" in gone.stderr
