"""The node's own addresses (those of the agent's network namespace), and a watch that reports when they change.

NodePorts answer on the node's local addresses (kube-proxy's iptables mode matches `--dst-type LOCAL`); kpr keeps
them in nodeport_addrs4/6 and follows addresses as they are added and removed, from netlink (RTM_NEWADDR and
RTM_DELADDR), so a new address serves NodePorts within a moment.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
from collections.abc import Callable

from kpr import log

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


def local_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of this network namespace's interfaces, loopback included."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = {a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
    return sorted(a for a in found if a)


class AddressWatch:
    """Calls `changed()` from a thread of its own whenever an address of this namespace is added or removed.

    A plain netlink socket subscribed to the address groups: every message on it is an address event, so nothing
    needs parsing (the caller re-reads the addresses). pyroute2's IPRoute is not used here because its event loop
    is tied to the thread that made it, and this socket is read from a thread of its own.
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed = changed
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))  # subscribed before the first read of addresses
        self.stop = threading.Event()
        self.log = log.get("kpr.addresses")
        self.thread = threading.Thread(target=self._run, name="address-watch", daemon=True)

    def start(self) -> AddressWatch:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                readable, _, _ = select.select([self.sock], [], [], 0.5)
                if not readable:
                    continue
                while True:  # drain what is queued: one re-read covers a burst of changes
                    self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # overrun: events were lost, so re-read all the same
                    if not self.stop.is_set():
                        self.log.warning("address watch failed; NodePort addresses no longer follow", error=str(e))
                    return
            self.changed()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()
