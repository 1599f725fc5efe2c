"""The layers of kpr/ point one way (the order is written down in kpr/__init__.py's docstring).

Every import of every module under kpr/ is read with ast, module-level and function-level ones alike (a lazy import
is still an arrow), and attributed to the part it comes from and the part it reaches: a package of kpr/
(kpr/datapath/...) or a top-level module (kpr/log.py). An arrow that goes up a layer or sideways between peers fails
unless EXCEPTIONS names it with its reason; a cycle between parts fails whatever EXCEPTIONS says.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kpr

pytestmark = pytest.mark.unit

KPR = Path(kpr.__file__).resolve().parent

# Lowest first. A part may import the parts of every layer below its own; the parts of one layer are peers and
# import neither each other nor anything above.
LAYERS: list[tuple[str, ...]] = [
    ("log",),
    ("datapath",),
    ("model",),
    ("objects",),
    ("reconcile",),
    ("k8s", "sources"),
    ("agent",),
    ("cli",),
]
# Tighter than the layer order: the pure middle needs nothing below it.
NARROWER: dict[str, set[str]] = {
    "model": set(),  # pure semantics: no I/O, no BPF, nothing of kpr
    "objects": {"model"},  # conversion and events over model's dataclasses only
}
# At the edges: what each may import. Nothing in kpr imports them.
EDGES: dict[str, set[str]] = {
    "cni": {"datapath", "log"},  # kpr-cni runs once per pod ADD/DEL/CHECK: the veth code and nothing more
    "lab": {part for layer in LAYERS for part in layer},  # test and demo harness: it runs whole agents
}
# Third-party libraries only one part may use (CONVENTIONS: datapath is the only place for bcc and pyroute2).
CONFINED: dict[str, set[str]] = {
    "bcc": {"datapath"},
    "pyroute2": {"datapath"},
    "kubernetes": {"k8s", "lab"},  # the API client: the reflectors, and the lab's kubelet
}
# Arrows that break the rules above on purpose: (importing module, imported module) -> why. None today: every arrow
# that pointed up (k8s <-> sources through events and convert, datapath -> model for protocol numbers and backend
# states, reconcile's ids raising the datapath's MapWriteError, pyroute2 in cni) was moved instead.
EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True, slots=True)
class Arrow:
    module: str  # kpr.agent.agent
    target: str  # kpr.k8s.watch, or a third-party module (bcc)
    line: int

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(KPR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part of kpr a module belongs to: its package under kpr/, or the top-level module itself (kpr.log)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kpr"


def imports(source: str, module: str, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in `source` (the module `module`)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # `from kpr import log` reaches kpr.log; `from kpr.datapath import abi, codec` reaches kpr.datapath
            # (and its modules): the part is what matters, and it is the second component either way.
            if origin == "kpr":
                for alias in node.names:
                    yield f"kpr.{alias.name}", node.lineno
            else:
                yield origin, node.lineno


def all_arrows() -> list[Arrow]:
    arrows = []
    for path in sorted(KPR.rglob("*.py")):
        module = module_name(path)
        for target, line in imports(path.read_text(), module, path.name == "__init__.py"):
            arrows.append(Arrow(module, target, line))
    return arrows


ARROWS = all_arrows()
KPR_ARROWS = [a for a in ARROWS if a.target == "kpr" or a.target.startswith("kpr.")]
CROSSING = [a for a in KPR_ARROWS if part_of(a.module) != part_of(a.target)]


def rank() -> dict[str, int]:
    return {part: i for i, layer in enumerate(LAYERS) for part in layer}


def allowed(part: str) -> set[str]:
    if part in EDGES:
        return EDGES[part]
    if part in NARROWER:
        return NARROWER[part]
    ranks = rank()
    return {other for other, r in ranks.items() if r < ranks[part]}


def test_the_scanner_sees_function_level_and_relative_imports() -> None:
    source = "import os\n\ndef f():\n    from kpr.k8s.watch import ApiSource\n    from . import sibling\n"
    assert list(imports(source, "kpr.agent.agent")) == [("os", 1), ("kpr.k8s.watch", 4), ("kpr.agent", 5)]
    assert list(imports("from .. import log\n", "kpr.agent", is_package=True)) == [("kpr.log", 1)]
    assert list(imports("from kpr import log\n", "kpr.agent.agent")) == [("kpr.log", 1)]
    # and on the real tree: the agent makes its API source inside a method
    assert any(a.module == "kpr.agent.agent" and a.target == "kpr.k8s.watch" for a in KPR_ARROWS)


def test_every_part_of_kpr_has_a_place_in_the_layers() -> None:
    parts = {part_of(module_name(p)) for p in KPR.rglob("*.py")} - {"kpr"}
    placed = set(rank()) | set(EDGES)
    assert parts <= placed, f"not in LAYERS or EDGES (nor in kpr/__init__.py's docstring): {sorted(parts - placed)}"
    assert placed <= parts, f"LAYERS or EDGES name parts that do not exist: {sorted(placed - parts)}"


def test_the_layer_order_is_the_one_written_down() -> None:
    order = " < ".join(", ".join(layer) for layer in LAYERS)
    assert kpr.__doc__ is not None and order in kpr.__doc__, f"kpr/__init__.py should state: {order}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for a in CROSSING:
        source, target = part_of(a.module), part_of(a.target)
        if target == "kpr" or (a.module, a.target) in EXCEPTIONS:
            continue
        if target in EDGES:
            wrong.append(f"{a.where}: nothing in kpr imports the edge package {target}")
        elif target not in allowed(source):
            wrong.append(f"{a.where}: {source} may import only {sorted(allowed(source)) or 'nothing of kpr'}")
    assert not wrong, "arrows against the layer order:\n" + "\n".join(wrong)


def test_no_cycle_between_parts() -> None:
    graph: dict[str, set[str]] = {}
    example: dict[tuple[str, str], Arrow] = {}
    for a in CROSSING:
        source, target = part_of(a.module), part_of(a.target)
        graph.setdefault(source, set()).add(target)
        example.setdefault((source, target), a)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loop = [*path[path.index(nxt) :], nxt]
                cycles.append(" -> ".join(loop) + " (" + example[(loop[-2], nxt)].where + ")")
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles between parts of kpr:\n" + "\n".join(cycles)


def test_libraries_stay_in_their_part() -> None:
    wrong = [
        f"{a.where}: only {sorted(CONFINED[a.target.split('.')[0]])} may use {a.target.split('.')[0]}"
        for a in ARROWS
        if a.target.split(".")[0] in CONFINED and part_of(a.module) not in CONFINED[a.target.split(".")[0]]
    ]
    assert not wrong, "\n".join(wrong)


def test_every_exception_is_still_needed_and_says_why() -> None:
    seen = {(a.module, a.target) for a in CROSSING}
    for (module, target), reason in EXCEPTIONS.items():
        assert (module, target) in seen, f"{module} no longer imports {target}: drop its exception"
        assert part_of(target) not in allowed(part_of(module)), f"{module} -> {target} needs no exception"
        assert len(reason.split()) >= 4, f"{module} -> {target}: say why"
