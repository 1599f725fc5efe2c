"""The bulk first sync against the kernel's maps: one BPF_MAP_UPDATE_BATCH per map (hash and LPM trie) holds exactly
what the service-by-service path writes, and a map that fills up mid-batch is reported with how far it got and
undone (tests/unit/test_bulk_sync.py checks the same against the in-memory maps, with more inputs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.datapath import abi
from kpr.datapath.loader import unpin_all
from kpr.datapath.writers import PinnedMapWriter
from kpr.reconcile.reconciler import BulkLoadError, Reconciler
from tests.unit.test_bulk_sync import corpus, one_by_one, state, translated

pytestmark = pytest.mark.datapath

PROBE = """
#include "kpr.h"
int kpr_bulk_probe(struct bpf_sock_addr *ctx) { return 1; }
"""
STATE_MAPS = ["backends4", "backends6", "rev_nat4", "rev_nat6", "svc_names", "affinity_match", "src_ranges4",
              "src_ranges6", "services4", "services6"]  # fmt: skip


def pinned(**sizes: int) -> Iterator[Path]:
    """Every map of kpr.h created and pinned in a directory of its own (BCC), removed afterwards."""
    from bcc import BPF

    pin_dir = Path("/sys/fs/bpf") / f"kprbulk-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    try:
        flags = [f"-D{name}={value}" for name, value in sizes.items()]
        bpf = BPF(text=PROBE, cflags=[f'-DKPR_PIN_DIR="{pin_dir}"', f"-I{abi.BPF_DIR}", *flags])
        yield pin_dir
        bpf.cleanup()
    finally:
        unpin_all(pin_dir)


@pytest.fixture
def maps() -> Iterator[Path]:
    yield from pinned()


@pytest.fixture
def small_maps() -> Iterator[Path]:
    yield from pinned(KPR_BACKENDS_MAX=8)


def contents(writer: PinnedMapWriter) -> dict[str, dict[bytes, bytes]]:
    return {name: {bytes(k): bytes(v) for k, v in writer.items(name)} for name in STATE_MAPS}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_batch_per_map_writes_what_service_by_service_writes(maps: Path, seed: int) -> None:
    work = translated(*corpus(seed, services=30))
    incremental, _ = one_by_one(work)
    writer = PinnedMapWriter(maps)
    try:
        bulk = Reconciler(writer)
        bulk.load_all(work)
        want = {name: incremental.writer.tables[name] for name in STATE_MAPS}  # type: ignore[attr-defined]
        assert contents(writer) == want
        assert any(want["src_ranges4"].values()) and any(want["affinity_match"]) and any(want["services6"])
        assert state(bulk) == state(incremental)
        assert all(counts == (0, 0, 0) for counts in bulk.drift().values())
    finally:
        writer.close()


def test_a_map_that_fills_up_mid_batch_is_undone(small_maps: Path) -> None:
    work = translated(*corpus(0, services=30))

    class Optimistic(PinnedMapWriter):  # believes there is room: the kernel is the one to say no, mid-batch
        def capacity(self, map_name: str) -> int:
            return 1 << 20

    writer = Optimistic(small_maps)
    try:
        rec = Reconciler(writer)
        with pytest.raises(BulkLoadError, match=r"into backends4 failed after 8: backends4: map is full"):
            rec.load_all(work)
        assert all(not entries for entries in contents(writer).values())
        assert rec.pristine()
    finally:
        writer.close()
