"""ctypes mirror of bpf/kpr.h, the only one in Python.

tests/datapath/test_abi.py compiles the header with BCC and checks every size and field offset here against it, and
parses the header's #defines against the constants below. Multi-byte address and port fields hold network byte order;
the helpers at the bottom convert at this edge and nowhere else.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kpr.datapath.toolchain import bpf_sources

BPF_DIR = bpf_sources()  # the package data kpr/bpf/ of an install, the repository's bpf/ in a checkout (toolchain)
HEADER = BPF_DIR / "kpr.h"

SCOPE_DEFAULT = 0
SCOPE_INTERNAL = 1

SVC_F_AFFINITY = 0x01
SVC_F_TWO_SCOPES = 0x02
SVC_F_EMPTY_DROP = 0x04
SVC_F_EXTERNAL = 0x08
SVC_F_SOURCE_RANGES = 0x10

CT_ORIGINAL = 0
CT_REPLY = 1
CT_F_SNAT = 0x01
CT_F_CLOSING = 0x02
SNAT_PORT_MIN = 61000
SNAT_PORT_MAX = 65535
SNAT_TRIES = 16
CT_TCP_LIFETIME_S = 21600
CT_CLOSING_LIFETIME_S = 10
CT_UDP_LIFETIME_S = 60
CT_SCTP_LIFETIME_S = 210

BACKEND_ACTIVE = 0
BACKEND_TERMINATING = 1
BACKEND_NOT_SERVING = 2
BACKEND_GONE = 3
BACKEND_STATE_NAMES = {
    BACKEND_ACTIVE: "active",
    BACKEND_TERMINATING: "terminating",
    BACKEND_NOT_SERVING: "not-serving",
    BACKEND_GONE: "gone",
}
BACKEND_F_NODE_LOCAL = 0x01

AFFINITY_NETNS = 1
AFFINITY_ADDR = 2

# Counter indexes, in the header's order; the names are what `kpr status` prints.
COUNTERS = {
    "xlate_fwd": 0,
    "xlate_rev": 1,
    "reject_no_backend": 2,
    "drop_no_local_backend": 3,
    "err_slot_missing": 4,
    "err_backend_missing": 5,
    "err_sock_rev_nat": 6,
    "rev_nat_stale": 7,
    "affinity_hit": 8,
    "affinity_new": 9,
    "err_scope_missing": 10,
    "tc_dnat": 11,
    "tc_ct_new": 12,
    "tc_revnat": 13,
    "tc_snat": 14,
    "tc_reject_tcp": 15,
    "tc_reject_udp": 16,
    "tc_drop_no_local": 17,
    "tc_drop_source_range": 18,
    "tc_drop_snat_ports": 19,
    "tc_drop_fib": 20,
    "tc_drop_ct_full": 21,
    "tc_ct_stale": 22,
    "tc_reset_untracked": 23,
    "reject_source_range": 24,
    "source_unknown": 25,
    "tc_icmp_related": 26,
    "tc_too_big": 27,
    "tc_drop_too_big": 28,
    "tc_sctp_crc": 29,
    "err_tail_call": 30,
    "tc_drop_rewrite": 31,
    "tc_drop_answer": 32,
    "tc_drop_icmp": 33,
    "tc_drop_reset": 34,
}
CNT_MAX = 64

# svc_name.kind
KIND_CODES = {"ClusterIP": 1, "NodePort": 2, "ExternalIP": 3, "LoadBalancer": 4}
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}

Be32x4 = ctypes.c_uint32 * 4

# A ctypes instance read from or written to a map. ctypes fields are dynamic, so the type checker cannot see them;
# layouts are checked against the compiled header by tests/datapath/test_abi.py instead.
CData = Any


class SvcKey4(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class SvcKey6(ctypes.Structure):
    _fields_ = [
        ("addr", Be32x4),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("slot", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class SvcValue(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("rev_nat_id", ctypes.c_uint32),
        ("affinity_timeout", ctypes.c_uint32),
        ("count", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Backend4(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class Backend6(ctypes.Structure):
    _fields_ = [
        ("addr", Be32x4),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class RevNat4(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class RevNat6(ctypes.Structure):
    _fields_ = [("addr", Be32x4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class SockRevNatKey4(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class SockRevNat4(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint32),
    ]


class SockRevNatKey6(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", Be32x4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 3),
    ]


class SockRevNat6(ctypes.Structure):
    _fields_ = [
        ("addr", Be32x4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint32),
    ]


class AffinityKey(ctypes.Structure):
    _fields_ = [
        ("client", Be32x4),
        ("rev_nat_id", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class AffinityValue(ctypes.Structure):
    _fields_ = [("last_used_ns", ctypes.c_uint64), ("backend_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class AffinityMatchKey(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32)]


class SvcName(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("ns", ctypes.c_char * 64),
        ("name", ctypes.c_char * 64),
        ("port_name", ctypes.c_char * 16),
    ]


class CtKey4(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint32),
        ("dst", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class CtKey6(ctypes.Structure):
    _fields_ = [
        ("src", Be32x4),
        ("dst", Be32x4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class CtValue4(ctypes.Structure):
    _fields_ = [
        ("last_seen_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("rev_nat_id", ctypes.c_uint32),
        ("addr", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("fe_addr", ctypes.c_uint32),
        ("fe_port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
    ]


class CtValue6(ctypes.Structure):
    _fields_ = [
        ("last_seen_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("rev_nat_id", ctypes.c_uint32),
        ("addr", Be32x4),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("fe_addr", Be32x4),
        ("fe_port", ctypes.c_uint16),
        ("pad2", ctypes.c_uint16),
        ("pad3", ctypes.c_uint32),
    ]


class SrcRangeKey4(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class SrcRangeKey6(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("rev_nat_id", ctypes.c_uint32), ("addr", Be32x4)]


SOCKET_LB_FULL = 0
SOCKET_LB_HOSTNS_ONLY = 1


CONFIG_F_EXTERNAL_CLUSTER_IP = 0x01

# tc_tails slots (KPR_TAIL_*)
(
    TAIL_REJECT4,
    TAIL_REJECT6,
    TAIL_ICMP4_IN,
    TAIL_ICMP6_IN,
    TAIL_ICMP4_OUT,
    TAIL_ICMP6_OUT,
    TAIL_TOOBIG4,
    TAIL_TOOBIG6,
) = range(8)
TAILS_MAX = 8


class KprConfig(ctypes.Structure):
    _fields_ = [
        ("host_netns_cookie", ctypes.c_uint64),
        ("socket_lb", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cluster_cidr4", ctypes.c_uint32),
        ("cluster_cidr6", Be32x4),
        ("cluster_prefix4", ctypes.c_uint8),
        ("cluster_prefix6", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


NODEPORT_F_LOOPBACK = 0x01


class NodePortAddr6(ctypes.Structure):
    _fields_ = [("addr", Be32x4)]


class DeviceInfo(ctypes.Structure):
    _fields_ = [("addr4", ctypes.c_uint32), ("addr6", Be32x4)]


U32 = ctypes.c_uint32
U8 = ctypes.c_uint8
U64 = ctypes.c_uint64


@dataclass(frozen=True, slots=True)
class MapSpec:
    name: str
    key: Any  # a ctypes type
    value: Any
    percpu: bool = False
    programs: bool = False  # a program array: values are program fds, not data
    array: bool = False  # an array: every slot always exists, so "entries" means nothing
    layout: int = 1  # KPR_PIN(name, layout) in kpr.h: goes up with any change of the key or value layout

    @property
    def pin(self) -> str:
        """The map's file in the bpffs directory: its name and layout version ("services4_v1")."""
        return f"{self.name}_v{self.layout}"


