"""`pip install kpr` (a wheel, not editable) gives a working agent.

The wheel is built offline from a copy of the tree (pip wheel --no-deps --no-build-isolation: the venv's setuptools),
checked for every BPF source and both entry points, and installed into a fresh venv without -e, with Debian's bcc
linked in as scripts/setup.sh does. kpr's own dependencies (click, structlog, ...) come from the development venv
through a .pth line, so nothing is downloaded: that adds the directory only (its .pth files, the editable kpr's
finder among them, do not run), after the fresh venv's own site-packages. Everything runs from a temporary directory
with no PYTHONPATH, so the repository is not on sys.path: the installed copy must find its BPF sources as package
data. As root, that copy's loader child then compiles and pins every program into a bpffs directory of its own,
once with the node's kernel headers and once in a mount namespace where the node has none, with only a tree like the
image's (KPR_KERNEL_HEADERS) to fall back on.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.datapath import abi, loader

pytestmark = [pytest.mark.package, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BPF_SOURCES = sorted(p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h"))
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")


def run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc  # type: ignore[no-any-return]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an installed kpr: no PYTHONPATH, no user site, no BCC_KERNEL_SOURCE of ours."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "BCC_KERNEL_SOURCE", "KPR_KERNEL_HEADERS", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {"PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"} | extra


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what a release would hold (a fresh build/ directory, none of the repo's)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy2(REPO / name, src / name)
    for name in ("kpr", "bpf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, src])
    [built] = out.glob("kpr-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (not editable) and Debian's bcc linked in; returns its python."""
    root = tmp_path_factory.mktemp("venv")
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", "--without-pip", root])
    python = root / "bin/python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert DEBIAN_BCC.is_dir(), f"{DEBIAN_BCC} is missing: install python3-bpfcc (make setup does)"
    (purelib / "bcc").symlink_to(DEBIAN_BCC)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    run([*pip, "install", "-q", "--no-deps", "--no-index", wheel])
    (purelib / "kpr-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """Somewhere that is not the repository: `python -m` puts the working directory first on sys.path."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    return work


def site_of(python: Path) -> Path:
    return Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())


# ---- the wheel ----


def test_wheel_holds_every_bpf_source_as_package_data(wheel: Path) -> None:
    assert BPF_SOURCES, "no bpf/*.c or bpf/*.h in the repository"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        for name in BPF_SOURCES:
            assert f"kpr/bpf/{name}" in names, name
            assert whl.read(f"kpr/bpf/{name}") == (REPO / "bpf" / name).read_bytes(), name
    assert {n for n in names if n.startswith("kpr/bpf/")} == {f"kpr/bpf/{n}" for n in BPF_SOURCES}


def test_wheel_holds_every_module_and_the_marker(wheel: Path) -> None:
    """setup.py lists the packages: a new package under kpr/ must not be left out of the wheel."""
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "kpr").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()
    assert "kpr/py.typed" in names


def test_wheel_declares_the_entry_points(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        [entry_points] = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parsed = configparser.ConfigParser()
        parsed.read_string(whl.read(entry_points).decode())
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert dict(parsed["console_scripts"]) == declared
    assert declared == {"kpr": "kpr.cli.main:main", "kpr-cni": "kpr.cni.plugin:main"}


# ---- the installed copy ----

PROBE = """
import importlib.resources, json, sys
import kpr
from kpr.datapath import abi
print(json.dumps({
    "kpr": kpr.__file__,
    "files": str(importlib.resources.files("kpr")),
    "bpf_dir": str(abi.BPF_DIR),
    "header": abi.HEADER.is_file(),
    "sources": sorted(p.name for p in abi.BPF_DIR.iterdir()),
    "sys_path": sys.path,
}))
"""


def test_installed_copy_finds_its_bpf_sources_outside_the_repository(venv: Path, cwd: Path) -> None:
    site = site_of(venv)
    found = json.loads(run([venv, "-c", PROBE], cwd=cwd, env=clean_env()).stdout)
    assert Path(found["kpr"]) == site / "kpr/__init__.py"
    assert Path(found["files"]) == site / "kpr"
    assert Path(found["bpf_dir"]) == site / "kpr/bpf"
    assert found["header"] is True
    assert found["sources"] == BPF_SOURCES
    entries = [Path(p).resolve() for p in found["sys_path"] if p]
    assert REPO not in entries, found["sys_path"]
    assert not any(e.is_relative_to(REPO) and not e.is_relative_to(REPO / ".venv") for e in entries), entries


def test_installed_entry_points_run(venv: Path, cwd: Path) -> None:
    bindir = venv.parent
    for script in ("kpr", "kpr-cni"):
        assert (bindir / script).is_file(), script
    out = run([bindir / "kpr", "--help"], cwd=cwd, env=clean_env()).stdout
    assert "agent" in out and "cleanup" in out


# ---- as root: the installed copy compiles and pins every program ----


@pytest.fixture
def bpffs_dir() -> Iterator[Path]:
    """A bpffs directory of this test's own; whatever is pinned in it is removed, and it too, even on failure."""
    path = Path("/sys/fs/bpf") / f"kprwheel-{uuid.uuid4().hex[:8]}"
    yield path
    if path.exists():
        try:
            loader.unpin_all(path)
        finally:
            if path.exists():  # names unpin_all does not know (a failed run's staging pins): bpffs lets us unlink
                for pin in path.iterdir():
                    pin.unlink()
                path.rmdir()


def load_with_installed_copy(venv: Path, cwd: Path, bpffs_dir: Path, *wrap: str, **env: str) -> dict[str, object]:
    """Run the installed copy's loader child (what the agent runs at start) and return its result line."""
    argv = [*wrap, str(venv), "-m", "kpr.datapath.loader", "--bpffs-dir", str(bpffs_dir), "--tc"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=clean_env(**env), check=False)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def assert_everything_pinned(bpffs_dir: Path) -> None:
    pins = {p.name for p in bpffs_dir.iterdir()}
    programs = {
        *loader.SOCKET_PINS.values(),
        *loader.TC_PINS.values(),
        *(p for p, _, _ in loader.POD_PROGRAMS.values()),
    }
    assert programs <= pins, sorted(programs - pins)
    assert loader.pinned_maps(bpffs_dir) == sorted(abi.MAPS)


@pytest.mark.datapath
def test_installed_copy_compiles_and_pins_every_program(venv: Path, cwd: Path, bpffs_dir: Path) -> None:
    result = load_with_installed_copy(venv, cwd, bpffs_dir)
    assert result["kernel_headers"], result
    assert_everything_pinned(bpffs_dir)


@pytest.mark.datapath
def test_without_node_headers_the_shipped_tree_is_used(
    venv: Path, cwd: Path, bpffs_dir: Path, shipped_headers: Path, tmp_path: Path
) -> None:
    """The node's /lib/modules/$(uname -r) hidden in a private mount namespace (the host's stays as it is)."""
    release = os.uname().release
    assert Path("/sys/kernel/kheaders.tar.xz").exists() is False, "this kernel has kheaders: they would come first"
    empty = tmp_path / "no-headers"
    empty.mkdir()
    modules = f"/lib/modules/{release}"
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mkdir -p {modules} 2>/dev/null; mount --bind "{empty}" {modules} && exec "$@"', "hide"]  # fmt: skip
    result = load_with_installed_copy(venv, cwd, bpffs_dir, *hide, KPR_KERNEL_HEADERS=str(shipped_headers))
    assert result["kernel_headers"] == f"image ({shipped_headers})"
    assert_everything_pinned(bpffs_dir)
