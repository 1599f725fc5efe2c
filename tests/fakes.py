"""Stand-ins shared by the tests and the benchmarks."""

from __future__ import annotations

from typing import Any


class QuietSource:
    """A kpr.objects.events.Source that delivers nothing (the caller puts the objects on the agent's queue itself)
    and keeps what the agent reports about objects."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, str, str, str]] = []

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def state(self) -> dict[str, dict[str, Any]]:
        return {}

    def problem(self, stalled_after: float) -> str:
        return ""

    def report(self, kind: str, namespace: str, name: str, reason: str, message: str) -> None:
        self.reports.append((kind, namespace, name, reason, message))
