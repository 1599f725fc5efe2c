"""Pinned maps whose shape changed (a new --map-size, or a new kpr with a different layout): migrated, not reused.

BCC adopts a pinned map of the same name whatever its size or layout, so a restart with `--map-size ct=N` kept the
old size silently, and a kpr whose header changed a struct would run against maps of the old layout. Two guards:

- the pin carries the layout version (KPR_PIN(name, layout) in bpf/kpr.h: "services4_v1"), so a changed layout is
  a new pin even where the sizes happen to match; a map pinned under another version is moved aside and never copied
  (maps pinned before pins were versioned, under the bare name, are layout 1);
- every pinned map of the current version is compared with what bpf/kpr.h declares for it (type, key and value
  sizes, entries, flags).

A map that differs is moved aside to `old_<pin>` (the programs attached now keep using it through the references they
hold), BCC creates the new one, and entries are copied across where the layouts allow:

- once by the loader, before the new programs exist, and again by the agent just after it attached them (entries the
  old programs wrote meanwhile: a flow that started in between), then `old_<name>` is unpinned;
- a map cannot shrink below the entries it holds: the loader refuses with a message saying how many there are;
- the maps that name each other by id (services, backends, rev_nat, svc_names, affinity_match, src_ranges, and the
  ct and affinity entries that name backend ids) move as one: if any of them cannot be copied (its layout changed),
  none is, and the agent rebuilds them from the Kubernetes API on its first sync (tracked tc flows and affinities
  then start afresh). Everything else is copied when it can be and rebuilt or refilled when not (config, devices,
  crc32c_powers, tc_tails, counters: per-CPU counters restart from zero).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kpr.datapath import abi, bpfsys

MAP_TYPES = {"hash": 1, "array": 2, "prog": 3, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11}
BPF_F_NO_PREALLOC = 1
OLD_PREFIX = "old_"
OTHER_PREFIX = "old_x_"  # moved aside and never copied: another layout version, or a stale twin of the adopted pin
# Maps whose entries name each other's ids: copied together or not at all.
LINKED = frozenset(
    {
        *(f"{m}{fam}" for m in ("services", "backends", "rev_nat", "src_ranges", "ct") for fam in ("4", "6")),
        "svc_names",
        "affinity_match",
        "affinity",
    }
)
# The maps the programs write (flows, affinities, the socket path's reverse NAT); the agent writes the others.
DATAPATH_WRITTEN = frozenset({"ct4", "ct6", "affinity", "sock_rev_nat4", "sock_rev_nat6"})
NEVER_COPIED = frozenset({"tc_tails", "counters", "config", "crc32c_powers", "devices"})  # refilled by the loader
UNVERSIONED_LAYOUT = 1  # the layout of a map pinned under its bare name, before pins carried a version
_VERSIONED = re.compile(r"^(\w+?)_v(\d+)$")
_DECLARATION = re.compile(
    r'BPF_TABLE_PINNED\("(\w+)",\s*[^,]+,\s*[^,]+,\s*(\w+),\s*(\w+),\s*KPR_PIN\("\w+",\s*(\d+)\)(?:,\s*(\w+))?\s*\)'
)
_DEFINE = re.compile(r"^#define (KPR_\w+) (\d+)\b", re.M)


@dataclass(frozen=True)
class Shape:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    def describe(self) -> str:
        kind = next((k for k, v in MAP_TYPES.items() if v == self.type), str(self.type))
        return f"{kind}, {self.key_size}/{self.value_size}-byte keys/values, {self.max_entries} entries"


def declared_shapes(sizes: Mapping[str, int], header: str | None = None) -> dict[str, Shape]:
    """What bpf/kpr.h makes of each pinned map with these map sizes (DEFAULT_MAP_SIZES keys, e.g. KPR_CT_MAX)."""
    text = abi.HEADER.read_text() if header is None else header
    defines = {name: int(value) for name, value in _DEFINE.findall(text)} | dict(sizes)
    shapes = {}
    for kind, name, entries, layout, flags in _DECLARATION.findall(text):
        spec = abi.MAPS[name]
        if int(layout) != spec.layout:  # tests/unit/test_abi_header.py catches this first
            raise ValueError(f"bpf/kpr.h pins {name} with layout {layout}, kpr.datapath.abi with {spec.layout}")
        shapes[name] = Shape(
            MAP_TYPES[kind],
            ctypes.sizeof(spec.key),
            ctypes.sizeof(spec.value),
            int(entries) if entries.isdigit() else defines[entries],
            BPF_F_NO_PREALLOC if flags == "BPF_F_NO_PREALLOC" else 0,
        )
    return shapes


def _pinned_shape(path: Path) -> tuple[Shape, int]:
    fd = bpfsys.obj_get(str(path))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    return Shape(info.type, info.key_size, info.value_size, info.max_entries, info.flags), info.id


def _copyable(old: Shape, new: Shape) -> bool:
    same_kind = old.type == new.type or {old.type, new.type} <= {MAP_TYPES["hash"], MAP_TYPES["lru_hash"]}
    return same_kind and (old.key_size, old.value_size) == (new.key_size, new.value_size)


@dataclass
class Plan:
    moved: dict[str, str]  # map -> why it moves aside ("max_entries 262144 -> 1024")
    copied: set[str]  # the moved maps whose entries are copied to their successors


def prepare(bpffs_dir: Path, sizes: Mapping[str, int]) -> Plan:
    """Compare the pinned maps with the declared shapes and move the changed ones aside; raises ValueError when a
    map would shrink below its entries (nothing has been moved or renamed then)."""
    want = declared_shapes(sizes)
    changed: dict[str, tuple[Shape, Shape]] = {}
    other_layouts: dict[str, list[Path]] = {}  # pins never to be adopted or copied, by map
    adopted_bare: list[str] = []  # maps pinned under the bare name that this kpr takes over (renamed at the end)
    pins: dict[str, Path] = {}  # the pin each map's successor is compared with (and its entries counted in)
    for name, shape in want.items():
        spec = abi.MAPS[name]
        current, bare = abi.map_pin(bpffs_dir, name), bpffs_dir / name
        others = [path for version, path in versioned_pins(bpffs_dir, name) if version != spec.layout]
        pin = current if current.exists() else None
        if bare.exists():
            if spec.layout != UNVERSIONED_LAYOUT:
                others.append(bare)
            elif pin is None or _pinned_shape(bare)[1] > _pinned_shape(pin)[1]:
                # pinned before versions, with the layout of that time; if a versioned pin exists too, an older kpr
                # came back and made the bare one since (map ids only grow): it holds the live state, the other not
                if pin is not None:
                    others.append(pin)
                pin = bare
                adopted_bare.append(name)
            else:
                others.append(bare)
        if others:
            other_layouts[name] = others
        if pin is not None:
            pins[name] = pin
            have, _ = _pinned_shape(pin)
            if have != shape:
                changed[name] = (have, shape)
    copied = {n for n, (old, new) in changed.items() if n not in NEVER_COPIED and _copyable(old, new)}
    if any(n in LINKED and n not in copied for n in [*changed, *(n for n in other_layouts if n not in pins)]):
        # a layout changed among maps that name each other's ids: none of them is kept
        for name in LINKED & set(want):
            if name not in changed and name in pins:
                shape = want[name]
                changed[name] = (shape, shape)
        copied -= LINKED
    for name in sorted(copied):
        spec = abi.MAPS[name]
        entries = 0 if spec.percpu or spec.programs else _count(pins[name], spec)
        limit = changed[name][1].max_entries
        if entries > limit:
            raise ValueError(
                f"map {name} holds {entries} entries; a size of {limit} cannot hold them "
                f"(give --map-size at least {entries}, or run `kpr cleanup` first to start empty)"
            )
    for paths in other_layouts.values():
        for path in paths:
            _move_aside(path, as_other_layout=True)
    for name in adopted_bare:
        (bpffs_dir / name).rename(abi.map_pin(bpffs_dir, name))
    for name in changed:
        _move_aside(abi.map_pin(bpffs_dir, name))
    reasons = {name: _why(old, new) for name, (old, new) in changed.items()}
    for name, paths in other_layouts.items():
        reasons.setdefault(
            name, f"also pinned as {', '.join(p.name for p in paths)} (not adopted), now {abi.MAPS[name].pin}"
        )
    return Plan(reasons, copied)


def versioned_pins(bpffs_dir: Path, name: str) -> list[tuple[int, Path]]:
    """The pins of map `name` with a layout version in their name ("services4_v1"), with that version."""
    found = []
    for path in bpffs_dir.glob(f"{name}_v*"):
        match = _VERSIONED.match(path.name)
        if match and match[1] == name:
            found.append((int(match[2]), path))
    return sorted(found)


def kpr_map_pins(bpffs_dir: Path) -> list[Path]:
    """Every map pin of kpr's in the directory, of any layout version, moved aside or not (what cleanup removes)."""
    pins = {path for name in abi.MAPS for _, path in versioned_pins(bpffs_dir, name)}
    pins.update(bpffs_dir / name for name in abi.MAPS if (bpffs_dir / name).exists())
    pins.update(path for path in bpffs_dir.glob(f"{OLD_PREFIX}*") if _moved_aside(path.name) is not None)
    return sorted(pins)


