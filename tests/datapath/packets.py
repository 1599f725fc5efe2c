"""Build Ethernet/IPv4/IPv6 + TCP/UDP/SCTP/ICMP frames and check them, with the standard library only.

Builders compute every checksum from scratch; `check()` recomputes the IPv4 header checksum, the TCP, UDP, ICMP and
ICMPv6 checksums (pseudo-header included) and SCTP's CRC32c from the bytes alone, and the length fields against the
frame's size. Nothing here shares code with the datapath: it is the independent side of the packet-fixture tests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ETH_HLEN = 14
TCP, UDP, ICMP, ICMPV6, SCTP = 6, 17, 1, 58, 132
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

CLIENT_MAC = bytes.fromhex("02aabbccdd01")
NODE_MAC = bytes.fromhex("02aabbccdd02")


# ---- the Internet checksum (RFC 1071) ----


def ones_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of `data` (odd length padded with a zero byte), folded."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes) -> int:
    """The checksum to store: the complement of the ones' complement sum."""
    return ~ones_sum(data) & 0xFFFF


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        reg = n
        for _ in range(8):
            reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
        table.append(reg)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (RFC 9260 appendix A), table-driven a byte at a time."""
    reg = 0xFFFFFFFF
    for byte in data:
        reg = (reg >> 8) ^ _CRC32C[(reg ^ byte) & 0xFF]
    return reg ^ 0xFFFFFFFF


def sctp_checksum(packet: bytes) -> bytes:
    """The 4 checksum bytes of an SCTP packet (common header on): its CRC32c with the field zeroed, least significant
    byte first."""
    return crc32c(packet[:8] + bytes(4) + packet[12:]).to_bytes(4, "little")


def _norm(value: int) -> int:
    return 0xFFFF if value == 0 else value  # +0 and -0 are one value in ones' complement


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def addr_bytes(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def addr_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


# ---- L4 payloads ----


@dataclass(frozen=True)
class Tcp:
    sport: int
    dport: int
    flags: int = SYN
    seq: int = 1000
    ack: int = 0
    window: int = 64240
    options: bytes = b""  # a multiple of 4 bytes
    payload: bytes = b""
    proto: int = field(default=TCP, init=False)

    def header(self) -> bytes:
        doff = (20 + len(self.options)) // 4
        return (
            struct.pack(
                "!HHIIBBHHH", self.sport, self.dport, self.seq, self.ack, doff << 4, self.flags, self.window, 0, 0
            )
            + self.options
        )

    def segment(self) -> bytes:
        return self.header() + self.payload


@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: bytes = b"hello"
    zero_checksum: bool = False  # IPv4 only: "no checksum"
    proto: int = field(default=UDP, init=False)

    def segment(self) -> bytes:
        return struct.pack("!HHHH", self.sport, self.dport, 8 + len(self.payload), 0) + self.payload


@dataclass(frozen=True)
class Icmp:
    """ICMP (IPv4) or ICMPv6, by the family of the packet it is put in."""

    type: int
    code: int = 0
    rest: bytes = b"\0\0\0\0"  # the 4 bytes after the checksum (echo id/seq, unused, MTU ...)
    payload: bytes = b""

    def segment(self) -> bytes:
        return struct.pack("!BBH", self.type, self.code, 0) + self.rest + self.payload


@dataclass(frozen=True)
class Sctp:
    """An SCTP packet with one chunk: INIT (1) by default; its value is opaque filler, padded to 4 bytes."""

    sport: int
    dport: int
    chunk: int = 1
    value: bytes = b"\0\0\0\x2a\0\0\xff\xff\0\x0a\0\x0a\0\0\0\x01"  # INIT: tag, a_rwnd, streams, TSN
    vtag: int = 0
    proto: int = field(default=SCTP, init=False)

    def segment(self) -> bytes:
        chunk = struct.pack("!BBH", self.chunk, 0, 4 + len(self.value)) + self.value
        return struct.pack("!HHI4x", self.sport, self.dport, self.vtag) + chunk + bytes(-len(chunk) % 4)


L4 = Tcp | Udp | Icmp | Sctp


def _l4_bytes(l4: L4 | bytes, src: bytes, dst: bytes) -> tuple[int, bytes]:
    """(protocol, the L4 bytes with their checksum) for a packet from src to dst."""
    if isinstance(l4, bytes):
        raise TypeError("raw L4 bytes need an explicit protocol")
    raw = bytearray(l4.segment())
    if isinstance(l4, Sctp):
        return SCTP, bytes(raw[:8]) + sctp_checksum(bytes(raw)) + bytes(raw[12:])
    if isinstance(l4, Icmp):
        proto = ICMP if len(src) == 4 else ICMPV6
        covered = bytes(raw) if proto == ICMP else pseudo_header(src, dst, proto, len(raw)) + bytes(raw)
        struct.pack_into("!H", raw, 2, checksum(covered))
        return proto, bytes(raw)
    csum = checksum(pseudo_header(src, dst, l4.proto, len(raw)) + bytes(raw))
    if isinstance(l4, Udp):
        if l4.zero_checksum:
            csum = 0
        elif csum == 0:
            csum = 0xFFFF  # a computed zero is sent as all ones (RFC 768)
        struct.pack_into("!H", raw, 6, csum)
    else:
        struct.pack_into("!H", raw, 16, csum)
    return l4.proto, bytes(raw)


# ---- frames ----


def eth(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    ident: int = 0x1234,
    frag: int = 0,  # flags (DF 0x4000, MF 0x2000) | fragment offset in 8-byte units
    options: bytes = b"",
    tos: int = 0,
) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + payload_len, ident, frag, ttl, proto, 0, src, dst)
        + options
    )
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(hdr)


def hop_by_hop(nexthdr: int) -> bytes:
    """An 8-byte IPv6 Hop-by-Hop options header holding one PadN option."""
    return struct.pack("!BBBB4x", nexthdr, 0, 1, 4)


def packet(
    src: str,
    dst: str,
    l4: L4,
    *,
    smac: bytes = CLIENT_MAC,
    dmac: bytes = NODE_MAC,
    ttl: int = 64,
    ident: int = 0x1234,
    frag: int = 0,
    ip_options: bytes = b"",
    ipv6_hbh: bool = False,
) -> bytes:
    """A whole frame from src to dst carrying `l4`, every checksum and length right. The family follows `src`."""
    s, d = addr_bytes(src), addr_bytes(dst)
    proto, body = _l4_bytes(l4, s, d)
    if len(s) == 4:
        return (
            eth(dmac, smac, ETH_P_IP)
            + ipv4_header(s, d, proto, len(body), ttl=ttl, ident=ident, frag=frag, options=ip_options)
            + body
        )
    nexthdr = proto
    if ipv6_hbh:
        body, nexthdr = hop_by_hop(proto) + body, HOPOPTS
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), nexthdr, ttl, s, d)
    return eth(dmac, smac, ETH_P_IPV6) + ip6 + body


def ipv4_raw(src: str, dst: str, proto: int, body: bytes, **kw: int) -> bytes:
    """An IPv4 frame around `body` as given (no L4 checksum is computed): fragments, truncated headers."""
    return (
        eth(NODE_MAC, CLIENT_MAC, ETH_P_IP)
        + ipv4_header(addr_bytes(src), addr_bytes(dst), proto, len(body), **kw)
        + body
    )


def ipv6_raw(src: str, dst: str, nexthdr: int, body: bytes, hop_limit: int = 64) -> bytes:
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), nexthdr, hop_limit, addr_bytes(src), addr_bytes(dst))
    return eth(NODE_MAC, CLIENT_MAC, ETH_P_IPV6) + ip6 + body


# ---- parsing ----


@dataclass
class Parsed:
    """What a frame says, as far as its bytes go; offsets are from the frame's start."""

    dmac: bytes
    smac: bytes
    ethertype: int
    family: int = 0  # 4, 6, or 0 when there is no whole IP header
    src: str = ""
    dst: str = ""
    proto: int = -1  # the upper-layer protocol after any IPv6 extension headers
    l3_off: int = ETH_HLEN
    l4_off: int = 0  # 0: no L4 header to look at (fragment, unknown extension, truncated)
    l3_len: int = 0  # what the IP length fields say the packet is (header included)
    fragment: bool = False
    sport: int = -1
    dport: int = -1
    tcp_flags: int = -1
    seq: int = -1
    ack: int = -1


