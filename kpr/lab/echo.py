"""A tiny dual-stack echo server for lab pods: it answers every connection and datagram with its own name.

    python -m kpr.lab.echo --name pod-a --tcp 8080 --udp 8080 --stream 9000

TCP: on accept it sends one line "{name} {peer_ip} {peer_port}\\n", then shuts the connection down (the server closes
first, so TIME_WAIT stays on the server and a fast client does not run out of ports). Stream (TCP): the connection
stays open and every line received is answered with "{name} {line}\\n", for clients that hold connections for long.
UDP: every datagram gets the "{name} {peer_ip} {peer_port}" line back, sent from the address the datagram was
addressed to. IPv4 peers of the dual-stack sockets are printed as plain IPv4. "ready" is printed (flushed) once every
socket listens; SIGTERM and SIGINT close every connection (a FIN, as an application shutting down cleanly does) and
exit with status 0.

Standard library only and no imports from the rest of kpr: it starts in a few milliseconds and runs by file path.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import signal
import socket
import sys
from types import FrameType

_V4_MAPPED = "::ffff:"
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo: 16-byte address + ifindex


class _Stop(Exception):
    """Raised from the signal handler to leave the select loop."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def peer_text(addr: tuple[object, ...]) -> tuple[str, int]:
    """The peer's address as printed in replies: plain IPv4 for v4-mapped peers, no scope suffix."""
    host = str(addr[0]).split("%", 1)[0]
    if host.startswith(_V4_MAPPED) and "." in host:
        host = host[len(_V4_MAPPED) :]
    return host, int(str(addr[1]))


def _line(name: str, addr: tuple[object, ...]) -> bytes:
    host, port = peer_text(addr)
    return f"{name} {host} {port}\n".encode()


def _tcp_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Learn each datagram's destination (v4-mapped for IPv4) so the reply leaves from that same address.
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("::", port))
    sock.setblocking(False)
    return sock


def _serve_tcp(name: str, listener: socket.socket) -> None:
    while True:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNABORTED, EMFILE …: try again on the next wake-up
            return
        try:
            conn.sendall(_line(name, addr))
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            conn.close()


def _accept_streams(name: str, listener: socket.socket, selector: selectors.BaseSelector) -> None:
    while True:
        try:
            conn, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ, _Stream(name, conn, selector))


class _Stream:
    """One held connection: answers each complete line with "{name} {line}", however long the line (answers wait in
    an outbox, and the connection is watched for writing, while the peer is not reading)."""

    def __init__(self, name: str, conn: socket.socket, selector: selectors.BaseSelector) -> None:
        self.name, self.conn, self.selector, self.pending, self.outbox = name, conn, selector, b"", b""

    def __call__(self, _name: str, _sock: socket.socket) -> None:
        try:
            data: bytes | None = self.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            data = None  # woken to write
        except OSError:
            data = b""
        if data == b"":
            self._close()
            return
        if data:
            self.pending += data
            if b"\n" in data:
                *lines, self.pending = self.pending.split(b"\n")
                self.outbox += b"".join(self.name.encode() + b" " + line + b"\n" for line in lines)
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outbox:
                self.outbox = self.outbox[self.conn.send(self.outbox) :]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        if self.selector.get_key(self.conn).events != events:
            self.selector.modify(self.conn, events, self)

    def _close(self) -> None:
        self.selector.unregister(self.conn)
        self.conn.close()


def _serve_udp(name: str, sock: socket.socket) -> None:
    while True:
        try:
            _data, ancdata, _flags, addr = sock.recvmsg(65535, _PKTINFO_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # e.g. a queued ICMP error for an earlier reply
            continue
        reply = _line(name, addr)
        local = b""
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
                local = data[:16]
        try:
            if local and local[0] != 0xFF:  # never answer from a multicast address
                sock.sendmsg([reply], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, local + b"\0\0\0\0")], 0, addr)
            else:
                sock.sendto(reply, addr)
        except OSError:
            with contextlib.suppress(OSError):
                sock.sendto(reply, addr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpr.lab.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the name every reply starts with")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT", help="TCP port (repeatable)")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT", help="UDP port (repeatable)")
    parser.add_argument(
        "--stream", type=int, action="append", default=[], metavar="PORT", help="TCP port held open (repeatable)"
    )
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp and not args.stream:
        parser.error("give at least one --tcp, --udp or --stream port")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    try:
        for port in dict.fromkeys(args.tcp):
            sock = _tcp_listener(port)
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_READ, _serve_tcp)
        for port in dict.fromkeys(args.udp):
            sock = _udp_socket(port)
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_READ, _serve_udp)
        for port in dict.fromkeys(args.stream):
            sock = _tcp_listener(port)
            sockets.append(sock)
            selector.register(
                sock, selectors.EVENT_READ, lambda name, listener: _accept_streams(name, listener, selector)
            )
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            for key, _events in selector.select():
                key.data(args.name, key.fileobj)
    except _Stop:
        return 0
    finally:
        for key in list(selector.get_map().values()):
            if isinstance(key.data, _Stream):
                key.data.conn.close()  # held connections end with a FIN
        selector.close()
        for sock in sockets:
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
