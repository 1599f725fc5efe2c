"""Slot assignment: which backend sits in which slot after a change, moving as few slots as possible."""

from __future__ import annotations

from collections.abc import Sequence


def assign_slots(old: Sequence[int], wanted: Sequence[int]) -> list[int]:
    """New slot contents (backend ids; slot n is index n-1) for the backend set `wanted`.

    Backends that stay keep their slot; a removed backend's slot is taken by a new one when there is one, otherwise
    the last slot's backend moves into it (so the table stays dense without shifting everything). New backends
    beyond that are appended. One endpoint added or removed therefore rewrites at most one slot.
    """
    wanted_set = set(wanted)
    result: list[int | None] = [b if b in wanted_set else None for b in old]
    present = {b for b in result if b is not None}
    added = [b for b in wanted if b not in present]
    added.reverse()  # pop() from the end takes them in the given order

    for i, b in enumerate(result):
        if b is None and added:
            result[i] = added.pop()
    while added:
        result.append(added.pop())

    # Compact the remaining holes with backends taken from the end of the table.
    i = 0
    while i < len(result):
        if result[i] is None:
            while result and result[-1] is None:
                result.pop()
            if i < len(result):
                result[i] = result.pop()
        i += 1
    return [b for b in result if b is not None]
