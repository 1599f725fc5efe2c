"""Processes inside the lab: how one is started in a namespace and cgroup, waited for, and stopped.

Processes run with `nsenter --net=/run/netns/NAME` (never `ip netns exec`, whose private /sys hides /sys/fs/bpf and
the cgroup2 mount) and move themselves into their cgroup before exec. Each gets its own session, so its whole process
group can be signalled.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.lab.errors import LabError
from kpr.lab.plumbing import NETNS_DIR

ECHO_PATH = Path(__file__).with_name("echo.py")
CLIENT_PATH = Path(__file__).with_name("client.py")


@dataclass(slots=True)
class Tracked:
    proc: subprocess.Popen[Any]
    owner: str  # the name of the node, pod or external it runs in
    internal: bool  # started by the lab itself (echo servers): the lab closes its pipes


def in_netns_and_cgroup(netns: str, cgroup: Path, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The command line that runs argv in network namespace `netns` and cgroup `cgroup`."""
    # Join the cgroup first, then exec: the program's first instruction already runs under the node's
    # cgroup programs. nsenter (no --fork) and sh both exec, so proc.pid is the program's pid.
    script = f'echo $$ > {shlex.quote(str(cgroup / "cgroup.procs"))} && exec "$@"'
    cmd = ["nsenter", f"--net={NETNS_DIR / netns}", "--", "sh", "-c", script, "sh"]
    return cmd + [os.fspath(arg) for arg in argv]


def killpg(proc: subprocess.Popen[Any], sig: int) -> None:
    # Only while the leader is unreaped is its pid (= the group id) certainly ours; stragglers of a group whose
    # leader is gone are left to the cgroup kill.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def terminate(tracked: list[Tracked], grace: float = 2.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after `grace` seconds, reap everything."""
    for t in tracked:
        killpg(t.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for t in tracked:
        with contextlib.suppress(subprocess.TimeoutExpired):
            t.proc.wait(max(0.0, deadline - time.monotonic()))
    for t in tracked:
        killpg(t.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            t.proc.wait(5)
        if t.internal:
            for stream in (t.proc.stdin, t.proc.stdout, t.proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def wait_ready(proc: subprocess.Popen[Any], what: str, log_path: Path, timeout: float) -> None:
    """Wait until `proc` prints the line "ready" on its stdout; kill it and raise LabError if it does not in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while b"ready\n" not in seen:
        remaining = deadline - time.monotonic()
        readable = select.select([fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
        if not readable:
            killpg(proc, signal.SIGKILL)
            raise LabError(f"{what} not ready after {timeout}s: {_tail(log_path)}")
        chunk = os.read(fd, 4096)
        if not chunk:
            proc.wait()
            raise LabError(f"{what} exited with {proc.returncode}: {_tail(log_path)}")
        seen += chunk


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no log)"
