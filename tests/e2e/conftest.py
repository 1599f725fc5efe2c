"""Options of the agent tests: how long the chaos soak (test_soak.py) injects faults, and with which seed.

pytest reads command-line options only from conftest files it loads before parsing, i.e. when tests/e2e (or a file
in it) is named on the command line, as `make soak` does. Under `pytest tests` (`make test`) the environment
variables KPR_SOAK_SECONDS and KPR_SOAK_SEED do the same.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kpr soak")
    group.addoption(
        "--soak-seconds",
        type=float,
        default=None,
        metavar="S",
        help="seconds of fault injection in tests/e2e/test_soak.py (default 60, or $KPR_SOAK_SECONDS)",
    )
    group.addoption(
        "--soak-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the soak's fault sequence (default random, or $KPR_SOAK_SEED; printed either way)",
    )
