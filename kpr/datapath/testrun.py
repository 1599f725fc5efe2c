"""Run a loaded BPF program on a crafted packet with BPF_PROG_TEST_RUN (bpf(2) command 10).

The kernel builds an skb from `data` in the calling thread's network namespace, runs the program once (or `repeat`
times) and hands back its return value, the packet as the program left it, and the mean run time. Nothing is sent:
a TC_ACT_REDIRECT only comes back as the number 7. Tail calls, map updates and helpers such as bpf_fib_lookup work
as they do on a real device, against the maps and routes of that namespace.

For sched_cls programs an optional `struct __sk_buff` context (SkBuff below) sets what the program reads of the skb.
net/bpf/test_run.c (convert___skb_to_skb) accepts only these fields non-zero and fails with EINVAL otherwise: mark,
priority, ingress_ifindex (becomes skb->skb_iif), ifindex, cb[], tstamp, wire_len, gso_segs, gso_size, hwtstamp.
`ifindex` must name a device of the calling thread's namespace (ENODEV otherwise; 0 or 1 means its loopback): the
skb is made to arrive on it, so skb->ifindex reads it back.

The frame must be longer than its Ethernet header, and newer kernels (6.18 here) refuse with EINVAL an IPv4 (IPv6)
ethertype frame shorter than 20 (40) bytes after it, though such frames do reach a real tc hook.
"""

from __future__ import annotations

import ctypes
import errno
from typing import NamedTuple

from kpr.datapath import bpfsys

BPF_PROG_TEST_RUN = 10
# test.flags: have the kernel compute skb->csum (CHECKSUM_COMPLETE) before the run and check that the program kept
# it right afterwards (EBADMSG otherwise). Newer kernels only; older ones refuse any flag with EINVAL.
BPF_F_TEST_SKB_CHECKSUM_COMPLETE = 1 << 2

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


class SkBuff(ctypes.Structure):
    """struct __sk_buff (include/uapi/linux/bpf.h), the sched_cls context; 192 bytes on every 64-bit kernel since 5.16.

    A kernel UAPI struct, not kpr's ABI: only the fields BPF_PROG_TEST_RUN accepts (see the module docstring) may be
    non-zero in a context passed in.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),  # __bpf_md_ptr: a pointer in a 64-bit, 8-aligned union
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),  # __bpf_md_ptr
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


class _TestAttr(ctypes.Structure):
    # union bpf_attr, the BPF_PROG_TEST_RUN member ("test").
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class ProgRun(NamedTuple):
    retval: int  # the program's return value (TC_ACT_*)
    data: bytes  # the packet after the run
    duration_ns: int  # mean time of one run


def skb_context(*, ifindex: int = 0, ingress_ifindex: int = 0, mark: int = 0, priority: int = 0) -> bytes:
    """A `struct __sk_buff` context with only fields BPF_PROG_TEST_RUN accepts."""
    return bytes(SkBuff(ifindex=ifindex, ingress_ifindex=ingress_ifindex, mark=mark, priority=priority))


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    ctx: bytes | SkBuff | None = None,
    repeat: int = 1,
    flags: int = 0,
) -> ProgRun:
    """Run the program `prog_fd` on `data` (a whole frame, Ethernet header first, for sched_cls).

    `ctx`: a `struct __sk_buff` (SkBuff, or its bytes, e.g. from skb_context()); None runs without one (the skb then
    arrives on the namespace's loopback). `flags`: e.g. BPF_F_TEST_SKB_CHECKSUM_COMPLETE. Raises bpfsys.BpfError
    with the kernel's errno when the run is refused (EINVAL for a context field the kernel does not accept, ENODEV
    for an unknown ifindex).
    """
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = max(2 * len(data) + 256, 4096)  # a program may grow the packet (bpf_skb_change_tail)
    ctx_raw = bytes(ctx) if ctx is not None else b""
    ctx_in = ctypes.create_string_buffer(ctx_raw, len(ctx_raw)) if ctx_raw else None
    while True:
        data_out = ctypes.create_string_buffer(out_size)
        attr = _TestAttr(
            prog_fd=prog_fd,
            data_size_in=len(data),
            data_size_out=out_size,
            data_in=ctypes.addressof(data_in),
            data_out=ctypes.addressof(data_out),
            repeat=repeat,
            ctx_size_in=len(ctx_raw),
            ctx_in=ctypes.addressof(ctx_in) if ctx_in is not None else 0,
            flags=flags,
        )
        try:
            bpfsys._bpf(BPF_PROG_TEST_RUN, attr, "test run of program fd", str(prog_fd))
        except bpfsys.BpfError as e:
            if e.errno == errno.ENOSPC and attr.data_size_out > out_size:
                out_size = attr.data_size_out  # the packet grew past the buffer: the kernel says how big it is
                continue
            raise
        return ProgRun(int(attr.retval), data_out.raw[: attr.data_size_out], int(attr.duration))
