"""--nodeport-addresses as kube-proxy reads it: the cases of pkg/proxy/util/nodeport_addresses_test.go
(TestGetNodeIPs), run through kpr/model/nodeports.py, plus kpr's keywords and what it does with loopback."""

from __future__ import annotations

import pytest

from kpr.model import nodeports

pytestmark = pytest.mark.unit

V4_NODE = ["10.20.30.51", "100.200.201.1", "127.0.0.1"]
V6_NODE = ["2001:db8::1", "::1"]


def served(spec: list[str], local: list[str], primary: tuple[str, ...] = ()) -> set[str]:
    return set(nodeports.nodeport_addresses(nodeports.parse(spec), local, primary))


@pytest.mark.parametrize(
    ("name", "spec", "local", "expected"),
    [
        ("IPv4 single", ["10.20.30.0/24"], V4_NODE[:2] + V6_NODE[:1], {"10.20.30.51", "2001:db8::1"}),
        ("IPv4 zero CIDR", ["0.0.0.0/0"], ["10.20.30.51", "127.0.0.1"], {"10.20.30.51", "127.0.0.1"}),
        # kube-proxy lists ::1 too, but IPv6 loopback cannot carry a NodePort (no route_localnet for IPv6)
        ("IPv6 multiple", ["2001:db8::/64", "::1/128"], ["10.20.30.51", *V6_NODE], {"2001:db8::1", "10.20.30.51"}),
        ("IPv6 zero CIDR", ["::/0"], V6_NODE, {"2001:db8::1"}),
        ("IPv4 localhost exact", ["127.0.0.1/32"], ["10.20.30.51", "127.0.0.1"], {"127.0.0.1"}),
        ("IPv4 localhost subnet", ["127.0.0.0/8"], ["127.0.1.1"], {"127.0.1.1"}),
        ("IPv4 multiple", ["10.20.30.0/24", "100.200.201.0/24"], V4_NODE, {"10.20.30.51", "100.200.201.1"}),
        ("IPv4 multiple, no match", ["10.20.30.0/24", "100.200.201.0/24"], ["192.168.1.2", "127.0.0.1"], set()),
        ("empty list, IPv4 addrs", [], ["192.168.1.2", "127.0.0.1"], {"192.168.1.2", "127.0.0.1"}),
        ("empty list, IPv6 addrs", [], V6_NODE, {"2001:db8::1"}),
        ("IPv4 redundant CIDRs", ["1.2.3.0/24", "0.0.0.0/0"], ["1.2.3.4"], {"1.2.3.4"}),
        (
            "Dual-stack, redundant IPv4",
            ["0.0.0.0/0", "1.2.3.0/24", "2001:db8::1/128"],
            ["1.2.3.4", "2001:db8::1", "127.0.0.1", "::1"],
            {"1.2.3.4", "127.0.0.1", "2001:db8::1"},
        ),
    ],
)
def test_kube_proxys_get_node_ips_cases(name: str, spec: list[str], local: list[str], expected: set[str]) -> None:
    assert served(spec, local) == expected, name


def test_primary_is_the_nodes_node_ip_of_each_family() -> None:
    local = ["10.20.30.51", "10.99.0.1", "2001:db8::1", "2001:db8::2", "127.0.0.1"]
    assert served(["primary"], local, ("10.20.30.51", "2001:db8::1")) == {"10.20.30.51", "2001:db8::1"}
    # without a Node (yet), primary matches nothing of either family: NodePorts wait for it rather than guess
    assert served(["primary"], local) == set()


def test_keywords_and_loopback_flags() -> None:
    local = ["10.20.30.51", "127.0.0.1", "2001:db8::1", "::1"]
    assert nodeports.nodeport_addresses(nodeports.parse(["localhost"]), local, ()) == {"127.0.0.1": True}
    everything = nodeports.nodeport_addresses(nodeports.parse(["all"]), local, ())
    assert everything == {"10.20.30.51": False, "127.0.0.1": True, "2001:db8::1": False}
    assert nodeports.nodeport_addresses((), local, ()) == everything  # the default is kube-proxy iptables' "all"


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "eth0", "primary,", "local"])
def test_bad_values_are_refused(bad: str) -> None:
    if bad == "primary,":
        assert nodeports.parse(bad.split(",")) == ("primary",)  # an empty item is ignored, as kube-proxy's split
        return
    with pytest.raises(ValueError, match="neither a CIDR nor"):
        nodeports.parse([bad])
