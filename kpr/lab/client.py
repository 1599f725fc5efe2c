"""A lab traffic client that counts who answered: one JSON object on stdout, errors counted by errno name.

    python -m kpr.lab.client tcp 10.96.0.10 80 --count 300
    python -m kpr.lab.client udp fd00:96::a 53 --duration 5 --interval 0.01 --connected

Each attempt uses a new socket (a new source port, so a new flow for the load balancer). TCP: connect, read the
server's line, wait for its close, close. UDP: sendto + recvfrom on an unconnected socket, or with --connected
connect() + send + recv. The servers are kpr.lab.echo, whose line "{name} {client_ip} {client_port}" says which
backend answered ("served") and which client address it saw ("seen_as"). "peers" is the address the client believes
it talks to: getpeername() after connect, or the source address recvfrom() reported for a UDP reply; with socket-level
load balancing that is the service address, not the backend.

Standard library only and no imports from the rest of kpr, so it starts fast and runs by file path.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import socket
import sys
import time
from collections import Counter
from typing import Any

_REQUEST = b"kpr\n"


class _Failure(Exception):
    """An attempt failed for a reason that has no errno (the server closed without a reply, a malformed reply)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_name(exc: BaseException) -> str:
    """The errno name of an attempt's failure ("ECONNREFUSED"), "timeout" for a socket timeout."""
    if isinstance(exc, _Failure):
        return exc.reason
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return type(exc).__name__


def format_addr(addr: tuple[Any, ...]) -> str:
    host = str(addr[0]).split("%", 1)[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def resolve(host: str, port: int, kind: int) -> tuple[int, tuple[Any, ...]]:
    """The address family and socket address of HOST (an IPv4/IPv6 literal, brackets optional, or a name)."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        family, _type, _proto, _canon, sockaddr = socket.getaddrinfo(host, port, type=kind)[0]
        return family, sockaddr
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


def _parse_reply(data: bytes) -> tuple[str, str]:
    fields = data.decode(errors="replace").split()
    if len(fields) < 2:
        raise _Failure("bad_reply")
    return fields[0], fields[1]


def tcp_attempt(family: int, sockaddr: tuple[Any, ...], timeout: float) -> tuple[str, str, str, float]:
    """(server name, client address the server saw, peer address, latency in ms) of one TCP connection."""
    started = time.perf_counter()
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        peer = format_addr(sock.getpeername())
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(512)
            if not chunk:
                raise _Failure("EOF" if not buf else "bad_reply")
            buf += chunk
        latency = (time.perf_counter() - started) * 1000.0
        # Let the server close first (its FIN normally came with the line): no TIME_WAIT on the client side.
        try:
            while sock.recv(512):
                pass
        except OSError:
            pass
        name, seen = _parse_reply(buf)
        return name, seen, peer, latency
    finally:
        sock.close()


def udp_attempt(family: int, sockaddr: tuple[Any, ...], timeout: float, connected: bool) -> tuple[str, str, str, float]:
    """(server name, client address the server saw, reply source or peer address, latency in ms) of one datagram."""
    started = time.perf_counter()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        if connected:
            sock.connect(sockaddr)
            sock.send(_REQUEST)
            data = sock.recv(2048)
            peer = format_addr(sock.getpeername())
        else:
            sock.sendto(_REQUEST, sockaddr)
            data, source = sock.recvfrom(2048)
            peer = format_addr(source)
        latency = (time.perf_counter() - started) * 1000.0
        name, seen = _parse_reply(data)
        return name, seen, peer, latency
    finally:
        sock.close()


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list, None when it is empty."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(fraction * len(sorted_values) + 0.999999) - 1))
    return round(sorted_values[rank], 3)


def run(
    proto: str,
    host: str,
    port: int,
    *,
    count: int | None = 1,
    duration: float | None = None,
    interval: float = 0.0,
    timeout: float = 2.0,
    connected: bool = False,
    sequence: bool = False,
) -> dict[str, Any]:
    """Run the attempts and return the summary that main() prints."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family, sockaddr = resolve(host, port, kind)
    served: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    peers: Counter[str] = Counter()
    seen_as: Counter[str] = Counter()
    order: list[str] = []
    latencies: list[float] = []
    error_latencies: list[float] = []
    first_error_after: float | None = None
    attempts = 0
    start = time.perf_counter()
    deadline = start + duration if duration is not None else None
    while True:
        if deadline is not None:
            if time.perf_counter() >= deadline:
                break
        elif attempts >= (count or 0):
            break
        if attempts and interval > 0:
            time.sleep(interval)
            if deadline is not None and time.perf_counter() >= deadline:
                break
        attempts += 1
        began = time.perf_counter()
        try:
            if proto == "tcp":
                name, seen, peer, latency = tcp_attempt(family, sockaddr, timeout)
            else:
                name, seen, peer, latency = udp_attempt(family, sockaddr, timeout, connected)
        except (OSError, _Failure) as exc:
            errors[error_name(exc)] += 1
            error_latencies.append((time.perf_counter() - began) * 1000.0)
            if first_error_after is None:
                first_error_after = round((began - start) * 1000.0, 3)
            if sequence:
                order.append("!" + error_name(exc))
            continue
        served[name] += 1
        seen_as[seen] += 1
        peers[peer] += 1
        latencies.append(latency)
        if sequence:
            order.append(name)
    latencies.sort()
    error_latencies.sort()
    result: dict[str, Any] = {
        "proto": proto,
        "target": format_addr(sockaddr),
        "attempts": attempts,
        "ok": len(latencies),
        "served": dict(served),
        "errors": dict(errors),
        "peers": dict(peers),
        "seen_as": dict(seen_as),
        "first_error_after_ms": first_error_after,
        "error_latency_ms": {"p50": percentile(error_latencies, 0.5), "max": percentile(error_latencies, 1.0)},
        "latency_ms": {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "max": percentile(latencies, 1.0),
        },
        "elapsed_ms": round((time.perf_counter() - start) * 1000.0, 3),
    }
    if sequence:
        result["sequence"] = order
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpr.lab.client", description=__doc__.splitlines()[0])
    parser.add_argument("proto", choices=("tcp", "udp"))
    parser.add_argument("host", help="IPv4 or IPv6 address (brackets optional) or a name")
    parser.add_argument("port", type=int)
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument("--count", type=int, help="number of attempts (default 1)")
    how_long.add_argument("--duration", type=float, metavar="S", help="keep going for S seconds")
    parser.add_argument("--interval", type=float, default=0.0, metavar="S", help="pause between attempts")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="S", help="per-attempt socket timeout")
    parser.add_argument("--connected", action="store_true", help="UDP: connect() + send + recv")
    parser.add_argument("--sequence", action="store_true", help='also list the servers in order as "sequence"')
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 0:
        parser.error("--count must be >= 0")
    count = 1 if args.count is None and args.duration is None else args.count
    try:
        result = run(
            args.proto,
            args.host,
            args.port,
            count=count,
            duration=args.duration,
            interval=args.interval,
            timeout=args.timeout,
            connected=args.connected,
            sequence=args.sequence,
        )
    except OSError as exc:  # the name did not resolve
        parser.exit(2, f"{parser.prog}: cannot resolve {args.host}: {exc}\n")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