def _move_aside(pin: Path, as_other_layout: bool = False) -> None:
    """Rename a pin to old_<pin> (old_x_<pin> for one never to be copied: another layout, or a stale twin)."""
    old = pin.with_name(f"{OTHER_PREFIX if as_other_layout else OLD_PREFIX}{pin.name}")
    old.unlink(missing_ok=True)  # a previous migration that did not finish
    pin.rename(old)


def _moved_aside(pin_name: str) -> tuple[str, int, bool] | None:
    """(map, layout version, whether its entries may be copied) of a pin moved aside; None when it is none of kpr's."""
    copyable = not pin_name.startswith(OTHER_PREFIX)
    name = pin_name.removeprefix(OTHER_PREFIX if not copyable else OLD_PREFIX)
    match = _VERSIONED.match(name)
    name, version = (match[1], int(match[2])) if match else (name, UNVERSIONED_LAYOUT)
    return (name, version, copyable) if name in abi.MAPS else None


def _why(old: Shape, new: Shape) -> str:
    if old == new:
        return "names entries of a map whose layout changed"
    return f"{old.describe()} -> {new.describe()}"


def _count(path: Path, spec: abi.MapSpec) -> int:
    with bpfsys.Map(str(path), spec.key, spec.value) as m:
        return len(m.items())


