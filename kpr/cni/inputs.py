"""What the container runtime hands kpr-cni, taken in without trusting it: stdin (bounded in size, in time and in
JSON nesting, decoded without deep recursion) and CNI_NETNS (checked to be a network namespace, opened without
blocking, before anything enters it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import select
import stat
import time
from itertools import accumulate
from typing import IO, Any

from kpr.cni.errors import ERR_DECODE, ERR_IO, CNIError

MAX_CONFIG_BYTES = 1 << 20  # a conflist entry plus prevResult is a few KiB; libcni's own are far below this
MAX_JSON_DEPTH = 64  # levels of arrays and objects; a CNI configuration with its prevResult uses about 5

# ---- stdin


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


def read_stdin(stream: IO[bytes] | None, limit: int, timeout: float) -> bytes:
    """All of stdin, at most `limit` bytes, read within `timeout` seconds (a runtime writes the configuration and
    closes the pipe). CNIError 5 when stdin is closed, unreadable or not closed in time; 6 when it is too large."""
    if stream is None:
        raise CNIError(ERR_IO, "cannot read the network configuration: stdin is closed")
    too_large = CNIError(
        ERR_DECODE,
        f"the network configuration on stdin is larger than {_size(limit)}",
        "kpr-cni reads at most that much; a CNI configuration with its prevResult is a few KiB",
    )
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # not a file (a test's BytesIO): nothing to wait for
        try:
            data = stream.read(limit + 1)
        except OSError as e:
            raise CNIError(ERR_IO, "cannot read the network configuration from stdin", str(e)) from None
        if len(data) > limit:
            raise too_large from None
        return data
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, math.ceil(left * 1000))):
            raise CNIError(
                ERR_IO,
                f"the network configuration on stdin did not end within {timeout:g} s",
                f"read {size} bytes; the runtime must close the plugin's stdin after writing the configuration",
            )
        try:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
        except BlockingIOError:  # an inherited O_NONBLOCK stdin: poll again
            continue
        except OSError as e:
            raise CNIError(ERR_IO, f"cannot read the network configuration from stdin: {e.strerror}") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_large


# ---- JSON

# A JSON string (possessive, so matching is linear and never backtracks), and a run of anything but brackets.
_STRINGS = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in `text`, brackets inside strings not counted; without recursion, in
    linear time (a loop in C). For text that is not JSON the answer may be too high, never too low for the part a
    parser would accept: strings are delimited the way JSON delimits them."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"the number {number[:40]} is out of range")
    return value


def decode_config(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of `raw` (UTF-8, at most `max_depth` levels deep, no NaN or infinities, which could not be
    printed back as JSON); CNIError 6 otherwise. The depth is checked before json.loads, which recurses once per
    level; a RecursionError is caught all the same."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CNIError(ERR_DECODE, "the network configuration on stdin is not UTF-8", str(e)) from None
    if json_depth(text) > max_depth:
        raise CNIError(
            ERR_DECODE,
            f"the network configuration on stdin is nested deeper than {max_depth} levels",
            "a CNI configuration with its prevResult is a few levels deep",
        )
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise CNIError(ERR_DECODE, "the network configuration on stdin is nested too deeply to decode") from None
    except ValueError as e:
        raise CNIError(ERR_DECODE, "the network configuration on stdin is not valid JSON", str(e)[:500]) from None


# ---- CNI_NETNS

NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file: its CLONE_NEW* type (linux/nsfs.h, Linux 4.11)
NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files (linux/magic.h)
CLONE_NEWNET = 0x40000000
_NAMESPACE_KINDS = {
    0x00020000: "mount",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    0x00000080: "time",
}
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NetnsError(Exception):
    """CNI_NETNS is not a network namespace; `missing` when nothing is there at all."""

    def __init__(self, path: str, reason: str, *, missing: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.missing = missing


def _file_kind(mode: int) -> str | None:
    """What a file that cannot be a namespace is (None for a regular file: a namespace file looks like one)."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a file")


def _fs_magic(fd: int) -> int | None:
    """statfs f_type of the file system `fd` is on (None when fstatfs fails)."""
    from kpr.datapath.statfs import fs_type

    try:
        return fs_type(fd)
    except OSError:
        return None


def _opening_error(path: str, e: OSError) -> NetnsError:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return NetnsError(path, "does not exist", missing=True)
    return NetnsError(path, f"cannot be opened: {e.strerror or e}")


def open_netns(path: str) -> int:
    """A file descriptor of the network namespace at `path` (a bind mount such as /run/netns/NAME, or
    /proc/PID/ns/net). NetnsError when it is anything else; this never blocks: the path is stat()ed first and only
    a regular file is opened (O_NONBLOCK as well, should it be swapped for a FIFO in between); the descriptor, not
    the path, is what the caller enters, so what was checked is what is entered."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
    except OSError as e:
        raise _opening_error(path, e) from None
    if kind is not None:
        raise NetnsError(path, f"it is {kind}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise _opening_error(path, e) from None
    try:
        kind = _file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NetnsError(path, f"it is {kind}")
        magic = _fs_magic(fd)
        if magic is not None and magic != NSFS_MAGIC:
            raise NetnsError(path, "it is a regular file, not a namespace file (an unmounted namespace?)")
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as e:
            raise NetnsError(path, f"it is not a namespace file (NS_GET_NSTYPE: {e.strerror})") from None
        if nstype != CLONE_NEWNET:
            raise NetnsError(path, f"it is a namespace of another kind ({_NAMESPACE_KINDS.get(nstype, hex(nstype))})")
    except BaseException:
        os.close(fd)
        raise
    return fd