def parse(frame: bytes, *, any_version: bool = False) -> Parsed:
    """The frame's headers; `any_version`: read an IP header whatever its version field says."""
    dmac, smac, ethertype = frame[:6], frame[6:12], int.from_bytes(frame[12:14], "big")
    p = Parsed(dmac, smac, ethertype)
    ip = frame[ETH_HLEN:]
    if ethertype == ETH_P_IP and len(ip) >= 20 and (any_version or ip[0] >> 4 == 4):
        ihl = (ip[0] & 0xF) * 4
        p.family, p.src, p.dst, p.proto = 4, addr_text(ip[12:16]), addr_text(ip[16:20]), ip[9]
        p.l3_len = int.from_bytes(ip[2:4], "big")
        frag = int.from_bytes(ip[6:8], "big")
        p.fragment = bool(frag & 0x3FFF)
        if ihl >= 20 and not frag & 0x1FFF:
            p.l4_off = ETH_HLEN + ihl
    elif ethertype == ETH_P_IPV6 and len(ip) >= 40 and (any_version or ip[0] >> 4 == 6):
        p.family, p.src, p.dst = 6, addr_text(ip[8:24]), addr_text(ip[24:40])
        p.l3_len = 40 + int.from_bytes(ip[4:6], "big")
        nexthdr, off = ip[6], 40
        while nexthdr in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT) and off + 8 <= len(ip):
            if nexthdr == FRAGMENT:
                p.fragment = True
                if int.from_bytes(ip[off + 2 : off + 4], "big") & 0xFFF8:
                    break  # not the first fragment: no upper-layer header here
                nexthdr, off = ip[off], off + 8
            else:
                nexthdr, off = ip[off], off + (ip[off + 1] + 1) * 8
        p.proto = nexthdr
        if nexthdr not in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT):
            p.l4_off = ETH_HLEN + off
    l4 = frame[p.l4_off :] if p.l4_off else b""
    if p.proto in (TCP, UDP, SCTP) and len(l4) >= 4:
        p.sport, p.dport = struct.unpack("!HH", l4[:4])
    if p.proto == TCP and len(l4) >= 14:
        p.seq, p.ack = struct.unpack("!II", l4[4:12])
        p.tcp_flags = l4[13]
    return p


