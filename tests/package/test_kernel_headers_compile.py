"""Every kernel headers fallback of kpr.datapath.toolchain compiles the real programs with the real BCC.

The node's own headers are what every other datapath test compiles with; here BCC gets only the fallbacks: the
kernel's kheaders archive (made from the image's tree, since this kernel has none: CONFIG_IKHEADERS is rare), and a
tree that looks usable but does not compile, which must be passed over for the next one. Each test pins into a
bpffs directory of its own and removes it.
"""

from __future__ import annotations

import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.datapath import abi, toolchain
from kpr.datapath.loader import SocketLB, TcLB, pinned_maps, unpin_all
from kpr.datapath.toolchain import KernelHeaders

pytestmark = [pytest.mark.package, pytest.mark.datapath, pytest.mark.slow]


@pytest.fixture
def bpffs_dir() -> Iterator[Path]:
    path = Path("/sys/fs/bpf") / f"kprhdr-{uuid.uuid4().hex[:8]}"
    yield path
    if path.exists():
        try:
            unpin_all(path)
        finally:
            if path.exists():
                for pin in path.iterdir():
                    pin.unlink()
                path.rmdir()


def only(monkeypatch: pytest.MonkeyPatch, candidates: list[KernelHeaders]) -> None:
    """What the loader finds on this "node": these trees and nothing else."""
    monkeypatch.setattr(toolchain, "find_kernel_headers", lambda *a, **k: (candidates, []))


def load_both(bpffs_dir: Path) -> str:
    socket_lb = SocketLB(bpffs_dir)
    socket_lb.load()
    tc = TcLB(bpffs_dir, headers=socket_lb.headers)
    tc.load()
    assert pinned_maps(bpffs_dir) == sorted(abi.MAPS)
    assert socket_lb.headers is not None and tc.headers == socket_lb.headers  # tc.c in the tree sock.c compiled in
    return socket_lb.headers.describe()


def test_kheaders_archive_is_extracted_and_compiled_against(
    shipped_headers: Path, tmp_path: Path, bpffs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "kheaders.tar.xz"
    with tarfile.open(archive, "w:xz", preset=0) as tar:  # as the kernel builds it: ./include, ./arch/<arch>/include
        tar.add(shipped_headers, arcname=".")
    found, _ = toolchain.find_kernel_headers(
        "6.18.0-kprtest", {}, modules_dir=tmp_path / "modules", kheaders_archive=archive, cache_dir=tmp_path / "cache"
    )
    assert [h.source for h in found] == ["kheaders"]
    only(monkeypatch, found)
    assert load_both(bpffs_dir) == f"kheaders ({tmp_path}/cache/kheaders-6.18.0-kprtest)"


def test_a_tree_that_does_not_compile_is_passed_over(
    shipped_headers: Path, tmp_path: Path, bpffs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree with kconfig.h and nothing else passes BCC's own check but not clang: the next tree is used. That it
    failed at all shows BCC compiled in the tree it was given (BCC_KERNEL_SOURCE), not in the node's."""
    broken = tmp_path / "broken"
    (broken / "include/linux").mkdir(parents=True)
    (broken / "include/linux/kconfig.h").write_text("#error not a real kernel tree\n")
    only(monkeypatch, [KernelHeaders("env", broken), KernelHeaders("image", shipped_headers)])
    assert load_both(bpffs_dir) == f"image ({shipped_headers})"
