"""Encode values into the map structs of abi.py and decode them back (for restore and the CLI).

Values come as text addresses, host-order ports and protocol names ("TCP"); no domain model is needed here.
decode_services() is the one place that turns the services maps' entries into frontends, scopes and slots.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from kpr.datapath import abi
from kpr.datapath.abi import PROTOCOL_NAMES, PROTOCOL_NUMBERS, CData

# A frontend or backend address as the maps know it: (addr text, host-order port, protocol name).
Address = tuple[str, int, str]


def family_of(addr: str) -> int:
    return 6 if ":" in addr else 4


def svc_key(addr: str, port: int, protocol: str, scope: int, slot: int) -> abi.SvcKey4 | abi.SvcKey6:
    return svc_key_maker(addr, port, protocol)(scope, slot)


def svc_key_maker(addr: str, port: int, protocol: str) -> Callable[[int, int], abi.SvcKey4 | abi.SvcKey6]:
    """make(scope, slot) -> the key, with the frontend's fields encoded once (a frontend has many slots)."""
    proto = PROTOCOL_NUMBERS[protocol]
    be_port = abi.be16_of_port(port)
    if family_of(addr) == 4:
        be_addr = abi.be32_of_ipv4(addr)
        return lambda scope, slot: abi.SvcKey4(be_addr, be_port, proto, scope, slot)
    words = abi.be32x4_of_ipv6(addr)
    return lambda scope, slot: abi.SvcKey6(words, be_port, proto, scope, slot)


def svc_master(count: int, rev_nat_id: int, flags: int, affinity_timeout: int) -> abi.SvcValue:
    return abi.SvcValue(count=count, rev_nat_id=rev_nat_id, flags=flags, affinity_timeout=affinity_timeout)


def svc_slot(backend_id: int) -> abi.SvcValue:
    return abi.SvcValue(backend_id=backend_id)


def backend_value(addr: str, port: int, protocol: str, *, state: int, node_local: bool) -> ctypes.Structure:
    """A backends4/6 value; `state` is one of abi.BACKEND_*."""
    flags = abi.BACKEND_F_NODE_LOCAL if node_local else 0
    proto = PROTOCOL_NUMBERS[protocol]
    if family_of(addr) == 4:
        return abi.Backend4(
            addr=abi.be32_of_ipv4(addr), port=abi.be16_of_port(port), proto=proto, state=state, flags=flags
        )
    return abi.Backend6(
        addr=abi.be32x4_of_ipv6(addr), port=abi.be16_of_port(port), proto=proto, state=state, flags=flags
    )


def rev_nat_value(addr: str, port: int) -> abi.RevNat4 | abi.RevNat6:
    if family_of(addr) == 4:
        return abi.RevNat4(addr=abi.be32_of_ipv4(addr), port=abi.be16_of_port(port))
    return abi.RevNat6(addr=abi.be32x4_of_ipv6(addr), port=abi.be16_of_port(port))


def svc_name_value(kind: str, namespace: str, name: str, port_name: str) -> abi.SvcName:
    return abi.SvcName(
        kind=abi.KIND_CODES[kind],
        ns=namespace.encode()[:63],
        name=name.encode()[:63],
        port_name=port_name.encode()[:15],
    )


def src_range_entry(rev_nat_id: int, cidr: str) -> tuple[str, abi.SrcRangeKey4 | abi.SrcRangeKey6]:
    """The (map, LPM key) allowing `cidr` as a source of frontend `rev_nat_id` (32 bits of id, then the prefix)."""
    network = ipaddress.ip_network(cidr, strict=False)
    be_id = abi.be32_of_u32(rev_nat_id)
    if network.version == 4:
        addr = abi.be32_of_ipv4(str(network.network_address))
        return "src_ranges4", abi.SrcRangeKey4(prefixlen=32 + network.prefixlen, rev_nat_id=be_id, addr=addr)
    words = abi.be32x4_of_ipv6(str(network.network_address))
    return "src_ranges6", abi.SrcRangeKey6(prefixlen=32 + network.prefixlen, rev_nat_id=be_id, addr=words)


def decode_src_range(key: abi.SrcRangeKey4 | abi.SrcRangeKey6) -> tuple[int, str]:
    rev_nat_id = abi.u32_of_be32(int(key.rev_nat_id))
    return rev_nat_id, f"{addr_of(key.addr)}/{key.prefixlen - 32}"


def maps_for(addr: str) -> tuple[str, str, str]:
    """The (services, backends, rev_nat) map names for an address's family."""
    return ("services4", "backends4", "rev_nat4") if family_of(addr) == 4 else ("services6", "backends6", "rev_nat6")


