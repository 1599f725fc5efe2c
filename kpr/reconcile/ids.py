"""Ids for backends and frontends (rev_nat ids): never 0, and not handed out again right after release."""

from __future__ import annotations

import errno

from kpr.datapath.writers import MapWriteError


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
            raise MapWriteError(self.what, errno.E2BIG, f"all {self.limit} ids are in use")
        while self.next in self.used:
            self.next = self.next % self.limit + 1
        ident = self.next
        self.used.add(ident)
        self.next = ident % self.limit + 1
        return ident

    def release(self, ident: int) -> None:
        self.used.discard(ident)