def copy_entries(bpffs_dir: Path, names: set[str] | None = None) -> dict[str, int]:
    """Copy what the moved-aside maps hold into their successors, without overwriting an entry the new one already
    has (the new programs' writes are newer). `names`: only these (default: every old_ pin whose layout matches)."""
    copied: dict[str, int] = {}
    for old in sorted(bpffs_dir.glob(f"{OLD_PREFIX}*")):
        moved = _moved_aside(old.name)
        if moved is None:
            continue
        name, version, copyable = moved
        spec = abi.MAPS[name]
        new = abi.map_pin(bpffs_dir, name)
        if not copyable or version != spec.layout or not new.exists() or spec.percpu or spec.programs:
            continue  # another layout's entries mean other things, whatever their sizes
        if name in NEVER_COPIED:
            continue  # the loader fills them
        if names is not None and name not in names:
            continue
        old_shape, _ = _pinned_shape(old)
        new_shape, _ = _pinned_shape(new)
        if not _copyable(old_shape, new_shape):
            continue
        with bpfsys.Map(str(old), spec.key, spec.value) as src, bpfsys.Map(str(new), spec.key, spec.value) as dst:
            present = {bytes(k) for k, _ in dst.items()}
            entries = [(k, v) for k, v in src.items() if bytes(k) not in present]
            for key, value in entries:
                dst.update(key, value)
        copied[name] = len(entries)
    return copied


def finish(bpffs_dir: Path, copy: set[str] | None = None) -> dict[str, int]:
    """After the new programs are attached: a last copy of what the old programs wrote meanwhile (only the maps the
    datapath writes: the agent's own maps were copied once before its first sync, which has since changed them, and
    copying again would bring back what it deleted), then the old pins go."""
    again = DATAPATH_WRITTEN if copy is None else copy & DATAPATH_WRITTEN
    copied = copy_entries(bpffs_dir, set(again))
    for old in bpffs_dir.glob(f"{OLD_PREFIX}*"):
        if _moved_aside(old.name) is not None:
            old.unlink()
    return copied
