"""Who owns a lab, and removing everything a lab made: at Lab.close(), or with sweep_stale() after a crash.

Runtime state: /run/kpr-lab/<prefix>/ with an `owner` file (the creating pid and its start time), which is how
sweep_stale() tells a crashed lab from a live one. A lab's pieces are all named by its prefix (see
kpr/lab/layout.py), so they are found again from the prefix alone.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kpr.lab.cgroups import cgroup2_mount, cgroup_kill, cgroup_remove
from kpr.lab.errors import LabError
from kpr.lab.layout import BPFFS_ROOT, PREFIX_RE
from kpr.lab.plumbing import delete_netns, netns_names

RUN_ROOT = Path("/run/kpr-lab")


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def claim_prefix(prefix: str) -> None:
    """Take the prefix: atomically rename a private directory holding the owner file to /run/kpr-lab/<prefix>."""
    run_dir = RUN_ROOT / prefix
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    if any(name.startswith(prefix + "-") for name in netns_names()):
        raise LabError(f"network namespaces named {prefix}-* already exist: prefix in use")
    staging = RUN_ROOT / f".{prefix}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / "owner").write_text(f"{os.getpid()}\n{_proc_start_time(os.getpid()) or ''}\n")
    try:
        if run_dir.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(run_dir))
        os.rename(staging, run_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LabError(f"lab prefix {prefix} is in use ({run_dir} exists)") from exc


def _owner_alive(owner_file: Path) -> bool:
    """Whether the process that created a lab (pid and start time in its owner file) still runs."""
    try:
        fields = owner_file.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A different start time means the pid now belongs to another process.
    return len(fields) < 2 or _proc_start_time(pid) in (None, fields[1])


def remove_bpffs_dir(path: Path) -> None:
    """Unlink every pin under a bpffs directory of the lab, then the directory."""
    if path.parent != BPFFS_ROOT or path.is_symlink() or not path.exists():
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LabError(f"cannot remove {path}: {exc}") from exc


def _remove_bpffs_dirs(paths: Iterable[Path]) -> None:
    for path in list(paths):
        remove_bpffs_dir(path)


def remove_remains(prefix: str, cgroup_root: Path) -> list[str]:
    """Remove every piece of lab `prefix` that the kernel still holds; return what could not be removed."""
    errors: list[str] = []
    steps: list[tuple[str, Any]] = [
        ("processes", lambda: cgroup_kill(cgroup_root / prefix)),
        ("netns", lambda: delete_netns(n for n in netns_names() if n.startswith(prefix + "-"))),
        ("cgroups", lambda: cgroup_remove(cgroup_root / prefix)),
        ("bpffs", lambda: _remove_bpffs_dirs(BPFFS_ROOT.glob(prefix + "-*"))),
        ("runtime dir", lambda: shutil.rmtree(RUN_ROOT / prefix, ignore_errors=True)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(f"{what}: {exc}")
    return errors


def sweep_stale(prefix_start: str = "kpr") -> list[str]:
    """Remove what crashed labs left behind: labs under /run/kpr-lab whose owner process is gone.

    Only labs whose prefix starts with `prefix_start` are considered; live labs (owner pid running) are never
    touched. Returns the prefixes that were swept.
    """
    if not RUN_ROOT.is_dir():
        return []
    cgroup_root = cgroup2_mount()
    swept: list[str] = []
    errors: list[str] = []
    for entry in sorted(RUN_ROOT.iterdir()):
        name = entry.name
        if name.startswith("."):  # a claim in progress: ".<prefix>.<pid>"
            pid = name.rsplit(".", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not name.startswith(prefix_start) or not PREFIX_RE.match(name) or not entry.is_dir():
            continue
        if _owner_alive(entry / "owner"):
            continue
        errors += [f"{name}: {error}" for error in remove_remains(name, cgroup_root)]
        swept.append(name)
    if errors:
        raise LabError("sweeping stale labs left pieces behind: " + "; ".join(errors))
    return swept
