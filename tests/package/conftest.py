"""Fixtures of the package tier: a kernel headers tree like the one the image ships."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shipped_headers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A headers tree as deploy/Containerfile ships one (KPR_KERNEL_HEADERS): scripts/kernel-headers-tree.sh over
    this host's Debian headers, which make setup installs (the image downloads the same packages instead)."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    flavours = sorted(Path("/usr/src").glob(f"linux-headers-*-{arch}"), key=lambda p: p.stat().st_mtime)
    assert flavours, f"no /usr/src/linux-headers-*-{arch}: install linux-headers-{arch} (make setup does)"
    flavour = flavours[-1]
    common = flavour.with_name(flavour.name.removesuffix(f"-{arch}") + "-common")
    out = tmp_path_factory.mktemp("headers") / "kernel-headers"
    script = REPO / "scripts/kernel-headers-tree.sh"
    proc = subprocess.run(
        ["bash", str(script), "merge", str(flavour), str(common), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return out
