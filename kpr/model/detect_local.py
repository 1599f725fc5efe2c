"""kube-proxy's detect-local, ClusterCIDR mode: which sources are the cluster's own pods. Pure: no I/O.

With `--cluster-cidr`, traffic from inside the CIDR to an externalTrafficPolicy=Local frontend is served from every
endpoint (the iptables proxier's "pod traffic for external destinations" rule). kube-proxy also masquerades traffic
from outside it to a ClusterIP ("masquerade off-cluster traffic to a service VIP") so that replies come back through
the node; kpr's tc path masquerades exactly the flows whose backend is on another node, whatever the source, which
already brings every reply back. The datapath does the matching; this module validates the flag as kube-proxy's
validateDualStackCIDRStrings does: one CIDR, or a dual-stack pair.
"""

from __future__ import annotations

import ipaddress


def parse_cluster_cidrs(text: str) -> tuple[str, ...]:
    """`--cluster-cidr`: canonical CIDRs, at most one per family; ValueError with the reason otherwise."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR") from None
    if len(networks) > 2 or len({n.version for n in networks}) != len(networks):
        raise ValueError("give one CIDR, or one IPv4 and one IPv6 CIDR (dual-stack)")
    if any(n.prefixlen == 0 for n in networks):
        raise ValueError("a cluster CIDR of /0 would make every source a pod")
    return tuple(str(n) for n in networks)
