"""kpr.datapath.toolchain without root: where the BPF sources are, which kernel headers tree BCC gets, in which order,
kheaders extracted all or nothing, and a compile that fails with one tree moving on to the next."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import kpr
from kpr.datapath import abi, toolchain
from kpr.datapath.toolchain import KernelHeaders, NoKernelHeaders

pytestmark = pytest.mark.unit

RELEASE = "6.18.0-test"
REPO = Path(kpr.__file__).resolve().parents[1]


def tree(path: Path) -> Path:
    """A directory that passes for a kernel headers tree (what BCC checks: include/linux/kconfig.h)."""
    (path / "include/linux").mkdir(parents=True)
    (path / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    return path


def kheaders_archive(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    """Paths of an empty node: no /lib/modules tree, no kheaders, an empty cache."""
    return {
        "modules_dir": tmp_path / "lib/modules",
        "kheaders_archive": tmp_path / "sys/kernel/kheaders.tar.xz",
        "cache_dir": tmp_path / "var/tmp/kpr",
    }


def sources(found: list[KernelHeaders]) -> list[str]:
    return [h.source for h in found]


# ---- the BPF sources ----


def test_bpf_sources_of_a_checkout_are_the_repository_bpf_dir() -> None:
    assert toolchain.bpf_sources() == REPO / "bpf"
    assert abi.BPF_DIR == REPO / "bpf" and abi.HEADER == REPO / "bpf/kpr.h"


def test_package_data_wins_over_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install has kpr/bpf/ inside the package; that copy is the one used, not a bpf/ that happens to be beside."""
    package = tmp_path / "site-packages/kpr"
    for where in (package / "bpf", tmp_path / "site-packages/bpf"):
        where.mkdir(parents=True)
        (where / "kpr.h").write_text("")
    monkeypatch.setattr(toolchain.importlib.resources, "files", lambda name: package)
    assert toolchain.bpf_sources() == package / "bpf"


def test_no_sources_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain.importlib.resources, "files", lambda name: tmp_path / "kpr")
    with pytest.raises(RuntimeError, match="BPF sources"):
        toolchain.bpf_sources()


# ---- which tree, in which order ----


def test_nothing_found_says_where_it_looked(node: dict[str, Path]) -> None:
    found, missing = toolchain.find_kernel_headers(RELEASE, {}, **node)
    assert found == []
    assert any(f"lib/modules/{RELEASE}/build/include/linux/kconfig.h" in m for m in missing)
    assert any("kheaders.tar.xz" in m for m in missing)
    assert any("KPR_KERNEL_HEADERS unset" in m for m in missing)
    with pytest.raises(NoKernelHeaders, match=r"CONFIG_IKHEADERS.*KPR_KERNEL_HEADERS"):
        toolchain.compile_bpf(lambda: None, "bpf/sock.c", [])


def test_order_is_env_node_kheaders_image(tmp_path: Path, node: dict[str, Path]) -> None:
    tree(node["modules_dir"] / RELEASE / "build")
    node["kheaders_archive"].parent.mkdir(parents=True)
    node["kheaders_archive"].write_bytes(b"")
    environ = {"BCC_KERNEL_SOURCE": str(tree(tmp_path / "env")), "KPR_KERNEL_HEADERS": str(tree(tmp_path / "img"))}
    found, missing = toolchain.find_kernel_headers(RELEASE, environ, **node)
    assert sources(found) == ["env", "node", "kheaders", "image"]
    assert missing == []
    env, nodeh, kheaders, image = found
    assert env.bcc_kernel_source == str(tmp_path / "env")
    assert nodeh.bcc_kernel_source is None, "the node's tree is BCC's own default: no BCC_KERNEL_SOURCE"
    assert kheaders.path == node["cache_dir"] / f"kheaders-{RELEASE}"
    assert kheaders.bcc_kernel_source == str(kheaders.path)
    assert image.bcc_kernel_source == str(tmp_path / "img")