def with_byte(frame: bytes, offset: int, value: int, *, fix_ip_checksum: bool = False) -> bytes:
    """`frame` with one byte replaced (offset from the frame's start); optionally the IPv4 header checksum redone."""
    out = bytearray(frame)
    out[offset] = value
    if fix_ip_checksum:
        ihl = (out[ETH_HLEN] & 0xF) * 4
        out[ETH_HLEN + 10 : ETH_HLEN + 12] = b"\0\0"
        struct.pack_into("!H", out, ETH_HLEN + 10, checksum(bytes(out[ETH_HLEN : ETH_HLEN + ihl])))
    return bytes(out)


# ---- the independent checker ----


def l4_residual(frame: bytes) -> int | None:
    """The ones' complement sum over the L4 checksum's coverage, stored checksum included: 0xffff when it is right.

    None when there is nothing to check (no whole L4 header, a fragment, a UDP datagram without checksum).
    """
    p = parse(frame)
    if not p.family or not p.l4_off or p.fragment:
        return None
    end = ETH_HLEN + p.l3_len
    body = frame[p.l4_off : end]
    s, d = addr_bytes(p.src), addr_bytes(p.dst)
    if p.proto == TCP and len(body) >= 20:
        return _norm(ones_sum(pseudo_header(s, d, TCP, len(body)) + body))
    if p.proto == UDP and len(body) >= 8:
        if p.family == 4 and body[6:8] == b"\0\0":
            return None
        return _norm(ones_sum(pseudo_header(s, d, UDP, len(body)) + body))
    if p.proto == ICMP and p.family == 4 and len(body) >= 8:
        return _norm(ones_sum(body))
    if p.proto == ICMPV6 and p.family == 6 and len(body) >= 8:
        return _norm(ones_sum(pseudo_header(s, d, ICMPV6, len(body)) + body))
    return None


