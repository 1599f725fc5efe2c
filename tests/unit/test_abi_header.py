"""The header's constants and map declarations match the Python mirror (parsed, no compiler needed).

Every `#define KPR_<NAME> <number>` in bpf/kpr.h and bpf/lb.h is mirrored, by one rule with three exceptions: KPR_X is
abi.X; the map sizes (the -D knobs) are loader.DEFAULT_MAP_SIZES; the counter indexes KPR_CNT_<NAME> are
abi.COUNTERS["<name>"]; KPR_CRC32C_POWERS is crc32c.POWERS. A new define without a mirror fails here.
"""

from __future__ import annotations

import re

import pytest

from kpr.datapath import abi, bpfsys, crc32c, loader

pytestmark = pytest.mark.unit

HEADERS = {path.name: path.read_text() for path in (abi.HEADER, abi.BPF_DIR / "lb.h")}
HEADER = HEADERS["kpr.h"]
_DEFINE = re.compile(r"^#define (KPR_\w+)(.*)$", re.M)
_NUMBER = re.compile(r"\s+(0x[0-9a-fA-F]+|\d+)\s*(/\*.*)?$")

# KPR_ names that are no numbers: include guards and the pin path helper.
NOT_NUMBERS = {"KPR_H", "KPR_LB_H", "KPR_PIN"}
# Mirrored elsewhere than abi.<NAME>.
ELSEWHERE = {"KPR_CRC32C_POWERS": crc32c.POWERS}


def _defines() -> dict[str, str]:
    """Every KPR_ define of the headers, name -> what follows the name."""
    found: dict[str, str] = {}
    for header, text in HEADERS.items():
        for name, rest in _DEFINE.findall(text):
            assert name not in found, f"{name} is defined twice (again in {header})"
            found[name] = rest
    return found


DEFINES = {
    name: int(m[1], 0) for name, rest in _defines().items() if name not in NOT_NUMBERS and (m := _NUMBER.match(rest))
}


def _counter_name(define: str) -> str:
    return define.removeprefix("KPR_CNT_").lower()


def _mirror(define: str) -> object:
    """What a define's value must equal in Python, by the naming rule and its exceptions."""
    if define in loader.DEFAULT_MAP_SIZES:
        return loader.DEFAULT_MAP_SIZES[define]
    if define.startswith("KPR_CNT_") and define != "KPR_CNT_MAX":
        return abi.COUNTERS.get(_counter_name(define))
    if define in ELSEWHERE:
        return ELSEWHERE[define]
    return getattr(abi, define.removeprefix("KPR_"), None)


def test_every_define_is_a_plain_number() -> None:
    """The mirror is checked by value, so a define it cannot read (1ULL, an expression) must not slip through."""
    unreadable = sorted(set(_defines()) - set(DEFINES) - NOT_NUMBERS)
    assert unreadable == [], f"defines that are no plain number (write them as one): {unreadable}"


def test_every_define_is_mirrored() -> None:
    mismatched = {name: (value, _mirror(name)) for name, value in DEFINES.items() if _mirror(name) != value}
    assert mismatched == {}, "header value vs Python mirror (None: no mirror)"


def test_the_rule_reads_every_kind_of_define() -> None:
    """The parse found what it must (a broken regex would make the tests above pass vacuously)."""
    assert {"KPR_SVC_F_AFFINITY", "KPR_CT_MAX", "KPR_CNT_XLATE_FWD", "KPR_CNT_MAX", "KPR_TAILS_MAX"} <= set(DEFINES)
    assert len(DEFINES) > 80


def test_every_counter_is_mirrored_with_its_index() -> None:
    header = {_counter_name(k): v for k, v in DEFINES.items() if k.startswith("KPR_CNT_") and k != "KPR_CNT_MAX"}
    assert header == abi.COUNTERS
    assert sorted(header.values()) == list(range(len(header))), "counter indexes are appended, never renumbered"
    assert max(header.values()) < abi.CNT_MAX


def test_map_size_defaults_match_the_loader() -> None:
    assert {k: DEFINES[k] for k in loader.DEFAULT_MAP_SIZES} == loader.DEFAULT_MAP_SIZES
    for name in loader.DEFAULT_MAP_SIZES:  # the agent overrides them with -D
        assert re.search(rf"^#ifndef {name}\n#define {name} ", HEADER, re.M), name


def test_programs_define_no_abi_constants() -> None:
    """KPR_ names belong to the ABI headers: a program's own constants are not mirrored, so they go without it."""
    for program in ("sock.c", "tc.c"):
        assert not _DEFINE.findall((abi.BPF_DIR / program).read_text()), program


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