def u32(value: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(value)


# ---- packed entries: the bytes of a key or value, built without a ctypes object (the bulk first sync) ----
#
# Each packer gives exactly bytes(the ctypes struct the functions above build) -- tests/unit/test_bulk_sync.py checks
# them against each other, and the sizes are checked here against the mirror. Addresses are packed as their network
# order bytes; ports as htons() in native order, which is what the mirror's u16 fields hold.

_SVC_KEY = {4: struct.Struct("=4sHBBHH"), 6: struct.Struct("=16sHBBHH")}
_SVC_VALUE = struct.Struct("=IIIHBB")
_BACKEND = {4: struct.Struct("=4sHBBB3x"), 6: struct.Struct("=16sHBBB3x")}
_REV_NAT = {4: struct.Struct("=4sH2x"), 6: struct.Struct("=16sH2x")}
_U32 = struct.Struct("=I")
_SVC_NAME = struct.Struct("=B3x64s64s16s")
_AFFINITY_MATCH = struct.Struct("=II")
_SRC_RANGE = {4: struct.Struct("=II4s"), 6: struct.Struct("=II16s")}
for _packer, _mirror in (
    (_SVC_KEY[4], abi.SvcKey4),
    (_SVC_KEY[6], abi.SvcKey6),
    (_SVC_VALUE, abi.SvcValue),
    (_BACKEND[4], abi.Backend4),
    (_BACKEND[6], abi.Backend6),
    (_REV_NAT[4], abi.RevNat4),
    (_REV_NAT[6], abi.RevNat6),
    (_U32, abi.U32),
    (_SVC_NAME, abi.SvcName),
    (_AFFINITY_MATCH, abi.AffinityMatchKey),
    (_SRC_RANGE[4], abi.SrcRangeKey4),
    (_SRC_RANGE[6], abi.SrcRangeKey6),
):
    assert _packer.size == ctypes.sizeof(_mirror), f"packed {_mirror.__name__} is {_packer.size} bytes"

pack_u32 = _U32.pack
_BACKEND4, _BACKEND6 = _BACKEND[4].pack, _BACKEND[6].pack
U8_ONE = bytes(abi.U8(1))


def packed_addr(addr: str) -> bytes:
    """An address's network order bytes (4 or 16), as the maps' addr fields hold them (inet_pton: cheaper than a
    cache lookup, and a first sync sees each address once)."""
    return socket.inet_pton(socket.AF_INET6, addr) if ":" in addr else socket.inet_pton(socket.AF_INET, addr)


def svc_key_prefix(addr: str, port: int, protocol: str) -> bytes:
    """The first bytes of every svc_key of a frontend (address, port, protocol): a key is this + svc_key_suffix()."""
    packed = packed_addr(addr)
    return packed + struct.pack("=HB", socket.htons(port), PROTOCOL_NUMBERS[protocol])


_SUFFIX = struct.Struct("=BHH")  # scope, slot, pad
_suffixes: dict[int, list[bytes]] = {}


def svc_key_suffixes(scope: int, count: int) -> list[bytes]:
    """The last bytes of the keys of a scope's slots 0..count-1 (slot 0: the master)."""
    table = _suffixes.setdefault(scope, [])
    while len(table) < count:
        table.append(_SUFFIX.pack(scope, len(table), 0))
    return table[:count]


def pack_svc_key(addr: str, port: int, protocol: str, scope: int, slot: int) -> bytes:
    return svc_key_prefix(addr, port, protocol) + _SUFFIX.pack(scope, slot, 0)


def pack_svc_master(count: int, rev_nat_id: int, flags: int, affinity_timeout: int) -> bytes:
    return _SVC_VALUE.pack(0, rev_nat_id, affinity_timeout, count, flags, 0)


pack_svc_slot = struct.Struct("=I12x").pack  # pack_svc_slot(backend_id): the bytes of svc_slot(backend_id)


def pack_backend(addr: str, port: int, protocol: str, *, state: int, node_local: bool) -> bytes:
    flags = abi.BACKEND_F_NODE_LOCAL if node_local else 0
    if ":" in addr:
        return _BACKEND6(
            socket.inet_pton(socket.AF_INET6, addr), socket.htons(port), PROTOCOL_NUMBERS[protocol], state, flags
        )
    return _BACKEND4(
        socket.inet_pton(socket.AF_INET, addr), socket.htons(port), PROTOCOL_NUMBERS[protocol], state, flags
    )


def pack_rev_nat(addr: str, port: int) -> bytes:
    packed = packed_addr(addr)
    return _REV_NAT[4 if len(packed) == 4 else 6].pack(packed, socket.htons(port))


def pack_svc_name(kind: str, namespace: str, name: str, port_name: str) -> bytes:
    return _SVC_NAME.pack(abi.KIND_CODES[kind], namespace.encode()[:63], name.encode()[:63], port_name.encode()[:15])


def pack_affinity_match(backend_id: int, rev_nat_id: int) -> bytes:
    return _AFFINITY_MATCH.pack(backend_id, rev_nat_id)


@lru_cache(maxsize=4096)
def _src_range_prefix(cidr: str) -> tuple[int, int, bytes]:
    network = ipaddress.ip_network(cidr, strict=False)
    return network.version, network.prefixlen, network.network_address.packed


def pack_src_range(rev_nat_id: int, cidr: str) -> tuple[str, bytes]:
    """(map, the bytes of the LPM key) as src_range_entry() gives them."""
    version, prefixlen, packed = _src_range_prefix(cidr)
    key = _SRC_RANGE[version].pack(32 + prefixlen, socket.htonl(rev_nat_id), packed)
    return f"src_ranges{version}", key


# ---- decoding ----


def addr_of(field: int | CData) -> str:
    return abi.ipv4_of_be32(field) if isinstance(field, int) else abi.ipv6_of_be32x4(field)


@dataclass(frozen=True, slots=True)
class DecodedSvcKey:
    addr: str
    port: int
    protocol: str
    scope: int
    slot: int

    @property
    def address(self) -> Address:
        return (self.addr, self.port, self.protocol)


def decode_svc_key(key: abi.SvcKey4 | abi.SvcKey6) -> DecodedSvcKey:
    return DecodedSvcKey(
        addr_of(key.addr),
        abi.port_of_be16(key.port),
        PROTOCOL_NAMES.get(key.proto, str(key.proto)),
        key.scope,
        key.slot,
    )


@dataclass(frozen=True, slots=True)
class DecodedScope:
    """One scope of a frontend as the maps hold it: its master entry (slot 0) and the backend id of each slot."""

    count: int
    rev_nat_id: int
    flags: int  # abi.SVC_F_*
    affinity_timeout: int
    slots: tuple[int | None, ...]  # slots 1..count: slot n is slots[n - 1]; None where that slot's entry is missing


@dataclass(frozen=True, slots=True)
class DecodedFrontend:
    addr: str
    port: int
    protocol: str
    scopes: dict[int, DecodedScope]  # by scope (abi.SCOPE_*), each with its master entry

    @property
    def address(self) -> Address:
        return (self.addr, self.port, self.protocol)


def decode_services(entries: Iterable[tuple[CData, CData]]) -> list[DecodedFrontend]:
    """The frontends in the entries of services4 or services6, by address: each scope that has a master entry, with
    the backend ids of its slots 1..count. The single decoder of the services maps (restore, `kpr services`, tests).

    Nothing is judged here: a frontend may lack its default scope, a slot may be missing (None); slot entries beyond
    the master's count, or of a scope without a master, are left out (no lookup reaches them).
    """
    masters: dict[Address, dict[int, CData]] = {}
    slots: dict[tuple[Address, int], dict[int, int]] = {}
    for key, value in entries:
        d = decode_svc_key(key)
        if d.slot == 0:
            masters.setdefault(d.address, {})[d.scope] = value
        else:
            slots.setdefault((d.address, d.scope), {})[d.slot] = value.backend_id
    frontends = []
    for address in sorted(masters):
        scopes = {}
        for scope, m in sorted(masters[address].items()):
            held = slots.get((address, scope), {})
            ids = tuple(held.get(slot) for slot in range(1, m.count + 1))
            scopes[scope] = DecodedScope(m.count, m.rev_nat_id, m.flags, m.affinity_timeout, ids)
        frontends.append(DecodedFrontend(*address, scopes))
    return frontends


@dataclass(frozen=True, slots=True)
class DecodedBackend:
    addr: str
    port: int
    protocol: str
    state: int  # abi.BACKEND_*
    node_local: bool

    @property
    def address(self) -> Address:
        return (self.addr, self.port, self.protocol)

    @property
    def state_name(self) -> str:
        return abi.BACKEND_STATE_NAMES.get(self.state, f"state {self.state}")


def decode_backend(value: abi.Backend4 | abi.Backend6) -> DecodedBackend:
    return DecodedBackend(
        addr_of(value.addr),
        abi.port_of_be16(value.port),
        PROTOCOL_NAMES.get(value.proto, str(value.proto)),
        value.state,
        bool(value.flags & abi.BACKEND_F_NODE_LOCAL),
    )


def decode_rev_nat(value: abi.RevNat4 | abi.RevNat6) -> tuple[str, int]:
    return addr_of(value.addr), abi.port_of_be16(value.port)


@dataclass(frozen=True, slots=True)
class DecodedSvcName:
    kind: str
    namespace: str
    name: str
    port_name: str


def decode_svc_name(value: abi.SvcName) -> DecodedSvcName:
    return DecodedSvcName(
        abi.KIND_NAMES.get(value.kind, "?"), value.ns.decode(), value.name.decode(), value.port_name.decode()
    )


def key_size(map_name: str) -> int:
    return ctypes.sizeof(abi.MAPS[map_name].key)


def split_packed(data: bytes, size: int) -> list[bytes]:
    """Entries packed back to back (keys, or values, of `size` bytes each), one by one."""
    return [data[i : i + size] for i in range(0, len(data), size)]