def ip_residual(frame: bytes) -> int | None:
    p = parse(frame)
    if p.family != 4:
        return None
    ihl = (frame[ETH_HLEN] & 0xF) * 4
    if ihl < 20 or len(frame) < ETH_HLEN + ihl:
        return None
    return _norm(ones_sum(frame[ETH_HLEN : ETH_HLEN + ihl]))


def check(frame: bytes) -> list[str]:
    """Every problem with a frame's lengths and checksums, recomputed from its bytes; [] when it is sound.

    Only IPv4/IPv6 frames are judged (anything else: []). Lengths must match the frame exactly (no Ethernet padding:
    the tests never add any).
    """
    problems: list[str] = []
    if len(frame) < ETH_HLEN:
        return ["shorter than an Ethernet header"]
    p = parse(frame)
    ethertype = p.ethertype
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return []
    if not p.family:
        return [f"ethertype {ethertype:#06x} without a whole IP header"]
    have = len(frame) - ETH_HLEN
    if p.l3_len != have:
        problems.append(f"IP length field says {p.l3_len} bytes, the frame holds {have}")
    if p.family == 4:
        ihl = (frame[ETH_HLEN] & 0xF) * 4
        if ihl < 20 or ihl > min(have, p.l3_len):
            problems.append(f"bad IPv4 header length {ihl}")
            return problems
        if ip_residual(frame) != 0xFFFF:
            problems.append("bad IPv4 header checksum")
    if problems or not p.l4_off or p.fragment:
        return problems
    body = frame[p.l4_off :]
    if p.proto == TCP:
        if len(body) < 20 or (body[12] >> 4) * 4 < 20 or (body[12] >> 4) * 4 > len(body):
            return [*problems, f"bad TCP header length ({len(body)} bytes, doff {body[12] >> 4 if body[12:] else '?'})"]
    elif p.proto == UDP:
        if len(body) < 8 or int.from_bytes(body[4:6], "big") != len(body):
            return [*problems, f"UDP length field does not match the {len(body)} bytes after the IP header"]
        if p.family == 6 and body[6:8] == b"\0\0":
            return [*problems, "UDP over IPv6 without checksum"]
    elif p.proto in (ICMP, ICMPV6):
        if len(body) < 8:
            return [*problems, "ICMP message shorter than its header"]
    elif p.proto == SCTP:
        if len(body) < 16:
            return [*problems, "SCTP packet shorter than its common header and a chunk header"]
        if body[8:12] != sctp_checksum(body):
            problems.append("bad SCTP checksum")
        return problems
    else:
        return problems
    if l4_residual(frame) not in (None, 0xFFFF):
        problems.append(f"bad {({TCP: 'TCP', UDP: 'UDP', ICMP: 'ICMP', ICMPV6: 'ICMPv6'})[p.proto]} checksum")
    return problems


# ---- expected rewrites ----


def _set_addr(frame: bytearray, family: int, which: str, addr: str) -> None:
    raw = addr_bytes(addr)
    offsets = {4: {"src": 12, "dst": 16}, 6: {"src": 8, "dst": 24}}  # in the IPv4 / IPv6 header
    off = ETH_HLEN + offsets[family][which]
    frame[off : off + len(raw)] = raw


