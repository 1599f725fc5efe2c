"""The header's constants and map declarations match the Python mirror (parsed, no compiler needed)."""

from __future__ import annotations

import re

import pytest

from kpr.datapath import abi, bpfsys, crc32c, loader

pytestmark = pytest.mark.unit

HEADER = abi.HEADER.read_text()
DEFINES = {m[1]: int(m[2], 0) for m in re.finditer(r"^#define (KPR_\w+) (0x[0-9a-fA-F]+|\d+)\b", HEADER, re.M)}


def test_flag_scope_and_state_constants_match() -> None:
    expected = {
        "KPR_SCOPE_DEFAULT": abi.SCOPE_DEFAULT,
        "KPR_SCOPE_INTERNAL": abi.SCOPE_INTERNAL,
        "KPR_SVC_F_AFFINITY": abi.SVC_F_AFFINITY,
        "KPR_SVC_F_TWO_SCOPES": abi.SVC_F_TWO_SCOPES,
        "KPR_SVC_F_EMPTY_DROP": abi.SVC_F_EMPTY_DROP,
        "KPR_BACKEND_ACTIVE": abi.BACKEND_ACTIVE,
        "KPR_BACKEND_TERMINATING": abi.BACKEND_TERMINATING,
        "KPR_BACKEND_NOT_SERVING": abi.BACKEND_NOT_SERVING,
        "KPR_BACKEND_GONE": abi.BACKEND_GONE,
        "KPR_BACKEND_F_NODE_LOCAL": abi.BACKEND_F_NODE_LOCAL,
        "KPR_AFFINITY_NETNS": abi.AFFINITY_NETNS,
        "KPR_AFFINITY_ADDR": abi.AFFINITY_ADDR,
        "KPR_CNT_MAX": abi.CNT_MAX,
        "KPR_SOCKET_LB_FULL": abi.SOCKET_LB_FULL,
        "KPR_SOCKET_LB_HOSTNS_ONLY": abi.SOCKET_LB_HOSTNS_ONLY,
        "KPR_CT_TCP_LIFETIME_S": abi.CT_TCP_LIFETIME_S,
        "KPR_CT_CLOSING_LIFETIME_S": abi.CT_CLOSING_LIFETIME_S,
        "KPR_CT_UDP_LIFETIME_S": abi.CT_UDP_LIFETIME_S,
        "KPR_CT_SCTP_LIFETIME_S": abi.CT_SCTP_LIFETIME_S,
        "KPR_CT_F_CLOSING": abi.CT_F_CLOSING,
        "KPR_NODEPORT_F_LOOPBACK": abi.NODEPORT_F_LOOPBACK,
        "KPR_CONFIG_F_EXTERNAL_CLUSTER_IP": abi.CONFIG_F_EXTERNAL_CLUSTER_IP,
        "KPR_TAIL_REJECT4": abi.TAIL_REJECT4,
        "KPR_TAIL_REJECT6": abi.TAIL_REJECT6,
        "KPR_TAIL_ICMP4_IN": abi.TAIL_ICMP4_IN,
        "KPR_TAIL_ICMP6_IN": abi.TAIL_ICMP6_IN,
        "KPR_TAIL_ICMP4_OUT": abi.TAIL_ICMP4_OUT,
        "KPR_TAIL_ICMP6_OUT": abi.TAIL_ICMP6_OUT,
        "KPR_TAIL_TOOBIG4": abi.TAIL_TOOBIG4,
        "KPR_TAIL_TOOBIG6": abi.TAIL_TOOBIG6,
        "KPR_TAILS_MAX": abi.TAILS_MAX,
        "KPR_CRC32C_POWERS": crc32c.POWERS,
    }
    assert {k: DEFINES[k] for k in expected} == expected


def test_every_counter_is_mirrored_with_its_index() -> None:
    header = {
        k.removeprefix("KPR_CNT_").lower(): v
        for k, v in DEFINES.items()
        if k.startswith("KPR_CNT_") and k != "KPR_CNT_MAX"
    }
    assert header == abi.COUNTERS
    assert max(header.values()) < abi.CNT_MAX


def test_map_size_defaults_match_the_loader() -> None:
    assert {k: DEFINES[k] for k in loader.DEFAULT_MAP_SIZES} == loader.DEFAULT_MAP_SIZES


def test_every_pinned_map_is_mirrored() -> None:
    declared = re.findall(r'BPF_TABLE_PINNED\("(\w+)",\s*([^,]+),\s*([^,]+),\s*(\w+),', HEADER)
    assert {name for *_, name in declared} == set(abi.MAPS)
    for kind, _key, _value, name in declared:
        assert abi.MAPS[name].percpu == (kind == "percpu_array"), name
        assert abi.MAPS[name].programs == (kind == "prog"), name


def test_socket_hook_programs_exist_and_fit_the_kernel_name_limit() -> None:
    source = (abi.BPF_DIR / "sock.c").read_text()
    assert set(loader.SOCKET_HOOKS) == set(bpfsys.ATTACH_TYPES)
    for program in loader.SOCKET_HOOKS.values():
        assert re.search(rf"^int {program}\(struct bpf_sock_addr \*ctx\)", source, re.M), program
        assert len(program) <= 15 and program.startswith(loader.PROGRAM_PREFIX)
