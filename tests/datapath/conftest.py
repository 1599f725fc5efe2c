"""Fixtures for tests that need the kernel: labs of network namespaces, cgroups and bpffs directories.

Nothing here skips: without root, or when a lab cannot be built, the test fails with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kpr.lab import Lab, sweep_stale


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_labs() -> None:
    """Remove what crashed runs left behind (labs whose owner process is dead) before the first test."""
    sweep_stale()


def _close(lab: Lab) -> None:
    try:
        lab.assert_host_isolated()
    finally:
        lab.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """One node "node1" with echo pods "pod-a", "pod-b", "pod-c" and a pod "client" without a server."""
    the_lab = Lab()
    try:
        node = the_lab.add_node("node1")
        for name in ("pod-a", "pod-b", "pod-c"):
            the_lab.add_pod(node, name)
        the_lab.add_pod(node, "client", echo=False)
    except BaseException:
        the_lab.close()
        raise
    yield the_lab
    _close(the_lab)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """make(prefix=None) -> an empty Lab; every lab made is checked for isolation and closed after the test."""
    labs: list[Lab] = []

    def make(prefix: str | None = None) -> Lab:
        new = Lab(prefix)
        labs.append(new)
        return new

    yield make
    errors: list[BaseException] = []
    for made in reversed(labs):
        try:
            _close(made)
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
