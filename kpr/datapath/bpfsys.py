"""The bpf(2) system calls kpr needs outside of BCC's compile-and-load, through ctypes.

BCC compiles and loads the programs; everything that works on pinned objects (opening maps by path, reading and
writing them in batches, finding and detaching the programs on a cgroup) is here, so `kpr services` or `kpr cleanup`
never need a compiler and work when the agent is down.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

CData = Any  # a ctypes instance (kpr.datapath.abi.CData; bpfsys stays free of kpr imports)

_libc = ctypes.CDLL(None, use_errno=True)

# __NR_bpf per architecture (platform.machine()), as the kernel's syscall tables number it (musl's
# arch/*/bits/syscall.h.in list them): arm64 and riscv64 use asm-generic/unistd.h's 280, the others their own.
BPF_SYSCALLS = {
    "x86_64": 321,
    "i686": 357,
    "aarch64": 280,
    "riscv64": 280,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
    "armv7l": 386,  # ARM EABI
}
_NR_BPF = BPF_SYSCALLS.get(platform.machine())

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0

# enum bpf_attach_type values for the cgroup sock_addr hooks kpr uses.
ATTACH_TYPES = {
    "connect4": 10,
    "connect6": 11,
    "sendmsg4": 14,
    "sendmsg6": 15,
    "recvmsg4": 19,
    "recvmsg6": 20,
    "getpeername4": 29,
    "getpeername6": 30,
}


class BpfError(OSError):
    """A failed bpf(2) call; errno is set, the message names the command and the object."""


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info up to and including name.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def _bpf(cmd: int, attr: ctypes.Structure, action: str, obj: str = "") -> int:
    """One bpf(2) call; the error message ("<action> <obj>: <strerror>") is only built when it fails."""
    if _NR_BPF is None:
        raise BpfError(errno.ENOSYS, f"{action} {obj}: no bpf(2) system call number known for {platform.machine()}")
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{action} {obj}: {os.strerror(err)}".replace(" :", ":"))
    return int(ret)


def _addr(obj: CData | None) -> int:
    return ctypes.addressof(obj) if obj is not None else 0


def obj_pin(fd: int, path: str) -> None:
    raw = path.encode()
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0, bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    raw = path.encode()
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


@cache
def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has (the kernel sizes them by possible CPUs)."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    total = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapInfo(
        info.id, info.type, info.key_size, info.value_size, info.max_entries, info.map_flags, info.name.decode()
    )


class Map:
    """A BPF map opened from its pin, with fixed ctypes key and value types."""

    def __init__(self, path: str, key_type: Any, value_type: Any, *, percpu: bool = False) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.label = os.path.basename(path)
        self.fd = obj_get(path)
        try:
            self.info = map_info(self.fd)
        except BpfError:
            os.close(self.fd)
            raise
        want_value = ctypes.sizeof(value_type)
        if self.info.key_size != ctypes.sizeof(key_type) or self.info.value_size != want_value:
            os.close(self.fd)
            raise BpfError(
                errno.EINVAL,
                f"{path}: pinned map has key/value sizes {self.info.key_size}/{self.info.value_size}, "
                f"this kpr expects {ctypes.sizeof(key_type)}/{want_value}; run `kpr cleanup` after an ABI change",
            )
        # Per-CPU values come back as one 8-byte-aligned slot per possible CPU.
        self._slot = (want_value + 7) & ~7
        self._value_buf_size = self._slot * possible_cpus() if percpu else want_value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.label

    def lookup(self, key: CData) -> CData | None:
        buf = ctypes.create_string_buffer(self._value_buf_size)
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(key), value=_addr(buf))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr, "lookup in", self.label)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return self.value_type.from_buffer_copy(buf.raw[: ctypes.sizeof(self.value_type)])

    def lookup_percpu(self, key: CData) -> list[CData]:
        buf = ctypes.create_string_buffer(self._value_buf_size)
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(key), value=_addr(buf))
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "lookup in", self.label)
        size = ctypes.sizeof(self.value_type)
        return [
            self.value_type.from_buffer_copy(buf.raw[i * self._slot : i * self._slot + size])
            for i in range(possible_cpus())
        ]

    def update(self, key: CData, value: CData) -> None:
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(key), value=_addr(value), flags=BPF_ANY)
        _bpf(BPF_MAP_UPDATE_ELEM, attr, "update in", self.label)

    def delete(self, key: CData) -> bool:
        """Delete a key; False when it was not there (ENOENT on delete is success for a reconciler)."""
        attr = _MapElemAttr(map_fd=self.fd, key=_addr(key))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr, "delete in", self.label)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[CData]:
        key = self.key_type()
        next_key = self.key_type()
        attr = _MapElemAttr(map_fd=self.fd, key=0, value=_addr(next_key))
        while True:
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, "iterate", self.label)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            ctypes.memmove(ctypes.addressof(key), ctypes.addressof(next_key), ctypes.sizeof(key))
            yield self.key_type.from_buffer_copy(key)
            attr.key = _addr(key)

    def items(self, chunk: int = 4096) -> list[tuple[CData, CData]]:
        """Every entry, read in batches (BPF_MAP_LOOKUP_BATCH) with a key-by-key fallback."""
        if self.percpu:
            raise BpfError(errno.EINVAL, f"{self.label} is per-CPU; use lookup_percpu")
        try:
            return self._items_batched(chunk)
        except BpfError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, 524):  # 524: ENOTSUPP, batch ops unsupported
                raise
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted while we iterated
                out.append((key, value))
        return out

    def _items_batched(self, chunk: int) -> list[tuple[CData, CData]]:
        keys = (self.key_type * chunk)()
        values = (self.value_type * chunk)()
        token_in = ctypes.create_string_buffer(max(8, ctypes.sizeof(self.key_type)))
        token_out = ctypes.create_string_buffer(max(8, ctypes.sizeof(self.key_type)))
        out: list[tuple[CData, CData]] = []
        first = True
        while True:
            attr = _BatchAttr(
                in_batch=0 if first else _addr(token_in),
                out_batch=_addr(token_out),
                keys=_addr(keys),
                values=_addr(values),
                count=chunk,
                map_fd=self.fd,
            )
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr, "read", self.label)
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    raise
                done = True  # ENOENT: the last (possibly empty) batch
            ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
            raw_keys, raw_values = bytes(keys)[: attr.count * ksize], bytes(values)[: attr.count * vsize]
            for i in range(attr.count):
                out.append(
                    (
                        self.key_type.from_buffer_copy(raw_keys, i * ksize),
                        self.value_type.from_buffer_copy(raw_values, i * vsize),
                    )
                )
            if done:
                return out
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False

    def update_batch(self, keys: list[CData], values: list[CData]) -> None:
        """Write many entries in one system call, in order (BPF_MAP_UPDATE_BATCH).

        On failure the BpfError carries `done`: the kernel stops at the first failing entry and reports how many
        entries before it were written.
        """
        if not keys:
            return
        key_array = (self.key_type * len(keys))(*keys)
        value_array = (self.value_type * len(values))(*values)
        self._update_batch_at(_addr(key_array), _addr(value_array), len(keys))

    def update_batch_packed(self, keys: bytes, values: bytes, count: int) -> None:
        """update_batch() for entries already packed: `count` keys back to back in `keys`, the values in `values`
        (each exactly the bytes of a key_type / value_type), so no ctypes object is made per entry."""
        if not count:
            return
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        if len(keys) != count * ksize or len(values) != count * vsize:
            raise ValueError(f"{self.label}: {count} entries need {count * ksize} + {count * vsize} bytes")
        key_buf = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        value_buf = (ctypes.c_char * len(values)).from_buffer_copy(values)
        self._update_batch_at(_addr(key_buf), _addr(value_buf), count)

    def _update_batch_at(self, keys: int, values: int, count: int) -> None:
        attr = _BatchAttr(keys=keys, values=values, count=count, map_fd=self.fd)
        try:
            _bpf(BPF_MAP_UPDATE_BATCH, attr, "batch update in", self.label)
        except BpfError as e:
            e.done = int(attr.count)  # type: ignore[attr-defined]
            raise


# ---- programs attached to a cgroup ----


@dataclass(frozen=True, slots=True)
class AttachedProgram:
    hook: str  # a key of ATTACH_TYPES
    id: int
    name: str


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id), f"open program id {prog_id}")


def prog_name(fd: int) -> str:
    info = _ProgInfo()
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)), "prog info")
    return info.name.decode()


def cgroup_programs(cgroup_fd: int) -> list[AttachedProgram]:
    """The programs attached directly to a cgroup at kpr's hooks (not inherited ones)."""
    found = []
    for hook, attach_type in ATTACH_TYPES.items():
        ids = (ctypes.c_uint32 * 64)()
        attr = _QueryAttr(target_fd=cgroup_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=64)
        _bpf(BPF_PROG_QUERY, attr, f"query {hook} programs")
        for prog_id in ids[: attr.prog_cnt]:
            try:
                fd = prog_get_fd_by_id(prog_id)
            except BpfError as e:
                if e.errno == errno.ENOENT:  # detached meanwhile
                    continue
                raise
            try:
                found.append(AttachedProgram(hook, prog_id, prog_name(fd)))
            finally:
                os.close(fd)
    return found


def cgroup_attach(cgroup_fd: int, hook: str, prog_fd: int) -> None:
    """Attach a program in the cgroup's exclusive (non-multi) mode: it replaces the one attached there in one step."""
    attr = _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=ATTACH_TYPES[hook])
    _bpf(BPF_PROG_ATTACH, attr, f"attach {hook} program")


def cgroup_detach(cgroup_fd: int, hook: str, prog_id: int) -> bool:
    """Detach one program by id; False when it was no longer attached."""
    try:
        fd = prog_get_fd_by_id(prog_id)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    try:
        attr = _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=fd, attach_type=ATTACH_TYPES[hook])
        _bpf(BPF_PROG_DETACH, attr, f"detach {hook} program {prog_id}")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)
    return True
