"""Remove what kube-proxy leaves on a node, so switching to kpr is one step (`kpr cleanup --kube-proxy`).

Like `kube-proxy --cleanup`: in every iptables backend present (nft and legacy, IPv4 and IPv6) the jumps into
KUBE-* chains are deleted from the other chains, then the KUBE-* chains are flushed and deleted; the nftables tables
`ip kube-proxy` and `ip6 kube-proxy` are deleted; the IPVS dummy device kube-ipvs0 is deleted. Everything else is
left as it was, and running it twice is harmless. It works in the current network namespace.

A command that fails counts as "nothing there" only when it says so (absent()): a missing table, backend, address
family or device. Any other failure is an error in the report, above all "Permission denied" (legacy iptables needs
CAP_NET_RAW, every backend CAP_NET_ADMIN) and a held xtables lock: a cleanup that could not look must not report that
it found nothing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

IPTABLES_BINARIES = ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy")
TABLES = ("nat", "filter", "mangle")
CHAIN_PREFIX = "KUBE-"
NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
# What iptables, nft and ip print when there is nothing to clean, as opposed to when they could not look:
ABSENT = (
    "Table does not exist",  # legacy iptables: the table, or its kernel module, is not there
    "No such file or directory",  # nft list table: no such table
    "does not exist",  # ip link show: Device "kube-ipvs0" does not exist.
    "Cannot find device",  # ip link delete of a device gone meanwhile
    "Address family not supported",  # ip6tables on a node booted with ipv6.disable=1
    "Protocol not supported",  # a backend whose kernel side (nf_tables, ip_tables) is not built
)


@dataclass
class KubeProxyCleanup:
    removed: list[str] = field(default_factory=list)  # human-readable, one line per thing removed
    errors: list[str] = field(default_factory=list)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _iptables(binary: str, table: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([binary, "-w", "5", "-t", table, *args])


def absent(stderr: str) -> bool:
    """Whether a failed command's message means "not there" (ABSENT) rather than "could not look"."""
    return any(text in stderr for text in ABSENT)


def _failure(argv: str, result: subprocess.CompletedProcess[str]) -> str:
    message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
    return f"{argv}: {message}"


def clean_iptables(binary: str, report: KubeProxyCleanup) -> None:
    for table in TABLES:
        listing = _iptables(binary, table, "-S")
        if listing.returncode != 0:
            if not absent(listing.stderr):  # e.g. Permission denied: kube-proxy's chains may well be there
                report.errors.append(_failure(f"{binary} -t {table} -S", listing))
            continue
        lines = listing.stdout.splitlines()
        chains = [line.split()[1] for line in lines if line.startswith(f"-N {CHAIN_PREFIX}")]
        if not chains:
            continue
        for line in lines:
            parts = shlex.split(line)
            if parts[:1] != ["-A"] or parts[1].startswith(CHAIN_PREFIX):
                continue
            if any(parts[i] in ("-j", "-g") and parts[i + 1].startswith(CHAIN_PREFIX) for i in range(len(parts) - 1)):
                result = _iptables(binary, table, "-D", *parts[1:])
                if result.returncode == 0:
                    report.removed.append(f"{binary} -t {table}: rule {line}")
                else:
                    report.errors.append(f"{binary} -t {table} -D {line}: {result.stderr.strip()}")
        for chain in chains:
            _iptables(binary, table, "-F", chain)
        for chain in chains:
            result = _iptables(binary, table, "-X", chain)
            if result.returncode == 0:
                report.removed.append(f"{binary} -t {table}: chain {chain}")
            else:
                report.errors.append(f"{binary} -t {table} -X {chain}: {result.stderr.strip()}")


def clean_nftables(report: KubeProxyCleanup) -> None:
    if shutil.which("nft") is None:
        return
    for family, name in NFT_TABLES:
        listing = _run(["nft", "list", "table", family, name])
        if listing.returncode != 0:
            if not absent(listing.stderr):
                report.errors.append(_failure(f"nft list table {family} {name}", listing))
            continue
        result = _run(["nft", "delete", "table", family, name])
        if result.returncode == 0:
            report.removed.append(f"nftables: table {family} {name}")
        else:
            report.errors.append(f"nft delete table {family} {name}: {result.stderr.strip()}")


def clean_ipvs(report: KubeProxyCleanup) -> None:
    listing = _run(["ip", "link", "show", "kube-ipvs0"])
    if listing.returncode != 0:
        if not absent(listing.stderr):
            report.errors.append(_failure("ip link show kube-ipvs0", listing))
        return
    result = _run(["ip", "link", "delete", "kube-ipvs0"])
    if result.returncode == 0:
        report.removed.append("link kube-ipvs0")
    elif not absent(result.stderr):
        report.errors.append(_failure("ip link delete kube-ipvs0", result))


def clean_kube_proxy() -> KubeProxyCleanup:
    report = KubeProxyCleanup()
    for binary in IPTABLES_BINARIES:
        if shutil.which(binary):
            clean_iptables(binary, report)
    clean_nftables(report)
    clean_ipvs(report)
    return report
