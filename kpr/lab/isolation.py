"""The root namespace must never learn about the lab: a snapshot of its routes, addresses and links, and a diff."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kpr.lab.plumbing import sh

# What must never become reachable from the root namespace because of a lab.
WATCHED_NETWORKS = ("10.244.0.0/16", "172.16.0.0/24", "10.96.0.0/12", "fd00::/8")


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """What the root network namespace routes, addresses and links look like."""

    routes: frozenset[tuple[str, ...]]  # (family, table, type, dst, gateway, dev)
    addresses: frozenset[tuple[str, str]]  # (dev, address/prefixlen)
    links: frozenset[str]


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = sh(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


def host_snapshot() -> HostSnapshot:
    routes: set[tuple[str, ...]] = set()
    for family in ("-4", "-6"):
        for route in _ip_json(family, "route", "show", "table", "all"):
            routes.add(
                (
                    family,
                    str(route.get("table", "main")),
                    str(route.get("type", "unicast")),
                    str(route.get("dst", "")),
                    str(route.get("gateway", "")),
                    str(route.get("dev", "")),
                )
            )
    addresses = {
        (link["ifname"], f"{info['local']}/{info['prefixlen']}")
        for link in _ip_json("addr", "show")
        for info in link.get("addr_info", [])
        if "local" in info
    }
    links = {link["ifname"] for link in _ip_json("link", "show")}
    return HostSnapshot(frozenset(routes), frozenset(addresses), frozenset(links))


def _overlaps_watched(text: str, family: str) -> bool:
    if text == "default":
        text = "0.0.0.0/0" if family == "-4" else "::/0"
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    for watched in WATCHED_NETWORKS:
        other = ipaddress.ip_network(watched)
        if other.version == net.version and net.overlaps(other):
            return True
    return False


def host_violations(before: HostSnapshot, after: HostSnapshot, prefix: str, names: Iterable[str] = ()) -> list[str]:
    """What the lab added to the root namespace: routes or addresses for cluster ranges, lab-named interfaces."""
    problems: list[str] = []
    for family, table, kind, dst, gateway, dev in sorted(after.routes - before.routes):
        if _overlaps_watched(dst, family):
            problems.append(f"route {dst} via {gateway or '-'} dev {dev or '-'} (table {table}, {kind})")
    for dev, address in sorted(after.addresses - before.addresses):
        if _overlaps_watched(address, "-6" if ":" in address else "-4"):
            problems.append(f"address {address} on {dev}")
    lab_names = set(names)
    for link in sorted(after.links):
        if link.startswith(prefix) or (link in lab_names and link not in before.links):
            problems.append(f"interface {link}")
    return problems
