"""Running code in another network namespace from a thread of this process.

setns(CLONE_NEWNET) changes only the calling thread's namespace, and a socket belongs to the namespace it was made
in for its whole life. So a thread that has joined a namespace can make sockets there (listening, connected, netlink)
that the rest of the process then uses, without the process or the host network ever changing namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # asm-generic/socket.h's number, which every architecture in bpfsys.BPF_SYSCALLS uses
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))  # where ip-netns, containerd and CRI-O bind-mount them
T = TypeVar("T")


def join(netns: str | int) -> None:
    """Move the calling thread into a network namespace, given as a path (/run/netns/NAME) or an open fd."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if isinstance(netns, str) else netns
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        if isinstance(netns, str):
            os.close(fd)


def run_in(netns: str | int, fn: Callable[[], T], name: str = "kpr-netns") -> T:
    """fn() in a short-lived thread that joined `netns`; its result, or its exception raised here."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            join(netns)
            results.append(fn())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def executor(netns: str, workers: int = 1, name: str = "kpr-netns") -> ThreadPoolExecutor:
    """A thread pool whose threads all live in `netns`: what they connect to is reached from there."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=join, initargs=(netns,))


def node_namespaces(cgroup_root: Path) -> list[str]:
    """One path per distinct network namespace of the node: its own, its processes' (found in the cgroup subtree
    the socket hooks are attached to) and the bind mounts in /run/netns (pod sandboxes)."""
    seen: dict[tuple[int, int], str] = {}

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:  # the process exited, or a stale bind mount
            return
        seen.setdefault((st.st_dev, st.st_ino), path)

    add("/proc/self/ns/net")
    cgroups = os.walk(cgroup_root) if (cgroup_root / "cgroup.procs").exists() else iter(())  # a cgroup directory only
    for dirpath, _dirs, _files in cgroups:
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            add(f"/proc/{pid}/ns/net")
    for directory in NETNS_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            add(entry.path)
    return list(seen.values())


def cookie() -> int:
    """The calling thread's network namespace cookie (what bpf_get_netns_cookie() returns for its sockets)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)  # a native u64


@dataclass(frozen=True, slots=True)
class PrimaryAddresses:
    cookie: int
    ipv4: str  # "" when the namespace has none
    ipv6: str


def primary_addresses() -> PrimaryAddresses:
    """The calling thread's namespace: its cookie and, per family, the global address its traffic leaves with (the
    one on the default route's device first; a pod has just one)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        default_devices = {
            route.get_attr("RTA_OIF")
            for family in (socket.AF_INET, socket.AF_INET6)
            for route in ipr.get_default_routes(family=family)
        }
        best: dict[int, tuple[bool, str]] = {}
        for addr in ipr.get_addr():
            family, text = addr["family"], addr.get_attr("IFA_ADDRESS")
            if addr["scope"] != 0 or not text or family not in (socket.AF_INET, socket.AF_INET6):
                continue  # link-local, host-scoped (loopback) or not an IP address
            rank = (addr["index"] not in default_devices, text)
            if family not in best or rank < best[family]:
                best[family] = rank
    v4, v6 = (best.get(f, (True, ""))[1] for f in (socket.AF_INET, socket.AF_INET6))
    return PrimaryAddresses(cookie(), v4, v6)


def addresses_of(paths: list[str]) -> dict[str, PrimaryAddresses]:
    """primary_addresses() of each namespace path (ones gone meanwhile are left out)."""
    out: dict[str, PrimaryAddresses] = {}

    def each() -> None:
        for path in paths:
            try:
                join(path)
            except OSError:
                continue
            out[path] = primary_addresses()

    run_in("/proc/self/ns/net", each, name="kpr-netns-addrs")
    return out
