"""bpf/kpr.h compiled by BCC has exactly the layout of the ctypes mirror in kpr/datapath/abi.py."""

from __future__ import annotations

import ctypes
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.datapath import abi, bpfsys
from kpr.datapath.loader import unpin_all

pytestmark = pytest.mark.datapath

PROBE = """
#include "kpr.h"
int kpr_abi_probe(struct bpf_sock_addr *ctx) { return 1; }
"""


@pytest.fixture(scope="module")
def compiled() -> Iterator[object]:
    from bcc import BPF

    pin_dir = Path("/sys/fs/bpf") / f"kprabi-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    try:
        bpf = BPF(text=PROBE, cflags=[f'-DKPR_PIN_DIR="{pin_dir}"', f"-I{abi.BPF_DIR}"])
        yield bpf
        bpf.cleanup()
    finally:
        unpin_all(pin_dir)


def _fields(t: type) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every named field, BCC's implicit padding excluded."""
    if not hasattr(t, "_fields_"):
        return []
    return [
        (name, getattr(t, name).offset, getattr(t, name).size)
        for name, *_ in t._fields_
        if not name.startswith("__pad")
    ]


@pytest.mark.parametrize("name", sorted(abi.MAPS))
def test_map_layout_matches_the_mirror(compiled: object, name: str) -> None:
    table = compiled[name.encode()]  # type: ignore[index]
    spec = abi.MAPS[name]
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(spec.key), f"{name} key size"
    leaf = table.sLeaf if spec.percpu else table.Leaf  # BCC's per-CPU Leaf is the array over CPUs
    assert ctypes.sizeof(leaf) == ctypes.sizeof(spec.value), f"{name} value size"
    assert _fields(table.Key) == _fields(spec.key), f"{name} key fields"
    assert _fields(leaf) == _fields(spec.value), f"{name} value fields"


def test_attach_type_numbers_match_bcc() -> None:
    from bcc import BPFAttachType

    bcc_names = {
        "connect4": BPFAttachType.CGROUP_INET4_CONNECT,
        "connect6": BPFAttachType.CGROUP_INET6_CONNECT,
        "sendmsg4": BPFAttachType.CGROUP_UDP4_SENDMSG,
        "sendmsg6": BPFAttachType.CGROUP_UDP6_SENDMSG,
        "recvmsg4": BPFAttachType.CGROUP_UDP4_RECVMSG,
        "recvmsg6": BPFAttachType.CGROUP_UDP6_RECVMSG,
        "getpeername4": BPFAttachType.CGROUP_INET4_GETPEERNAME,
        "getpeername6": BPFAttachType.CGROUP_INET6_GETPEERNAME,
    }
    assert {k: int(v) for k, v in bcc_names.items()} == bpfsys.ATTACH_TYPES


def test_pinned_maps_have_the_mirrored_sizes(compiled: object) -> None:
    for name, spec in abi.MAPS.items():
        table = compiled[name.encode()]  # type: ignore[index]
        info = bpfsys.map_info(table.map_fd)
        assert info.key_size == ctypes.sizeof(spec.key), name
        assert info.value_size == ctypes.sizeof(spec.value), name


def test_the_migration_planner_reads_every_maps_shape_from_the_header_as_bcc_creates_it(compiled: object) -> None:
    """kpr.datapath.migrate compares pinned maps with the shapes it reads from bpf/kpr.h; a misread shape would move
    every map aside on every restart (or none when one changed)."""
    from kpr.datapath.loader import DEFAULT_MAP_SIZES
    from kpr.datapath.migrate import Shape, declared_shapes

    declared = declared_shapes(DEFAULT_MAP_SIZES)
    assert set(declared) == set(abi.MAPS)
    for name in abi.MAPS:
        info = bpfsys.map_info(compiled[name.encode()].map_fd)  # type: ignore[index]
        assert Shape(info.type, info.key_size, info.value_size, info.max_entries, info.flags) == declared[name], name
