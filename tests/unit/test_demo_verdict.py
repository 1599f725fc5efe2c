"""`make demo` fails when the traffic it shows fails: a demo printing errors must not exit 0."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kpr.lab import demo

pytestmark = pytest.mark.unit


class FakeLab:
    def __init__(self, ok: int) -> None:
        self.ok = ok

    def client(self, who: Any, proto: str, host: str, port: int, count: int) -> dict[str, Any]:
        errors = {"ECONNREFUSED": count - self.ok} if self.ok < count else {}
        return {"ok": self.ok, "errors": errors, "peers": [f"{host}:{port}"], "seen_as": [], "served": {}}


class Client:
    name = "client"


def test_traffic_that_all_gets_through_passes(capsys: pytest.CaptureFixture[str]) -> None:
    demo.traffic(FakeLab(ok=10), Client(), "tcp", "10.96.0.10", 80, count=10)  # type: ignore[arg-type]
    assert "10 answered" in capsys.readouterr().out


def test_a_single_failed_request_fails_the_demo() -> None:
    with pytest.raises(demo.DemoFailed, match=re.escape("1 of 10 TCP requests to 10.96.0.10:80 failed")):
        demo.traffic(FakeLab(ok=9), Client(), "tcp", "10.96.0.10", 80, count=10)  # type: ignore[arg-type]
