"""`kpr node ...`: what the DaemonSet's init containers do to a node before the agent starts (deploy/daemonset.yaml).

- `mount-bpffs`: a bpf file system at /sys/fs/bpf, unless the node has one (systemd mounts it);
- `mount-cgroup`: the root of the cgroup2 hierarchy at /run/kpr/cgroupv2, whatever the node's cgroup layout;
- `install-cni`: the kpr-cni shim in the node's CNI bin directory (kpr/cli/cnishim.py).

The first two enter the node's mount namespace from the host's /proc (kpr/datapath/hostmounts.py); each prints one
line saying what it found and did, which is what `kubectl logs -c <init container>` shows.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

host_proc_option = click.option(
    "--host-proc",
    type=click.Path(path_type=Path),
    default=Path("/hostproc"),
    show_default=True,
    help="Where the node's /proc is mounted in this container.",
)
host_pid_option = click.option(
    "--host-pid",
    type=int,
    default=1,
    show_default=True,
    help="A process of the node whose mount (and cgroup) namespaces are the node's: its init.",
)


@click.group()
def node() -> None:
    """Prepare this node for the agent (the DaemonSet's init containers run these)."""


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


@node.command("mount-bpffs")
@click.option("--path", default="/sys/fs/bpf", show_default=True, help="Where the node's bpffs belongs.")
@host_proc_option
@host_pid_option
def mount_bpffs(path: str, host_proc: Path, host_pid: int) -> None:
    """Mount a bpf file system at PATH on the node, unless one is there."""
    from kpr.datapath import hostmounts

    try:
        hostmounts.enter_host(host_proc, host_pid)
        plan = hostmounts.ensure_bpffs(path)
    except (hostmounts.NodeMountError, OSError) as e:
        raise _fail(e) from None
    click.echo(f"bpffs: {plan.reason}; " + ("kept it" if plan.action == "keep" else f"mounted one at {path}"))


@node.command("mount-cgroup")
@click.option(
    "--path", default="/run/kpr/cgroupv2", show_default=True, help="Where the agent's pod finds the cgroup2 root."
)
@host_proc_option
@host_pid_option
def mount_cgroup(path: str, host_proc: Path, host_pid: int) -> None:
    """Make PATH on the node the root of the cgroup2 hierarchy: a bind of the node's cgroup2 mount (unified or
    hybrid nodes), or a new cgroup2 mount on a cgroup v1-only node."""
    from kpr.datapath import hostmounts

    try:
        hostmounts.enter_host(host_proc, host_pid, cgroup=True)
        plan = hostmounts.ensure_cgroup2(path)
    except (hostmounts.NodeMountError, OSError) as e:
        raise _fail(e) from None
    done = {"keep": "kept it", "bind": f"bound {plan.source} to {path}", "mount": f"mounted cgroup2 at {path}"}
    click.echo(f"cgroup2: {plan.reason}; {done[plan.action]}")


def _default_kpr_cni() -> Path | None:
    found = shutil.which("kpr-cni") or shutil.which("kpr-cni", path=str(Path(sys.executable).parent))
    return Path(found).resolve() if found else None


@node.command("install-cni")
@click.option(
    "--cni-bin-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The node's CNI bin directory (/opt/cni/bin) as mounted in this container.",
)
@click.option(
    "--host-bpffs-dir",
    default="/sys/fs/bpf/kpr",
    show_default=True,
    help="The agent's --bpffs-dir as the node sees it.",
)
@click.option(
    "--bpffs-dir",
    default="/sys/fs/bpf/kpr",
    show_default=True,
    envvar="KPR_BPFFS_DIR",
    help="The agent's --bpffs-dir as its container sees it.",
)
@click.option(
    "--kpr-cni",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="kpr-cni in this image, the same path in the agent's container (default: the one on PATH).",
)
def install_cni(cni_bin_dir: Path, host_bpffs_dir: str, bpffs_dir: str, kpr_cni: Path | None) -> None:
    """Write the kpr-cni shim to the node's CNI bin directory: it runs this image's kpr-cni inside the running
    agent's container, so the node needs neither Python nor kpr."""
    from kpr.cli import cnishim

    kpr_cni = kpr_cni or _default_kpr_cni()
    if kpr_cni is None:
        raise click.ClickException("kpr-cni is not on PATH; pass --kpr-cni")
    if not cni_bin_dir.is_dir():
        raise click.ClickException(f"{cni_bin_dir} is not a directory: mount the node's CNI bin directory there")
    try:
        version_info, versions = cnishim.version_of(kpr_cni)
        text = cnishim.render(cnishim.ShimSettings(host_bpffs_dir, bpffs_dir, str(kpr_cni), version_info, versions))
        before = cnishim.previous(cni_bin_dir / "kpr-cni")
        target = cnishim.install(cni_bin_dir, text)
    except cnishim.ShimError as e:
        raise _fail(e) from None
    click.echo(
        f"kpr-cni: wrote the shim to {target} (was {before}); it runs {kpr_cni} in the agent's container, found by "
        f"its lock on {host_bpffs_dir}; CNI versions {', '.join(versions)}"
    )
