"""Which of the node's addresses NodePorts answer on: kube-proxy's --nodeport-addresses. Pure: no I/O.

Mirrors pkg/proxy/util/nodeport_addresses.go (NewNodePortAddresses, GetNodeIPs) and cmd/kube-proxy's
expandNodePortAddressKeywords: a list of CIDRs and the keywords `primary` (the Node object's node IP of each family),
`localhost` (127.0.0.0/8 and ::1/128) and `all` (0.0.0.0/0 and ::/0); per family, a list without a CIDR of that family
matches every address of it. `primary` before the Node is known matches nothing (kube-proxy would fall back to
127.0.0.1): NodePorts then wait for the node's IP rather than answer on addresses nobody chose. Unset, kpr does what
kube-proxy's iptables mode does: `all`, loopback included, so `127.0.0.1:<nodePort>` answers on the node itself
(kube-proxy's localhost NodePorts; IPv4 only, as there).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

KEYWORDS = ("primary", "localhost", "all")
WILDCARD = {4: "0.0.0.0", 6: "::"}  # the address NodePort frontends are keyed by in the maps


def parse(values: Iterable[str]) -> tuple[str, ...]:
    """Validate --nodeport-addresses: keywords as they are, CIDRs canonical (host bits cleared); ValueError else."""
    out = []
    for raw in values:
        value = raw.strip()
        if not value:
            continue
        if value in KEYWORDS:
            out.append(value)
            continue
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise ValueError(f"{value!r} is neither a CIDR nor one of {', '.join(KEYWORDS)}") from None
    return tuple(out)


def _expand(spec: Sequence[str], primary_ips: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    cidrs: list[str] = []
    keyword_families = set()  # keywords speak for both families, even when `primary` has no IP of one (yet)
    for value in spec or ("all",):
        if value == "primary":
            cidrs += [f"{ip}/{32 if ':' not in ip else 128}" for ip in primary_ips if not _is_loopback(ip)]
        elif value == "localhost":
            cidrs += ["127.0.0.0/8", "::1/128"]
        elif value == "all":
            cidrs += ["0.0.0.0/0", "::/0"]
        else:
            cidrs.append(value)
            continue
        keyword_families |= {4, 6}
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    for version, zero in ((4, "0.0.0.0/0"), (6, "::/0")):  # a family without a CIDR: all of its addresses
        if version not in keyword_families and not any(n.version == version for n in networks):
            networks.append(ipaddress.ip_network(zero))
    return networks


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def nodeport_addresses(spec: Sequence[str], local: Iterable[str], primary_ips: Sequence[str]) -> dict[str, bool]:
    """The node's local addresses NodePorts answer on, each with whether it is loopback (served to the host's own
    sockets only). IPv6 loopback never serves NodePorts, as with kube-proxy."""
    networks = _expand(spec, primary_ips)
    out = {}
    for text in local:
        ip = ipaddress.ip_address(text)
        if ip.version == 6 and ip.is_loopback:
            continue
        if any(ip in n for n in networks if n.version == ip.version):
            out[str(ip)] = ip.is_loopback
    return dict(sorted(out.items()))
