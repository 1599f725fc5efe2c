"""Nothing in kpr assumes x86_64 or a little-endian host: the bpf(2) number comes from a per-architecture table, fields
in network order are built with the host's byte order, statfs(2) is read with the host's types.

The live checks run on whatever machine runs the tests (and would fail there on a wrong number or layout); the
static one fails on any host as soon as a fixed "little" creeps back in.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import os
import platform
import socket
import subprocess
from pathlib import Path

import pytest

import kpr
from kpr.datapath import abi, bpfsys, codec, netns
from kpr.datapath.statfs import fs_type

pytestmark = pytest.mark.unit

PROC_SUPER_MAGIC = 0x9FA0
NSFS_MAGIC = 0x6E736673


def test_the_bpf_syscall_number_is_known_for_this_machine() -> None:
    assert platform.machine() in bpfsys.BPF_SYSCALLS, f"add {platform.machine()}'s __NR_bpf to bpfsys.BPF_SYSCALLS"


def test_the_bpf_syscall_number_is_the_c_librarys() -> None:
    """What <sys/syscall.h> says for this machine, where a C preprocessor is installed."""
    try:
        out = subprocess.run(
            ["cc", "-E", "-dM", "-"], input="#include <sys/syscall.h>\n", capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no C preprocessor")
    numbers = [line.split()[2] for line in out.stdout.splitlines() if line.startswith("#define __NR_bpf ")]
    if out.returncode != 0 or not numbers:
        pytest.skip("no <sys/syscall.h> with __NR_bpf")
    assert bpfsys.BPF_SYSCALLS[platform.machine()] == int(numbers[0], 0)


def test_a_bpf_call_reaches_bpf(tmp_path: Path) -> None:
    """BPF_OBJ_GET of a path that does not exist: bpf(2) answers ENOENT (EPERM where unprivileged bpf is off and we
    are not root). Another system call under a wrong number would say ENOSYS, EBADF, EFAULT or EINVAL instead."""
    with pytest.raises(bpfsys.BpfError) as failed:
        bpfsys.obj_get(str(tmp_path / "missing"))
    assert failed.value.errno in (errno.ENOENT, errno.EPERM), failed.value


def test_network_order_fields_hold_network_order_bytes() -> None:
    assert bytes(ctypes.c_uint32(abi.be32_of_ipv4("10.96.0.1"))) == socket.inet_aton("10.96.0.1")
    assert abi.ipv4_of_be32(abi.be32_of_ipv4("10.96.0.1")) == "10.96.0.1"
    v6 = "fd00:96::1:2"
    assert bytes(abi.be32x4_of_ipv6(v6)) == socket.inet_pton(socket.AF_INET6, v6)
    assert abi.ipv6_of_be32x4(abi.be32x4_of_ipv6(v6)) == v6
    assert bytes(ctypes.c_uint16(abi.be16_of_port(8080))) == (8080).to_bytes(2, "big")
    assert abi.port_of_be16(abi.be16_of_port(8080)) == 8080
    # An LPM key compares bits from the first byte on: the id, then the address, must be big-endian in memory.
    _, key = codec.src_range_entry(0x01020304, "192.0.2.0/24")
    assert bytes(key)[4:12] == bytes([1, 2, 3, 4, 192, 0, 2, 0])
    assert codec.decode_src_range(key) == (0x01020304, "192.0.2.0/24")


def test_statfs_reads_the_file_system_type_with_the_hosts_types() -> None:
    assert fs_type("/proc") == PROC_SUPER_MAGIC
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert fs_type(fd) == NSFS_MAGIC
    finally:
        os.close(fd)
    with pytest.raises(OSError) as failed:
        fs_type("/nonexistent/kpr")
    assert failed.value.errno == errno.ENOENT


def test_the_netns_cookie_is_read_as_a_native_u64() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, netns.SO_NETNS_COOKIE, 8)
    assert netns.cookie() == ctypes.c_uint64.from_buffer_copy(raw).value != 0


def test_no_fixed_byte_order_in_kpr() -> None:
    """int.from_bytes / to_bytes with "little", or a struct format with "<": each assumes the host's byte order
    (use sys.byteorder, socket.htonl/htons, "=" or "!" instead)."""
    root = Path(kpr.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            constants = [
                a.value for a in [*node.args, *(k.value for k in node.keywords)] if isinstance(a, ast.Constant)
            ]
            if name in ("from_bytes", "to_bytes") and "little" in constants:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {name}(..., 'little')")
            if name in ("pack", "unpack", "pack_into", "unpack_from", "Struct", "calcsize") and any(
                isinstance(c, str) and c.startswith("<") for c in constants
            ):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: struct format '<...'")
    assert not found, "\n".join(found)
