"""The map-writer protocol and its three implementations.

- PinnedMapWriter: the real maps, opened from their pins in a bpffs directory.
- MemoryMapWriter: an in-memory stand-in keyed by the key's raw bytes, so a padding bug that would split one logical
  key into two hash entries shows up in unit tests too. It enforces max_entries like the kernel (E2BIG).
- FaultyMapWriter: wraps another writer and fails chosen operations, for reliability tests.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from kpr.datapath import abi, codec
from kpr.datapath.abi import CData
from kpr.datapath.bpfsys import BpfError, Map


class MapWriteError(Exception):
    def __init__(self, map_name: str, err: int, detail: str = "", done: int = 0) -> None:
        self.map_name = map_name
        self.errno = err
        self.done = done  # for update_many: how many entries were written before the failure
        reason = "map is full" if err == errno.E2BIG else os.strerror(err)
        super().__init__(f"{map_name}: {reason}{': ' + detail if detail else ''}")


class MapWriter(Protocol):
    def update(self, map_name: str, key: CData, value: CData) -> None: ...

    def update_many(self, map_name: str, keys: list[CData], values: list[CData]) -> None:
        """Write entries in order; on failure MapWriteError.done says how many were written."""

    def update_packed(self, map_name: str, keys: bytes, values: bytes, count: int) -> None:
        """update_many for entries already packed (`count` keys back to back, the values likewise): one batch call,
        no object per entry. On failure MapWriteError.done says how many were written."""

    def delete(self, map_name: str, key: CData) -> None:
        """Delete; a missing key is success."""

    def items(self, map_name: str) -> list[tuple[CData, CData]]: ...

    def lookup(self, map_name: str, key: CData) -> CData | None: ...

    def capacity(self, map_name: str) -> int: ...


def _update_one_by_one(writer: MapWriter, map_name: str, keys: list[CData], values: list[CData]) -> None:
    """update_many for writers without a batch call: in order, reporting how many were written on failure."""
    for done, (key, value) in enumerate(zip(keys, values, strict=True)):
        try:
            writer.update(map_name, key, value)
        except MapWriteError as e:
            e.done = done
            raise


def _unpacked(map_name: str, keys: bytes, values: bytes, count: int) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) bytes of each of `count` packed entries of map `map_name`."""
    spec = abi.MAPS[map_name]
    ksize, vsize = ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)
    if len(keys) != count * ksize or len(values) != count * vsize:
        raise ValueError(f"{map_name}: {count} entries need {count * ksize} + {count * vsize} bytes")
    yield from zip(codec.split_packed(keys, ksize), codec.split_packed(values, vsize), strict=True)


class PinnedMapWriter:
    """Writes the maps pinned under `bpffs_dir`."""

    def __init__(self, bpffs_dir: str | Path, names: list[str] | None = None) -> None:
        self.bpffs_dir = Path(bpffs_dir)
        self.maps: dict[str, Map] = {}
        try:
            for name in names or [n for n, spec in abi.MAPS.items() if not (spec.percpu or spec.programs)]:
                spec = abi.MAPS[name]
                self.maps[name] = Map(str(abi.map_pin(self.bpffs_dir, name)), spec.key, spec.value, percpu=spec.percpu)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def update(self, map_name: str, key: CData, value: CData) -> None:
        try:
            self.maps[map_name].update(key, value)
        except BpfError as e:
            raise MapWriteError(map_name, e.errno or errno.EIO) from e

    def update_many(self, map_name: str, keys: list[CData], values: list[CData]) -> None:
        try:
            self.maps[map_name].update_batch(keys, values)
        except BpfError as e:
            raise MapWriteError(map_name, e.errno or errno.EIO, done=getattr(e, "done", 0)) from e

    def update_packed(self, map_name: str, keys: bytes, values: bytes, count: int) -> None:
        try:
            self.maps[map_name].update_batch_packed(keys, values, count)
        except BpfError as e:
            raise MapWriteError(map_name, e.errno or errno.EIO, done=getattr(e, "done", 0)) from e

    def delete(self, map_name: str, key: CData) -> None:
        try:
            self.maps[map_name].delete(key)
        except BpfError as e:
            raise MapWriteError(map_name, e.errno or errno.EIO) from e

    def items(self, map_name: str) -> list[tuple[CData, CData]]:
        return self.maps[map_name].items()

    def lookup(self, map_name: str, key: CData) -> CData | None:
        return self.maps[map_name].lookup(key)

    def capacity(self, map_name: str) -> int:
        return self.maps[map_name].info.max_entries


