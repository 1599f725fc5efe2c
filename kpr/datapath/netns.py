"""Running code in another network namespace from a thread of this process.

setns(CLONE_NEWNET) changes only the calling thread's namespace, and a socket belongs to the namespace it was made
in for its whole life. So a thread that has joined a namespace can make sockets there (listening, connected, netlink)
that the rest of the process then uses, without the process or the host network ever changing namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

CLONE_NEWNET = 0x40000000
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
