"""`kpr cleanup --kube-proxy` tells "nothing there" from "could not look".

The iptables, nft and ip commands are replaced by a table of answers (argv -> exit status, stdout, stderr) with the
messages the real tools print (iptables v1.8.9, nftables 1.0.6, iproute2 6.1, recorded in a namespace with and
without CAP_NET_ADMIN/CAP_NET_RAW). tests/datapath/test_operator.py runs the real tools on real rules.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from kpr.cli.main import main
from kpr.datapath import kube_proxy

pytestmark = pytest.mark.unit

LEGACY_DENIED = (
    "iptables v1.8.9 (legacy): can't initialize iptables table `{table}': Permission denied (you must be root)\n"
    "Perhaps iptables or your kernel needs to be upgraded.\n"
)
NFT_BACKEND_DENIED = (
    "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n"
)
LEGACY_NO_TABLE = (
    "iptables v1.8.9 (legacy): can't initialize iptables table `{table}': Table does not exist (do you need to "
    "insmod?)\nPerhaps iptables or your kernel needs to be upgraded.\n"
)
XTABLES_LOCK = "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n"
NFT_DENIED = (
    "Operation not permitted (you must be root)\nnetlink: Error: cache initialization failed: Operation not permitted\n"
)
NO_IPV6 = "ip6tables v1.8.9 (legacy): socket: Address family not supported by protocol\n"
NFT_NO_TABLE = "Error: No such file or directory\nlist table ip kube-proxy\n              ^^^^^^^^^^\n"
NO_IPVS = 'Device "kube-ipvs0" does not exist.\n'
EMPTY_NAT = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
KUBE_NAT = EMPTY_NAT + (
    "-N KUBE-SERVICES\n"
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
    "-A OUTPUT -j KUBE-SERVICES\n"
)


class Tools:
    """The answers of the fake tools, by argv prefix (the longest that matches); every call is recorded."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]], binaries: set[str]) -> None:
        self.answers = answers
        self.binaries = binaries
        self.calls: list[list[str]] = []

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        key = tuple(a for a in argv if a not in ("-w", "5"))
        matches = [prefix for prefix in self.answers if key[: len(prefix)] == prefix]
        if not matches:
            return subprocess.CompletedProcess(argv, 0, "", "")
        status, out, err = self.answers[max(matches, key=len)]
        return subprocess.CompletedProcess(argv, status, out, err)

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.binaries else None


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tools]:
    fake = Tools({}, {"iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy", "nft", "ip"})
    monkeypatch.setattr(kube_proxy, "_run", fake.run)
    monkeypatch.setattr(kube_proxy.shutil, "which", fake.which)
    yield fake


def nothing_anywhere() -> dict[tuple[str, ...], tuple[int, str, str]]:
    """A node without kube-proxy: empty tables, no nftables table, no kube-ipvs0."""
    return {
        ("nft", "list", "table"): (1, "", NFT_NO_TABLE),
        ("ip", "link", "show", "kube-ipvs0"): (1, "", NO_IPVS),
        **{(b, "-t"): (0, EMPTY_NAT, "") for b in kube_proxy.IPTABLES_BINARIES},
    }


def test_a_clean_node_reports_nothing_removed_and_no_error(tools: Tools) -> None:
    tools.answers = nothing_anywhere()
    report = kube_proxy.clean_kube_proxy()
    assert (report.removed, report.errors) == ([], [])


def test_missing_tables_and_families_are_nothing_to_clean(tools: Tools) -> None:
    tools.answers = {
        **nothing_anywhere(),
        **{("iptables-legacy", "-t", t, "-S"): (3, "", LEGACY_NO_TABLE.format(table=t)) for t in kube_proxy.TABLES},
        ("ip6tables-legacy", "-t"): (3, "", NO_IPV6),
    }
    assert kube_proxy.clean_kube_proxy().errors == []
    assert sum(c[0] == "ip6tables-legacy" for c in tools.calls) == len(kube_proxy.TABLES)  # asked, and it said no


@pytest.mark.parametrize(
    ("binary", "stderr", "told"),
    [
        ("iptables-legacy", LEGACY_DENIED, "Permission denied"),  # no CAP_NET_RAW: legacy opens a raw socket
        ("ip6tables-legacy", LEGACY_DENIED.replace("iptables", "ip6tables"), "Permission denied"),
        ("iptables-nft", NFT_BACKEND_DENIED, "Permission denied"),  # no CAP_NET_ADMIN
        ("iptables-legacy", XTABLES_LOCK, "holding the xtables lock"),  # another iptables user, for 5 s
        ("iptables-nft", "iptables v1.8.9 (nf_tables): never seen before\n", "never seen before"),  # unknown: error
    ],
)
def test_a_listing_that_could_not_look_is_an_error_not_an_empty_table(
    tools: Tools, binary: str, stderr: str, told: str
) -> None:
    tools.answers = {
        **nothing_anywhere(),
        **{(binary, "-t", t, "-S"): (4, "", stderr.format(table=t)) for t in kube_proxy.TABLES},
    }
    report = kube_proxy.clean_kube_proxy()
    assert [e.split(":")[0] for e in report.errors] == [f"{binary} -t {t} -S" for t in kube_proxy.TABLES]
    assert all(told in e and "\n" not in e for e in report.errors), report.errors


def test_nft_and_ip_that_could_not_look_are_errors(tools: Tools) -> None:
    tools.answers = {
        **nothing_anywhere(),
        ("nft", "list", "table", "ip", "kube-proxy"): (1, "", NFT_DENIED),
        ("ip", "link", "show", "kube-ipvs0"): (1, "", "RTNETLINK answers: Operation not permitted\n"),
    }
    errors = kube_proxy.clean_kube_proxy().errors
    assert any(e.startswith("nft list table ip kube-proxy: Operation not permitted") for e in errors), errors
    assert not any("ip6 kube-proxy" in e for e in errors)  # that one answered "No such file or directory"
    assert any(e.startswith("ip link show kube-ipvs0: RTNETLINK answers: Operation not permitted") for e in errors)


def test_rules_found_are_removed_jumps_first(tools: Tools) -> None:
    tools.answers = {**nothing_anywhere(), ("iptables-nft", "-t", "nat", "-S"): (0, KUBE_NAT, "")}
    report = kube_proxy.clean_kube_proxy()
    assert report.errors == []
    mutations = [c for c in tools.calls if any(flag in c for flag in ("-D", "-F", "-X"))]
    assert [c[c.index("-t") + 2] for c in mutations] == ["-D", "-D", "-F", "-X"]
    assert report.removed[-1] == "iptables-nft -t nat: chain KUBE-SERVICES"


def test_cleanup_exits_non_zero_and_says_what_it_needs_when_denied(
    tools: Tools, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    tools.answers = {
        **nothing_anywhere(),
        **{("iptables-legacy", "-t", t, "-S"): (4, "", LEGACY_DENIED.format(table=t)) for t in kube_proxy.TABLES},
    }
    result = CliRunner().invoke(main, ["cleanup", "--kube-proxy", "--keep-kpr"])
    assert result.exit_code == 1, result.output
    assert "removed 0 piece(s) of kube-proxy state" in result.output
    assert "iptables-legacy -t nat -S: iptables v1.8.9 (legacy): can't initialize iptables table" in result.output
    assert "Permission denied" in result.output and "CAP_NET_RAW" in result.output
