"""The reflector's backoff: it grows while attempts keep failing and starts over after a watch that was healthy for
HEALTHY_WATCH seconds, so one blip after hours of watching costs 0.2 s, not the 30 s that failures spaced out over
the whole run would otherwise have added up to (the chaos soak found relists waiting that long)."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kpr.k8s import watch
from kpr.objects.convert import service_from_dict

pytestmark = pytest.mark.unit

BOOKMARK = b'{"type":"BOOKMARK","object":{"kind":"Service","metadata":{"resourceVersion":"7"}}}\n'


class BrokenStream:
    """A watch response: `events` bookmarks, then the connection drops."""

    def __init__(self, events: int) -> None:
        self.events = events

    def stream(self, amt: int, decode_content: bool) -> Iterator[bytes]:
        for _ in range(self.events):
            yield BOOKMARK
        raise ConnectionResetError("connection dropped")

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class CountingStop(threading.Event):
    """Records the backoff delays; set after `limit` of them, which ends the reflector's loop."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.delays: list[float] = []
        self.limit = limit

    def wait(self, timeout: float | None = None) -> bool:
        self.delays.append(timeout or 0.0)
        if len(self.delays) >= self.limit:
            self.set()
        return self.is_set()


def run_reflector(events_per_watch: int, seconds_per_call: float, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Six watches that each break after `events_per_watch` events, the clock moving `seconds_per_call` per look."""
    clock = itertools.count(step=seconds_per_call)
    monkeypatch.setattr(watch.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(watch.random, "uniform", lambda a, b: 1.0)  # no jitter
    resource = watch.Resource("Service", lambda **_: BrokenStream(events_per_watch), service_from_dict, {})
    stop = CountingStop(limit=6)
    reflector = watch.Reflector(resource, queue.Queue[Any](), stop)
    reflector.resource_version = "5"  # listed already: straight to watching
    reflector.run()
    return stop.delays


def test_attempts_that_keep_failing_back_off_further_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_reflector(0, 0.1, monkeypatch) == list(watch.BACKOFF[:6])


def test_a_watch_that_delivered_events_briefly_before_breaking_still_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_reflector(1, 0.1, monkeypatch) == list(watch.BACKOFF[:6])


def test_a_watch_healthy_for_a_while_starts_the_backoff_over(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = run_reflector(3, watch.HEALTHY_WATCH, monkeypatch)
    assert delays == [watch.BACKOFF[0]] * 6
