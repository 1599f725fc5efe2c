"""Long-lived lab traffic: TCP connections held open and a connected UDP socket, each pinging until told to stop.

    python -m kpr.lab.holder --tcp 10.96.0.10 90 --connections 6 --udp 10.96.0.10 53 --interval 0.05

Every held TCP connection sends "ping N" lines to a kpr.lab.echo --stream port and expects "{pod} ping N" back; the
UDP socket is connect()ed once and sends a datagram per interval to an echo UDP port, expecting "{pod} ...". What a
rollout must not do to them is what this records, with wall-clock times so a test can line it up with its own steps:

- per TCP connection: the pod that answered, when it opened, how many pings were answered, and how it ended: "closed"
  (the server's FIN: its process shut down), an errno name (ECONNRESET …), "timeout", "wrong-pod" (an answer from
  another pod: the flow was moved), or null (still open at the end). A connection that ends is replaced by a new one.
- for UDP: every answer as [time, pod] and every failure as [time, reason]; after ECONNABORTED (kpr destroyed the
  socket because its backend stopped serving) or ECONNREFUSED the socket is replaced by a new connected one.

Runs until SIGTERM or SIGINT (or --duration), then prints one JSON object. Standard library only, run by file path.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import sys
import threading
import time
from typing import Any

_stop = threading.Event()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return type(exc).__name__


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hold_tcp(host: str, port: int, interval: float, timeout: float, log: list[dict[str, Any]]) -> None:
    """Keep one connection open, pinging; when it ends, record how and open another."""
    while not _stop.is_set():
        entry: dict[str, Any] = {"pod": None, "opened": time.time(), "ok": 0, "ended": None, "end": None}
        log.append(entry)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            entry.update(ended=time.time(), end=_reason(e))
            _stop.wait(interval)
            continue
        with sock:
            reader = sock.makefile("rb")
            n = 0
            while not _stop.is_set():
                line = f"ping {n}"
                try:
                    sock.sendall(line.encode() + b"\n")
                    answer = reader.readline()
                except OSError as e:
                    entry.update(ended=time.time(), end=_reason(e))
                    break
                if not answer:
                    entry.update(ended=time.time(), end="closed")
                    break
                pod, _, rest = answer.decode(errors="replace").strip().partition(" ")
                if rest != line or entry["pod"] not in (None, pod):
                    entry.update(ended=time.time(), end="wrong-pod", answered_by=pod)
                    break
                entry["pod"] = pod
                entry["ok"] += 1
                n += 1
                _stop.wait(interval)
        _stop.wait(interval)


def hold_udp(host: str, port: int, interval: float, timeout: float, out: dict[str, Any]) -> None:
    """One connected UDP socket, replaced only when the kernel reports it broken."""
    answers: list[list[Any]] = out.setdefault("answers", [])
    failures: list[list[Any]] = out.setdefault("failures", [])
    sock: socket.socket | None = None
    while not _stop.is_set():
        try:
            if sock is None:
                sock = socket.socket(_family(host), socket.SOCK_DGRAM)
                sock.settimeout(timeout)
                sock.connect((host, port))
                out["sockets"] = out.get("sockets", 0) + 1
            sock.send(b"kpr\n")
            data = sock.recv(512)
            answers.append([time.time(), data.decode(errors="replace").split(" ", 1)[0]])
        except OSError as e:
            failures.append([time.time(), _reason(e)])
            if not (isinstance(e, TimeoutError) and e.errno is None) and sock is not None:
                sock.close()  # ECONNABORTED (destroyed), ECONNREFUSED: connect again, through the socket hook
                sock = None
        _stop.wait(interval)
    if sock is not None:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpr.lab.holder", description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", nargs=2, metavar=("HOST", "PORT"), help="an echo --stream port to hold")
    parser.add_argument("--connections", type=int, default=4, help="TCP connections held at once")
    parser.add_argument("--udp", nargs=2, metavar=("HOST", "PORT"), help="an echo UDP port to ping")
    parser.add_argument("--interval", type=float, default=0.05, metavar="S")
    parser.add_argument("--timeout", type=float, default=1.0, metavar="S", help="per-answer timeout")
    parser.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0: signal)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: _stop.set())
    tcp: list[list[dict[str, Any]]] = []
    udp: dict[str, Any] = {}
    threads = []
    if args.tcp:
        host, port = args.tcp[0].strip("[]"), int(args.tcp[1])
        for _ in range(args.connections):
            log: list[dict[str, Any]] = []
            tcp.append(log)
            threads.append(threading.Thread(target=hold_tcp, args=(host, port, args.interval, args.timeout, log)))
    if args.udp:
        host, port = args.udp[0].strip("[]"), int(args.udp[1])
        threads.append(threading.Thread(target=hold_udp, args=(host, port, args.interval, args.timeout, udp)))
    for t in threads:
        t.start()
    sys.stdout.write("holding\n")
    sys.stdout.flush()
    if args.duration:
        _stop.wait(args.duration)
        _stop.set()
    while not _stop.is_set():
        _stop.wait(0.2)
    for t in threads:
        t.join()
    sys.stdout.write(json.dumps({"tcp": [entry for log in tcp for entry in log], "udp": udp}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
