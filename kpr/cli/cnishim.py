"""The kpr-cni shim: what `kpr node install-cni` writes to the node's CNI bin directory as `kpr-cni`.

A CNI plugin is an executable on the node that the container runtime starts for every pod, in the node's
namespaces. kpr-cni is Python, inside the kpr image; a node has neither (and `pip install` on every node is what the
DaemonSet is meant to spare). So the node gets a small POSIX sh script instead, which runs the image's kpr-cni inside
the running agent's container with nsenter: its mount namespace gives Python, kpr, the node's bpffs and /run/netns as
the pod mounts them; its pid namespace makes that container's /proc right for kpr-cni; the network namespace stays
the node's, where a CNI plugin must run. The environment (CNI_*), stdin, stdout and stderr pass through.

The agent is found by the lock it holds on its bpffs directory while it runs (kpr.datapath.loader.lock_bpffs), from
the node's /proc/locks, and confirmed by the holder seeing that same directory (device and inode) at the agent's
path. A pid file could outlive the agent and name a reused pid; the lock cannot. Without a running agent the shim
answers by itself: VERSION as kpr-cni would, DEL with success (kpr's programs live on the pod's veth and go with it,
and a DEL that fails keeps a pod from ever being removed), anything else with CNI error 11, "try again later", so
the runtime retries. The node needs /bin/sh, nsenter (util-linux), ls, dd and tr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")  # pasted into sh and JSON text as is: nothing to quote or escape
SHIM_MARKER = "# kpr-cni shim, written by `kpr node install-cni`"


@dataclass(frozen=True, slots=True)
class ShimSettings:
    host_bpffs_dir: str  # the agent's --bpffs-dir as the node sees it (/sys/fs/bpf/kpr)
    agent_bpffs_dir: str  # the same directory as the agent's container sees it (/run/kpr/bpffs/kpr)
    kpr_cni: str  # kpr-cni's path in the agent's container
    version_info: str  # kpr-cni's answer to VERSION, one line of JSON
    supported_versions: tuple[str, ...]


_TEMPLATE = r"""#!/bin/sh
@MARKER@ at every start of the kpr
# pod on this node (the DaemonSet's install-cni init container): edits do not last. What it does and why:
# kpr/cli/cnishim.py. In short: kpr-cni is Python in the kpr image, so this runs it inside the running kpr agent's
# container (its mount and pid namespaces, the node's network namespace), passing environment, stdin, stdout and
# stderr through. Without an agent: VERSION is answered here, DEL succeeds, anything else is CNI error 11.

# The agent's --bpffs-dir as the node sees it; the same directory as the agent's container sees it; kpr-cni there.
host_bpffs_dir=@HOST_BPFFS_DIR@
agent_bpffs_dir=@AGENT_BPFFS_DIR@
kpr_cni=@KPR_CNI@
# kpr-cni's answer to VERSION, and the versions it speaks.
version_info='@VERSION_INFO@'
supported=' @SUPPORTED@ '

PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
export PATH

note() {
    printf 'kpr-cni (shim): %s\n' "$*" >&2
}

# The configuration's cniVersion when kpr-cni speaks it, else 1.0.0. The first one on stdin is the configuration's:
# libcni writes its keys sorted, so "cniVersion" comes before "prevResult" and the cniVersion inside it.
conf_version() {
    conf=$(dd bs=65536 count=16 2>/dev/null | tr -d ' \t\r\n')
    version=${conf#*'"cniVersion":"'}
    version=${version%%'"'*}
    case $supported in
        *" $version "*) printf '%s' "$version" ;;
        *) printf '1.0.0' ;;
    esac
}

# A CNI error object on stdout and exit status 1. Messages are fixed text and numbers: nothing to escape.
fail() {
    printf '{"cniVersion":"%s","code":%s,"msg":"%s","details":"%s"}\n' "$(conf_version)" "$1" "$2" "$3"
    exit 1
}

# The pid, in the node's pid namespace, of the kpr agent serving $host_bpffs_dir; status 1 when none runs.
agent_pid() {
    [ -d "$host_bpffs_dir" ] && [ -r /proc/locks ] || return 1
    # shellcheck disable=SC2046  # split on purpose: ls -di prints the inode number, then the name
    set -- $(ls -di "$host_bpffs_dir" 2>/dev/null)
    inode=${1:-none}
    while read -r _ kind _ _ pid id _; do
        [ "$kind" = FLOCK ] || continue
        case $id in *:"$inode") ;; *) continue ;; esac
        # The holder sees the same directory (device and inode) at the agent's path: it is the agent.
        # shellcheck disable=SC3013  # test -ef: dash, bash and busybox sh all have it
        if [ "$host_bpffs_dir" -ef "/proc/$pid/root$agent_bpffs_dir" ]; then
            printf '%s' "$pid"
            return 0
        fi
    done </proc/locks
    return 1
}