class MemoryMapWriter:
    """Maps as dicts of raw key bytes -> raw value bytes, with the kernel's size limit."""

    def __init__(self, capacities: dict[str, int] | None = None) -> None:
        self.tables: dict[str, dict[bytes, bytes]] = {name: {} for name in abi.MAPS}
        self.capacities = {name: 1 << 20 for name in abi.MAPS} | (capacities or {})
        self.ops = 0  # every update and delete, for "one change costs O(1) operations" assertions

    def update(self, map_name: str, key: CData, value: CData) -> None:
        spec = abi.MAPS[map_name]
        assert type(key) is spec.key and type(value) is spec.value, f"{map_name}: wrong key/value type"
        table = self.tables[map_name]
        raw = bytes(key)
        if raw not in table and len(table) >= self.capacities[map_name]:
            raise MapWriteError(map_name, errno.E2BIG)
        self.ops += 1
        table[raw] = bytes(value)

    def update_many(self, map_name: str, keys: list[CData], values: list[CData]) -> None:
        _update_one_by_one(self, map_name, keys, values)

    def update_packed(self, map_name: str, keys: bytes, values: bytes, count: int) -> None:
        table, limit = self.tables[map_name], self.capacities[map_name]
        entries = list(_unpacked(map_name, keys, values, count))
        if len(table) + count <= limit:  # room for all, even if every key is new
            self.ops += count
            table.update(entries)
            return
        for i, (key, value) in enumerate(entries):
            if key not in table and len(table) >= limit:
                raise MapWriteError(map_name, errno.E2BIG, done=i)
            self.ops += 1
            table[key] = value

    def delete(self, map_name: str, key: CData) -> None:
        assert type(key) is abi.MAPS[map_name].key, f"{map_name}: wrong key type"
        self.ops += 1
        self.tables[map_name].pop(bytes(key), None)

    def items(self, map_name: str) -> list[tuple[CData, CData]]:
        spec = abi.MAPS[map_name]
        return [
            (spec.key.from_buffer_copy(k), spec.value.from_buffer_copy(v)) for k, v in self.tables[map_name].items()
        ]

    def lookup(self, map_name: str, key: CData) -> CData | None:
        raw = self.tables[map_name].get(bytes(key))
        return None if raw is None else abi.MAPS[map_name].value.from_buffer_copy(raw)

    def capacity(self, map_name: str) -> int:
        return self.capacities[map_name]


class FaultyMapWriter:
    """Delegates to `inner` but raises MapWriteError when `fail(map_name, op_index)` says so."""

    def __init__(self, inner: MapWriter, fail: Callable[[str, int], int | None]) -> None:
        self.inner = inner
        self.fail = fail  # returns an errno to fail with, or None
        self.index = 0

    def _maybe_fail(self, map_name: str) -> None:
        err = self.fail(map_name, self.index)
        self.index += 1
        if err is not None:
            raise MapWriteError(map_name, err, "injected")

    def update(self, map_name: str, key: CData, value: CData) -> None:
        self._maybe_fail(map_name)
        self.inner.update(map_name, key, value)

    def update_many(self, map_name: str, keys: list[CData], values: list[CData]) -> None:
        _update_one_by_one(self, map_name, keys, values)

    def update_packed(self, map_name: str, keys: bytes, values: bytes, count: int) -> None:
        """Entry by entry, so a failure can be injected at any of them (what went before it is written)."""
        spec = abi.MAPS[map_name]
        for done, (key, value) in enumerate(_unpacked(map_name, keys, values, count)):
            try:
                self.update(map_name, spec.key.from_buffer_copy(key), spec.value.from_buffer_copy(value))
            except MapWriteError as e:
                e.done = done
                raise

    def delete(self, map_name: str, key: CData) -> None:
        self._maybe_fail(map_name)
        self.inner.delete(map_name, key)

    def items(self, map_name: str) -> list[tuple[CData, CData]]:
        return self.inner.items(map_name)

    def lookup(self, map_name: str, key: CData) -> CData | None:
        return self.inner.lookup(map_name, key)

    def capacity(self, map_name: str) -> int:
        return self.inner.capacity(map_name)
