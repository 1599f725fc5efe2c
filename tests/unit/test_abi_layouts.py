"""A map's pin carries its layout version (KPR_PIN(name, layout) in bpf/kpr.h, MapSpec.layout in abi.py), and the
version goes up with every change of its key or value layout, so that a new kpr never adopts or copies a map of an
older layout whose sizes happen to match.

RECORDED holds, for every (map, layout version) that has ever existed, a fingerprint of its key and value layouts
(field names, offsets, sizes and types, recursively, from abi.py's ctypes mirror, which tests/datapath/test_abi.py
holds to the compiled header). Never edit a recorded fingerprint: a changed layout gets a new version in kpr.h and
abi.py and a new line here.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from typing import Any

import pytest

from kpr.datapath import abi, migrate

pytestmark = pytest.mark.unit

RECORDED: dict[tuple[str, int], str] = {
    ("services4", 1): "d558bdbfbb00",
    ("services6", 1): "19fb7722d87b",
    ("backends4", 1): "e14711ed15fc",
    ("backends6", 1): "07660e173a9f",
    ("rev_nat4", 1): "9911166377b3",
    ("rev_nat6", 1): "936dd2e21e73",
    ("svc_names", 1): "4e6cf1f979fb",
    ("sock_rev_nat4", 1): "fbe2f0eab543",
    ("sock_rev_nat6", 1): "8d68a225c32e",
    ("affinity", 1): "93545d0729e5",
    ("affinity_match", 1): "f7a279806b35",
    ("counters", 1): "990427983a2c",
    ("ct4", 1): "f38d68fd6e19",
    ("ct6", 1): "606f6f76b746",
    ("src_ranges4", 1): "13f82806478b",
    ("src_ranges6", 1): "960c9f76d419",
    ("devices", 1): "484e94913dab",
    ("netns_addrs", 1): "d39fc93e41c7",
    ("nodeport_addrs4", 1): "c49aa88e346d",
    ("nodeport_addrs6", 1): "95301b6d7ad8",
    ("tc_tails", 1): "fb6c2791ad86",
    ("config", 1): "b23630517180",
    ("crc32c_powers", 1): "fb6c2791ad86",
}


def describe(ctype: Any) -> str:
    """A ctypes type's layout as text: structures field by field (name, offset, type), arrays by element and length."""
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        fields = []
        for name, field_type, *bits in ctype._fields_:
            descriptor = getattr(ctype, name)
            fields.append(f"{name}@{descriptor.offset}:{describe(field_type)}{':' + str(bits[0]) if bits else ''}")
        return f"struct{ctypes.sizeof(ctype)}{{{','.join(fields)}}}"
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return f"{describe(ctype._type_)}[{ctype._length_}]"
    return f"{ctype._type_}{ctypes.sizeof(ctype)}"  # a simple type: its struct-module code and size


def fingerprint(spec: abi.MapSpec) -> str:
    text = f"key={describe(spec.key)} value={describe(spec.value)}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_every_map_layout_is_recorded_under_its_version() -> None:
    wrong = [
        f"{name}: layout v{spec.layout} has fingerprint {fingerprint(spec)}, "
        f"recorded {RECORDED.get((name, spec.layout))}"
        " (a changed layout needs a new version: KPR_PIN in bpf/kpr.h, MapSpec.layout in abi.py, a line in RECORDED)"
        for name, spec in abi.MAPS.items()
        if RECORDED.get((name, spec.layout)) != fingerprint(spec)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_header_pins_every_map_with_the_mirrors_version() -> None:
    declared = {m[1]: int(m[2]) for m in re.finditer(r'KPR_PIN\("(\w+)",\s*(\d+)\)', abi.HEADER.read_text())}
    assert declared == {name: spec.layout for name, spec in abi.MAPS.items()}
    assert migrate.declared_shapes({}).keys() == abi.MAPS.keys()


def test_the_fingerprint_sees_a_reordered_layout_of_the_same_size() -> None:
    class Before(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32)]

    class After(ctypes.Structure):
        _fields_ = [("b", ctypes.c_uint32), ("a", ctypes.c_uint32)]

    assert ctypes.sizeof(Before) == ctypes.sizeof(After)
    assert fingerprint(abi.MapSpec("m", abi.U32, Before)) != fingerprint(abi.MapSpec("m", abi.U32, After))