cni_command=${CNI_COMMAND:-}
if [ "$cni_command" = VERSION ]; then
    printf '%s\n' "$version_info"
    exit 0
fi
if ! pid=$(agent_pid); then
    if [ "$cni_command" = DEL ]; then
        note "DEL ${CNI_CONTAINERID:-}: no kpr agent runs here; nothing to do (kpr's programs go with the pod's veth)"
        exit 0
    fi
    fail 11 "the kpr agent is not running on this node" \
        "no process holds the lock on @HOST_BPFFS_DIR@; kpr-cni runs in the agent's container: wait for the kpr pod"
fi
if ! command -v nsenter >/dev/null 2>&1; then
    fail 999 "nsenter (util-linux) is not installed on this node" \
        "the kpr-cni shim runs kpr-cni inside the kpr agent's container with nsenter"
fi
# Captured, so that a failure before kpr-cni could answer (the agent gone meanwhile) still gives an error object.
answer=$(nsenter --target "$pid" --mount --pid -- "$kpr_cni")
status=$?
if [ -n "$answer" ]; then
    printf '%s\n' "$answer"
    exit "$status"
fi
[ "$status" -eq 0 ] && exit 0
if [ "$cni_command" = DEL ]; then
    note "DEL ${CNI_CONTAINERID:-}: kpr-cni could not run in the agent's container (pid $pid, status $status); done"
    exit 0
fi
fail 11 "kpr-cni could not run in the kpr agent's container (pid $pid, exit status $status)" \
    "the agent may have stopped meanwhile; the container runtime's log holds nsenter's message"
"""


class ShimError(RuntimeError):
    """The shim cannot be written; the message says why."""


def render(settings: ShimSettings) -> str:
    for name in ("host_bpffs_dir", "agent_bpffs_dir", "kpr_cni"):
        value = getattr(settings, name)
        if not SAFE_PATH.fullmatch(value):
            raise ShimError(f"{name}={value!r}: only absolute paths of letters, digits and ._+-/ are supported")
    if "'" in settings.version_info or "\n" in settings.version_info:
        raise ShimError(f"kpr-cni's VERSION answer cannot be quoted for sh: {settings.version_info!r}")
    if not all(re.fullmatch(r"[0-9.]+", v) for v in settings.supported_versions):
        raise ShimError(f"unexpected supported versions {settings.supported_versions!r}")
    text = _TEMPLATE
    for marker, value in [
        ("@MARKER@", SHIM_MARKER),
        ("@HOST_BPFFS_DIR@", settings.host_bpffs_dir),
        ("@AGENT_BPFFS_DIR@", settings.agent_bpffs_dir),
        ("@KPR_CNI@", settings.kpr_cni),
        ("@VERSION_INFO@", settings.version_info),
        ("@SUPPORTED@", " ".join(settings.supported_versions)),
    ]:
        text = text.replace(marker, value)
    return text


def version_of(kpr_cni: Path) -> tuple[str, tuple[str, ...]]:
    """kpr-cni's own answer to VERSION (one line of JSON) and its supported versions: run, so the shim says exactly
    what the image's kpr-cni would, and so a kpr-cni that does not start fails the install, not a pod's ADD."""
    try:
        result = subprocess.run(
            [str(kpr_cni)],
            input=b'{"cniVersion":"1.0.0"}',
            env={**os.environ, "CNI_COMMAND": "VERSION"},
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ShimError(f"cannot run {kpr_cni}: {e}") from None
    try:
        answer = json.loads(result.stdout)
        versions = tuple(answer["supportedVersions"])
    except (ValueError, KeyError, TypeError):
        raise ShimError(
            f"{kpr_cni} answered VERSION with exit status {result.returncode}: "
            f"{result.stdout.decode(errors='replace')[:300]!r} {result.stderr.decode(errors='replace')[-500:]}"
        ) from None
    return json.dumps(answer, separators=(",", ":")), versions


def install(directory: Path, text: str) -> Path:
    """Write the shim as `kpr-cni` in `directory`, atomically (a runtime never runs half a file), mode 0755."""
    target = directory / "kpr-cni"
    staging = directory / f".kpr-cni.{os.getpid()}.tmp"
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o755)
        try:
            os.write(fd, text.encode())
            os.fchmod(fd, 0o755)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staging, target)
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise ShimError(f"cannot write {target}: {e.strerror}") from None
    return target


def previous(target: Path) -> str:
    """What `target` was before the install, for the log line."""
    if target.is_symlink():
        return f"a link to {os.readlink(target)}"
    if not target.exists():
        return "nothing"
    try:
        head = target.read_bytes()[:4096]
    except OSError:
        return "an unreadable file"
    return "a previous shim" if SHIM_MARKER.encode() in head else "another kpr-cni (replaced)"
