"""The type of the file system a path or descriptor is on (statfs(2)'s f_type), on any architecture.

glibc's struct statfs starts with f_type, a long (__fsword_t), except on s390x where it is an unsigned int (as in the
kernel's own struct there); reading it as a native ctypes value takes the host's word size and byte order as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

BPF_FS_MAGIC = 0xCAFE4A11  # linux/magic.h
CGROUP2_SUPER_MAGIC = 0x63677270

_F_TYPE = ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux, less on 32-bit: room to spare


def fs_type(target: str | os.PathLike[str] | int) -> int:
    """The magic number (unsigned, 32 bits) of the file system `target` (a path, or an open descriptor) is on.
    OSError when statfs(2) / fstatfs(2) fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    ret = libc.fstatfs(target, buf) if isinstance(target, int) else libc.statfs(os.fsencode(target), buf)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(_F_TYPE.from_buffer(buf).value) & 0xFFFFFFFF
