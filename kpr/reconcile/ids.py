"""Ids for backends and frontends (rev_nat ids): never 0, and not handed out again right after release."""

from __future__ import annotations

from collections.abc import Collection


class IdsExhausted(Exception):
    """Every id of an allocator is in use: what needs a new one (a backend, a frontend) cannot be programmed now."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what  # "backend ids", "rev_nat ids"
        self.limit = limit
        super().__init__(f"{what}: all {limit} ids are in use")


class IdAllocator:
    """Ids 1..limit in increasing order, wrapping around to reuse freed ones only when the top is reached.

    Delaying reuse keeps a just-freed id from naming something new while affinity or conntrack entries that
    named the old owner are still around.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used: set[int] = set()
        self.next = 1

    def reserve(self, ident: int) -> None:
        self.used.add(ident)
        if ident >= self.next:
            self.next = ident % self.limit + 1

    def skip_past(self, ident: int) -> None:
        """Hand out ids after `ident` first (it may still be named somewhere, e.g. by a conntrack entry)."""
        if 0 < ident <= self.limit and ident >= self.next:
            self.next = ident % self.limit + 1

    def allocate(self) -> int:
        if len(self.used) >= self.limit:
            raise IdsExhausted(self.what, self.limit)
        while self.next in self.used:
            self.next = self.next % self.limit + 1
        ident = self.next
        self.used.add(ident)
        self.next = ident % self.limit + 1
        return ident

    def release(self, ident: int) -> None:
        self.used.discard(ident)

    def take_run(self, ids: Collection[int], next_id: int) -> None:
        """Record ids a caller counted out itself on an allocator with none in use (the bulk first sync): the ids
        allocate() would have handed out one by one from `self.next`, `next_id` the one it would hand out next."""
        if self.used:
            raise ValueError(f"{self.what}: ids are in use already")
        if len(ids) > self.limit:
            raise IdsExhausted(self.what, self.limit)
        self.used.update(ids)
        self.next = next_id
