"""End the connected UDP sockets that socket-level load balancing pointed at a backend that stopped serving or left.

kube-proxy flushes UDP conntrack entries of such endpoints, so the client's next datagram is NATed to a live one.
With socket LB a connected UDP socket talks to the backend's address directly and would keep doing so forever; no hook
runs for its send(). This module destroys those sockets instead (the application gets ECONNABORTED and reconnects,
through the connect hook, to a live backend), as Cilium's socket terminator does, over netlink sock_diag
(SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY) in every network namespace of the node.

Only sockets kpr translated are touched: a socket is destroyed when its cookie is in sock_rev_nat4/6 (written by the
connect hook) for that backend or frontend *and* it is still connected to that backend. Sockets that dialled a pod IP
themselves, unconnected sockets, and TCP are left alone. Network namespaces are found from the processes in the
node's cgroup subtree (the processes whose sockets the hooks see) and the bind mounts in /run/netns (containerd's and
CRI-O's pod sandboxes).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kpr.datapath import abi, codec, netns
from kpr.datapath.writers import MapWriter

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_ESTABLISHED = 1  # a connected UDP socket's state

_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
# struct inet_diag_req_v2 with its struct inet_diag_sockid: family, protocol, ext, pad, states, sport, dport
# (network order), src[16], dst[16], if, cookie[2]
_REQ = struct.Struct("=BBBxI2s2s16s16sI8s")
# struct inet_diag_msg: family, state, timer, retrans, the sockid as above, expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_SOCKID_AT = 4  # the sockid's offset in both
_SOCKID_LEN = 48
_DPORT_AT, _DST_AT, _COOKIE_AT = 6, 24, 44  # fields of the sockid in an inet_diag_msg


@dataclass(frozen=True, slots=True)
class Target:
    """A connected socket to end: its cookie and the backend it is connected to (address, host-order port)."""

    cookie: int
    addr: str
    port: int


@dataclass
class SweepResult:
    candidates: int = 0  # sock_rev_nat entries pointing at an ended backend or frontend
    namespaces: int = 0  # network namespaces searched
    destroyed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def targets(
    writer: MapWriter, backends: Iterable[tuple[str, int, str]], rev_nat_ids: Iterable[int]
) -> dict[int, Target]:
    """Socket cookies (from sock_rev_nat4/6) of sockets translated to one of the UDP `backends` or for one of the
    frontends `rev_nat_ids`, with the backend each was sent to."""
    wanted = {(addr, port) for addr, port, protocol in backends if protocol == "UDP"}
    frontends = set(rev_nat_ids)
    out: dict[int, Target] = {}
    if not wanted and not frontends:
        return out
    for name in ("sock_rev_nat4", "sock_rev_nat6"):
        for key, value in writer.items(name):
            addr, port = codec.addr_of(key.addr), abi.port_of_be16(key.port)
            if (addr, port) in wanted or value.rev_nat_id in frontends:
                out[int(key.cookie)] = Target(int(key.cookie), addr, port)
    return out


def destroy_connected_udp(wanted: dict[int, Target], namespaces: Iterable[str], timeout: float = 5.0) -> SweepResult:
    """Destroy each wanted socket that is still connected to its backend, searching the given network namespaces.

    Runs in a short-lived thread: setns() changes the calling thread's namespace only, and the thread ends with it.
    """
    result = SweepResult(candidates=len(wanted))
    if not wanted:
        return result
    started = time.monotonic()
    paths = list(namespaces)

    def sweep() -> None:
        remaining = dict(wanted)
        for path in paths:
            if not remaining or time.monotonic() - started > timeout:
                break
            try:
                netns.join(path)
            except FileNotFoundError:
                continue  # the namespace went away meanwhile
            except OSError as e:
                result.errors.append(str(e))
                continue
            result.namespaces += 1
            try:
                result.destroyed += _sweep_namespace(remaining)
            except OSError as e:
                result.errors.append(f"{path}: {e}")

    worker = threading.Thread(target=sweep, name="kpr-socket-sweep", daemon=True)
    worker.start()
    worker.join(timeout + 1)
    result.seconds = time.monotonic() - started
    return result


def _sweep_namespace(remaining: dict[int, Target]) -> int:
    """Destroy the wanted connected UDP sockets of the current network namespace; found ones leave `remaining`."""
    destroyed = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        v4 = any(":" not in t.addr for t in remaining.values())
        for family in (socket.AF_INET, socket.AF_INET6) if v4 else (socket.AF_INET6,):
            for msg in list(_dump_udp(nl, family)):
                low, high = struct.unpack_from("=II", msg, _COOKIE_AT)  # the kernel's u32 cookie[2], low word first
                target = remaining.get(low | high << 32)
                dport = struct.unpack_from("!H", msg, _DPORT_AT)[0]
                if target is None or not _connected_to(family, msg[_DST_AT : _DST_AT + 16], dport, target):
                    continue
                sockid = msg[_SOCKID_AT : _SOCKID_AT + _SOCKID_LEN]
                err = _destroy(nl, family, sockid)
                if err in (0, errno.ENOENT):  # ENOENT: it closed meanwhile
                    destroyed += err == 0
                    del remaining[target.cookie]
                else:
                    raise OSError(err, f"SOCK_DESTROY {target.addr}:{target.port}: {os.strerror(err)}")
    return destroyed


def _connected_to(family: int, dst: bytes, dport: int, target: Target) -> bool:
    if dport != target.port:
        return False
    backend = ipaddress.ip_address(target.addr)
    if family == socket.AF_INET:
        return dst[:4] == backend.packed
    peer = ipaddress.IPv6Address(dst)
    if backend.version == 4:  # a dual-stack socket dialling an IPv4 frontend
        return peer.ipv4_mapped == backend
    return peer == backend


def _dump_udp(nl: socket.socket, family: int) -> Iterator[bytes]:
    """The inet_diag_msg of every connected UDP socket of one family in this namespace."""
    req = _REQ.pack(family, socket.IPPROTO_UDP, 0, 1 << TCP_ESTABLISHED, b"", b"", b"", b"", 0, b"\xff" * 8)
    _send(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)
    while True:
        data = nl.recv(1 << 16)
        for msg_type, payload in _messages(data):
            if msg_type == NLMSG_DONE:
                return
            if msg_type == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                if err:
                    raise OSError(err, f"sock_diag dump: {os.strerror(err)}")
                return
            if msg_type == SOCK_DIAG_BY_FAMILY and len(payload) >= _MSG.size:
                yield payload


def _destroy(nl: socket.socket, family: int, sockid: bytes) -> int:
    """SOCK_DESTROY one socket, identified by its exact sockid (addresses, ports, interface and cookie); errno or 0."""
    req = struct.pack("=BBBxI", family, socket.IPPROTO_UDP, 0, 0xFFFFFFFF) + sockid
    _send(nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)
    while True:
        for msg_type, payload in _messages(nl.recv(4096)):
            if msg_type == NLMSG_ERROR:
                return -struct.unpack_from("=i", payload)[0]


def _send(nl: socket.socket, msg_type: int, flags: int, payload: bytes) -> None:
    nl.send(_NLMSG.pack(_NLMSG.size + len(payload), msg_type, flags, 1, 0) + payload)


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield msg_type, data[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3