def rewritten(frame: bytes, *, src: tuple[str, int] | None = None, dst: tuple[str, int] | None = None) -> bytes:
    """`frame` with its source and/or destination address and port replaced, checksums kept exactly as right (or as
    wrong) as they were: each stored checksum moves by what the covered bytes' sum moved, computed from scratch."""
    p = parse(frame, any_version=True)
    out = bytearray(frame)
    l4_before = _l4_sum_without_checksum(frame)
    ip_before = _ip_sum_without_checksum(frame)
    for which, value in (("src", src), ("dst", dst)):
        if value is None:
            continue
        _set_addr(out, p.family, which, value[0])
        struct.pack_into("!H", out, p.l4_off + (0 if which == "src" else 2), value[1])
    if ip_before is not None:
        _shift_checksum(out, ETH_HLEN + 10, ip_before, _ip_sum_without_checksum(bytes(out)), udp=False)
    if l4_before is not None:
        off = p.l4_off + (16 if p.proto == TCP else 6)
        _shift_checksum(out, off, l4_before, _l4_sum_without_checksum(bytes(out)), udp=p.proto == UDP)
    if p.proto == SCTP and p.l4_off:  # the CRC moves by what the packet's CRC moved (addresses are not covered)
        end = ETH_HLEN + p.l3_len
        moved = bytes(
            a ^ b
            for a, b in zip(
                sctp_checksum(frame[p.l4_off : end]), sctp_checksum(bytes(out[p.l4_off : end])), strict=True
            )
        )
        out[p.l4_off + 8 : p.l4_off + 12] = bytes(
            a ^ b for a, b in zip(out[p.l4_off + 8 : p.l4_off + 12], moved, strict=True)
        )
    return bytes(out)


def _shift_checksum(out: bytearray, off: int, before: int, after: int, *, udp: bool) -> None:
    stored = int.from_bytes(out[off : off + 2], "big")
    if udp and stored == 0:
        return  # no checksum stays no checksum
    # sum + stored is invariant: stored' = stored + before - after (ones' complement arithmetic)
    total = stored + before + (~after & 0xFFFF)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    if udp and total == 0:
        total = 0xFFFF
    struct.pack_into("!H", out, off, total)


def _ip_sum_without_checksum(frame: bytes) -> int | None:
    if parse(frame, any_version=True).family != 4:
        return None
    ihl = (frame[ETH_HLEN] & 0xF) * 4
    hdr = bytearray(frame[ETH_HLEN : ETH_HLEN + ihl])
    hdr[10:12] = b"\0\0"
    return ones_sum(bytes(hdr))


def _l4_sum_without_checksum(frame: bytes) -> int | None:
    p = parse(frame, any_version=True)
    if not p.l4_off or p.proto not in (TCP, UDP):
        return None
    body = bytearray(frame[p.l4_off : ETH_HLEN + p.l3_len])
    csum_off = 16 if p.proto == TCP else 6
    if len(body) < csum_off + 2:
        return None
    body[csum_off : csum_off + 2] = b"\0\0"
    return ones_sum(pseudo_header(addr_bytes(p.src), addr_bytes(p.dst), p.proto, len(body)) + bytes(body))


# ---- the replies a frontend without backends answers with (kube-proxy's REJECT) ----


def tcp_reset_for(frame: bytes) -> bytes:
    """The TCP reset answering `frame`, as RFC 793 builds it: from the frontend back to the client, MACs swapped."""
    p = parse(frame)
    body = frame[p.l4_off : ETH_HLEN + p.l3_len]
    payload = len(body) - (body[12] >> 4) * 4
    if p.tcp_flags & ACK:
        rst = Tcp(p.dport, p.sport, flags=RST, seq=p.ack, ack=0, window=0)
    else:
        ack = (p.seq + payload + bool(p.tcp_flags & SYN) + bool(p.tcp_flags & FIN)) & 0xFFFFFFFF
        rst = Tcp(p.dport, p.sport, flags=RST | ACK, seq=0, ack=ack, window=0)
    return packet(p.dst, p.src, rst, smac=p.dmac, dmac=p.smac, ident=0)


def port_unreachable_for(frame: bytes) -> bytes:
    """The ICMP(v6) port unreachable answering `frame`, quoting its IP header and the first 8 bytes after it."""
    p = parse(frame)
    quoted = frame[ETH_HLEN : p.l4_off + 8]
    if p.family == 4:
        return packet(p.dst, p.src, Icmp(3, 3, payload=quoted), smac=p.dmac, dmac=p.smac, ident=0)
    return packet(p.dst, p.src, Icmp(1, 4, payload=quoted), smac=p.dmac, dmac=p.smac)