def test_node_tree_as_bcc_finds_it(node: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """source/ when build/ and source/ are both directories (Debian's split packages), else build/."""
    kdir = node["modules_dir"] / RELEASE
    tree(kdir / "source")
    (kdir / "build").mkdir()
    found, _ = toolchain.find_kernel_headers(RELEASE, {}, **node)
    assert [(h.source, h.path) for h in found] == [("node", kdir / "source")]
    assert toolchain.node_headers_path(RELEASE, node["modules_dir"], {"BCC_KERNEL_MODULES_SUFFIX": "x"}) == (
        kdir / "source"
    )
    (kdir / "build").rmdir()
    assert toolchain.node_headers_path(RELEASE, node["modules_dir"], {"BCC_KERNEL_MODULES_SUFFIX": "x"}) == kdir / "x"


def test_a_leftover_build_dir_without_headers_does_not_count(node: dict[str, Path]) -> None:
    """The Gentoo case of bcc PR 3588: build/ exists, its headers are gone."""
    (node["modules_dir"] / RELEASE / "build/include").mkdir(parents=True)
    found, missing = toolchain.find_kernel_headers(RELEASE, {}, **node)
    assert found == [] and "no node headers" in missing[0]


def test_unusable_env_and_image_trees_are_reported_not_used(tmp_path: Path, node: dict[str, Path]) -> None:
    environ = {"BCC_KERNEL_SOURCE": str(tmp_path / "nothing"), "KPR_KERNEL_HEADERS": str(tmp_path / "nothing")}
    found, missing = toolchain.find_kernel_headers(RELEASE, environ, **node)
    assert found == []
    assert f"BCC_KERNEL_SOURCE={tmp_path / 'nothing'} has no include/linux/kconfig.h" in missing
    assert f"KPR_KERNEL_HEADERS={tmp_path / 'nothing'} has no include/linux/kconfig.h" in missing


def test_kheaders_as_a_module(node: dict[str, Path]) -> None:
    kdir = node["modules_dir"] / RELEASE
    kdir.mkdir(parents=True)
    (kdir / "modules.dep").write_text("kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz\nkernel/lib/crc16.ko.xz:\n")
    assert toolchain.find_kernel_headers(RELEASE, {}, **node)[0] == []
    (kdir / "modules.dep").write_text("kernel/kernel/kheaders.ko.zst:\n")
    [found] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    assert (found.source, found.module) == ("kheaders", True)


def test_kheaders_already_extracted_needs_no_archive(node: dict[str, Path]) -> None:
    tree(node["cache_dir"] / f"kheaders-{RELEASE}")
    assert sources(toolchain.find_kernel_headers(RELEASE, {}, **node)[0]) == ["kheaders"]


# ---- kheaders extraction ----


def test_kheaders_are_extracted_once(node: dict[str, Path]) -> None:
    node["kheaders_archive"].parent.mkdir(parents=True)
    kheaders_archive(
        node["kheaders_archive"],
        {"./include/linux/kconfig.h": b"/* kconfig */\n", "./arch/x86/include/asm/a.h": b"a"},
        {"./include/linux/alias.h": "kconfig.h"},
    )
    [headers] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    toolchain.prepare(headers)
    assert (headers.path / "arch/x86/include/asm/a.h").read_bytes() == b"a"
    assert (headers.path / "include/linux/alias.h").read_bytes() == b"/* kconfig */\n"
    assert [p.name for p in node["cache_dir"].iterdir()] == [f"kheaders-{RELEASE}"], "no staging directory left"
    node["kheaders_archive"].unlink()
    toolchain.prepare(headers)  # already there: the archive is not read again


@pytest.mark.parametrize("data_filter", [True, False], ids=["tarfile-filter", "by-hand"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-out"])
def test_kheaders_members_never_land_outside_the_tree(
    tmp_path: Path, node: dict[str, Path], monkeypatch: pytest.MonkeyPatch, data_filter: bool, how: str
) -> None:
    """Refused, or (tarfile's filter, for an absolute name) put inside the tree; never written where they point."""
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    outside = tmp_path / "outside" / "escape.h"
    outside.parent.mkdir()
    members, symlinks = {"include/linux/kconfig.h": b""}, {}
    if how == "dotdot":
        members[os.path.relpath(outside, node["cache_dir"] / "x")] = b"x"
    elif how == "absolute":
        members[str(outside)] = b"x"
    else:
        symlinks["include/linux/up.h"] = os.path.relpath(outside, node["cache_dir"] / "x/include/linux")
    node["kheaders_archive"].parent.mkdir(parents=True)
    kheaders_archive(node["kheaders_archive"], members, symlinks)
    [headers] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    try:
        toolchain.prepare(headers)
    except NoKernelHeaders:
        assert not headers.path.exists()
        assert list(node["cache_dir"].iterdir()) == [], "the staging directory is removed"
    else:
        assert how == "absolute" and data_filter
        assert (headers.path / str(outside).lstrip("/")).read_bytes() == b"x"
    assert not outside.exists()


def test_an_archive_without_headers_leaves_nothing(node: dict[str, Path]) -> None:
    node["kheaders_archive"].parent.mkdir(parents=True)
    kheaders_archive(node["kheaders_archive"], {"README": b"not headers"})
    [headers] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    with pytest.raises(NoKernelHeaders, match=r"holds no include/linux/kconfig\.h"):
        toolchain.prepare(headers)
    assert list(node["cache_dir"].iterdir()) == []


def test_a_corrupt_archive_is_a_missing_tree(node: dict[str, Path]) -> None:
    node["kheaders_archive"].parent.mkdir(parents=True)
    node["kheaders_archive"].write_bytes(b"\xfd7zXZ\x00 truncated")
    [headers] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    with pytest.raises(NoKernelHeaders, match="extracting"):
        toolchain.prepare(headers)


# ---- compiling: BCC_KERNEL_SOURCE per tree, and the next tree when one fails ----


def test_bcc_environment_sets_clears_and_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/operator/choice")
    with toolchain.bcc_environment(KernelHeaders("image", tmp_path)):
        assert os.environ["BCC_KERNEL_SOURCE"] == str(tmp_path)
    with toolchain.bcc_environment(KernelHeaders("node", tmp_path)):
        assert "BCC_KERNEL_SOURCE" not in os.environ
    assert os.environ["BCC_KERNEL_SOURCE"] == "/operator/choice"
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    with pytest.raises(ZeroDivisionError), toolchain.bcc_environment(KernelHeaders("image", tmp_path)):
        raise ZeroDivisionError
    assert "BCC_KERNEL_SOURCE" not in os.environ


def test_a_tree_that_does_not_compile_falls_through_to_the_next(tmp_path: Path) -> None:
    node = KernelHeaders("node", tree(tmp_path / "node"))
    image = KernelHeaders("image", tree(tmp_path / "image"))
    seen: list[str | None] = []

    def build() -> str:
        seen.append(os.environ.get("BCC_KERNEL_SOURCE"))
        if len(seen) == 1:
            raise Exception("Failed to compile BPF module b'bpf/sock.c'")
        return "bpf object"

    assert toolchain.compile_bpf(build, "bpf/sock.c", [node, image]) == ("bpf object", image)
    assert seen == [None, str(tmp_path / "image")]


def test_a_failure_that_is_no_trees_is_raised_at_once(tmp_path: Path) -> None:
    """A map that cannot be pinned fails alike in every tree: no second compile of seconds, the error as it is."""
    node = KernelHeaders("node", tree(tmp_path / "node"))
    image = KernelHeaders("image", tree(tmp_path / "image"))
    tries: list[str] = []

    def build() -> None:
        tries.append("build")
        raise Exception("could not open bpf map: services4_v1, error: Operation not permitted")

    with pytest.raises(Exception, match="could not open bpf map"):
        toolchain.compile_bpf(build, "bpf/sock.c", [node, image])
    assert tries == ["build"]


def test_every_tree_failing_names_each_failure(tmp_path: Path, node: dict[str, Path]) -> None:
    node["kheaders_archive"].parent.mkdir(parents=True)
    node["kheaders_archive"].write_bytes(b"not xz")
    [kheaders] = toolchain.find_kernel_headers(RELEASE, {}, **node)[0]
    image = KernelHeaders("image", tree(tmp_path / "image"))

    def build() -> None:
        raise Exception("Failed to compile BPF module")

    with pytest.raises(RuntimeError, match=r"^kheaders \(.*extracting.* \| image \(.*Failed to compile"):
        toolchain.compile_bpf(build, "bpf/sock.c", [kheaders, image])


# ---- the scripts that make and use the shipped tree ----


@pytest.mark.parametrize("script", ["kernel-headers-tree.sh", "image.sh"])
def test_scripts_pass_shellcheck(script: str) -> None:
    assert shutil.which("shellcheck"), "shellcheck is missing (make setup installs it)"
    path = REPO / "scripts" / script
    assert path.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