# Every map in kpr.h, by its name; the key and value types and the layout versions are what the header declares.
MAPS: dict[str, MapSpec] = {
    spec.name: spec
    for spec in (
        MapSpec("services4", SvcKey4, SvcValue),
        MapSpec("services6", SvcKey6, SvcValue),
        MapSpec("backends4", U32, Backend4),
        MapSpec("backends6", U32, Backend6),
        MapSpec("rev_nat4", U32, RevNat4),
        MapSpec("rev_nat6", U32, RevNat6),
        MapSpec("svc_names", U32, SvcName),
        MapSpec("sock_rev_nat4", SockRevNatKey4, SockRevNat4),
        MapSpec("sock_rev_nat6", SockRevNatKey6, SockRevNat6),
        MapSpec("affinity", AffinityKey, AffinityValue),
        MapSpec("affinity_match", AffinityMatchKey, U8),
        MapSpec("counters", U32, U64, percpu=True),
        MapSpec("ct4", CtKey4, CtValue4),
        MapSpec("ct6", CtKey6, CtValue6),
        MapSpec("src_ranges4", SrcRangeKey4, U8),
        MapSpec("src_ranges6", SrcRangeKey6, U8),
        MapSpec("devices", U32, DeviceInfo),
        MapSpec("netns_addrs", U64, DeviceInfo),
        MapSpec("nodeport_addrs4", U32, U8),
        MapSpec("nodeport_addrs6", NodePortAddr6, U8),
        MapSpec("tc_tails", U32, U32, programs=True),
        MapSpec("config", U32, KprConfig, array=True),
        MapSpec("crc32c_powers", U32, U32, array=True),
    )
}


def map_pin(bpffs_dir: Path, name: str) -> Path:
    """Where map `name` (a key of MAPS) of this kpr's layout is pinned in `bpffs_dir`."""
    return bpffs_dir / MAPS[name].pin


# ---- conversions at the edge: text addresses and host-order ports <-> network-order fields ----


# A u32 field holds network order when its in-memory (native order) bytes are the address's bytes: read and write
# such fields with sys.byteorder (or htonl/htons), never a fixed "little", so the mirror is right on big-endian hosts.


@lru_cache(maxsize=1 << 17)
def be32_of_ipv4(addr: str) -> int:
    """The u32 whose in-memory bytes are the address in network order (what the kernel compares)."""
    return int.from_bytes(socket.inet_aton(addr), sys.byteorder)


def ipv4_of_be32(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, sys.byteorder))


def be32x4_of_ipv6(addr: str) -> CData:
    return Be32x4(*_ipv6_words(addr))


@lru_cache(maxsize=1 << 17)
def _ipv6_words(addr: str) -> tuple[int, int, int, int]:
    packed = ipaddress.IPv6Address(addr).packed
    return tuple(int.from_bytes(packed[i : i + 4], sys.byteorder) for i in range(0, 16, 4))  # type: ignore[return-value]


def ipv6_of_be32x4(words: CData) -> str:
    return str(ipaddress.IPv6Address(b"".join(int(w).to_bytes(4, sys.byteorder) for w in words)))


def be16_of_port(port: int) -> int:
    return socket.htons(port)


def port_of_be16(value: int) -> int:
    return socket.ntohs(value)


def be32_of_u32(value: int) -> int:
    """A host-order number as a u32 field in network order (the LPM keys' rev_nat_id)."""
    return socket.htonl(value)


def u32_of_be32(value: int) -> int:
    return socket.ntohl(value)


# ---- IP protocol numbers (the proto fields) and the Kubernetes protocol names they stand for ----

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132  # socket.IPPROTO_SCTP exists only where Python was built with SCTP headers
PROTOCOL_NUMBERS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}
