"""The lab's cgroup v2 directories: finding the mount, killing everything in a subtree, removing it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

from kpr.lab.errors import LabError


def cgroup2_mount() -> Path:
    """Where the cgroup v2 hierarchy is mounted (read from /proc/mounts, not assumed)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                # /proc/mounts escapes space, tab, newline and backslash as octal.
                path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                return Path(path)
    raise LabError("no cgroup2 file system is mounted (see /proc/mounts)")


def _cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in Path(dirpath, "cgroup.procs").read_text().split()]
    return pids


def _cgroup_populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return bool(_cgroup_pids(path))
    return "populated 1" in events


def cgroup_kill(path: Path, timeout: float = 5.0) -> None:
    """Kill every process in the cgroup subtree and wait until it is empty."""
    if not path.is_dir():
        return
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while _cgroup_populated(path):
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:  # kernels before 5.14
            for pid in _cgroup_pids(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes in {path} survive SIGKILL: {_cgroup_pids(path)}")
        time.sleep(0.005)


def cgroup_remove(path: Path) -> None:
    """Remove a cgroup directory tree leaf first (cgroup directories are removed with rmdir, never unlink)."""
    if not path.is_dir():
        return
    cgroup_kill(path)
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LabError(f"cannot remove cgroup {dirpath}: {exc}") from exc
