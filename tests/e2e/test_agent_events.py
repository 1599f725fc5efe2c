"""Kubernetes Events from the real agent against the fake API server, in a lab node: a frontend conflict and a full
map give exactly one Warning Event each on the right Service (repeats counted into its series), the Node gets a
Normal "Starting" one, and Event writes the API server refuses (500, 403) cost the agent nothing but a log line and a
metric."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.lab.cluster import endpoint, endpoint_slice, service, wait_until
from tests.e2e.test_agent_api import SLICE_PORTS, ApiCluster, lab_with_api, web

pytestmark = [pytest.mark.e2e, pytest.mark.datapath]

BACKENDS_MAX = 4  # --map-size backends=: the three lab pods fit, three more do not


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ApiCluster]:
    yield from lab_with_api(tmp_path, ["--map-size", f"backends={BACKENDS_MAX}"])


def events_on(c: ApiCluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in c.api.events() if e["regarding"]["name"] == name and e["reason"] == reason]


def metric(c: ApiCluster, outcome: str) -> float:
    script = "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())"
    text = c.lab.run(c.agent.node, [sys.executable, "-c", script, "http://127.0.0.1:10249/metrics"]).stdout
    label = f'kpr_kubernetes_events_total{{outcome="{outcome}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(label)), 0.0)


def too_big(c: ApiCluster, name: str, vip: str) -> None:
    """A Service with three endpoints that are not pods: with the three pods' backends, no room in the map."""
    c.api.apply(service(name, [vip], [("http", 80, 8080, "TCP")]))
    c.api.apply(endpoint_slice(name, [endpoint(f"10.244.99.{i}", "node1") for i in (1, 2, 3)], SLICE_PORTS))


def test_a_conflict_and_a_full_map_give_one_warning_each_on_the_right_service(cluster: ApiCluster) -> None:
    c = cluster
    starting = wait_until(lambda: [e for e in c.api.events() if e["reason"] == "Starting"], 10, "the Starting event")
    assert len(starting) == 1 and starting[0]["type"] == "Normal" and starting[0]["metadata"]["namespace"] == "default"
    assert starting[0]["regarding"]["kind"] == "Node" and starting[0]["regarding"]["name"] == "node1"

    web(c.api, "web", "10.96.5.1", c.pods)
    c.wait_backends("10.96.5.1:80/TCP", c.pods)
    c.api.apply(service("thief", ["10.96.5.1"], [("http", 80, 8080, "TCP")]))  # web's ClusterIP:port
    too_big(c, "big", "10.96.5.2")

    conflict = wait_until(lambda: events_on(c, "thief", "FrontendConflict"), 20, "the conflict's event")
    full = wait_until(lambda: events_on(c, "big", "MapFull"), 20, "the full map's event")
    (e,) = conflict
    assert e["type"] == "Warning" and e["action"] == "Programming" and e["reportingController"] == "kpr"
    assert e["reportingInstance"] == "kpr-node1" and e["metadata"]["namespace"] == "default"
    thief = c.api.get("Service", "thief")
    assert thief is not None and e["regarding"] == {
        "apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "thief",
        "uid": thief["metadata"]["uid"],
    }  # fmt: skip
    assert "10.96.5.1:80/TCP is already served for default/web" in e["note"]
    assert "backends" in full[0]["note"] and full[0]["regarding"]["name"] == "big"

    # The full map is retried (0.5 s, 1 s, 2 s, ...): each failure is the same report, counted into one series.
    wait_until(lambda: events_on(c, "big", "MapFull")[0].get("series", {}).get("count", 0) >= 2, 20, "a series")
    wait_until(lambda: metric(c, "aggregated") >= 1, 20, "a repeat counted but not written")
    assert len(events_on(c, "big", "MapFull")) == 1 and len(events_on(c, "thief", "FrontendConflict")) == 1
    assert len(events_on(c, "web", "FrontendConflict")) == 0  # the holder is not the one at fault
    assert c.served("10.96.5.1")["ok"] == 60  # web keeps being served throughout


def test_event_writes_the_api_server_refuses_cost_the_agent_nothing(cluster: ApiCluster) -> None:
    c = cluster
    wait_until(lambda: [e for e in c.api.events() if e["reason"] == "Starting"], 10, "the Starting event")
    c.api.events_fail = 500
    web(c.api, "web", "10.96.5.10", c.pods[:2])
    c.wait_backends("10.96.5.10:80/TCP", c.pods[:2])
    c.api.apply(service("thief", ["10.96.5.10"], [("http", 80, 8080, "TCP")]))
    too_big(c, "big", "10.96.5.11")
    wait_until(lambda: metric(c, "failed") >= 2, 20, "failed Event writes counted")
    c.api.events_fail = 403
    c.api.apply(service("thief2", ["10.96.5.10"], [("http", 80, 8080, "TCP")]))
    wait_until(lambda: metric(c, "failed") >= 3, 20, "a forbidden write counted")
    assert c.agent.log(this_run=True).count("Kubernetes Events cannot be written") == 1  # once per episode

    # Programming goes on: a change is followed, traffic served.
    web(c.api, "web", "10.96.5.10", c.pods)
    c.wait_backends("10.96.5.10:80/TCP", c.pods)
    assert set(c.served("10.96.5.10")["served"]) == {"pod-a", "pod-b", "pod-c"}
    assert [e for e in c.api.events() if e["reason"] != "Starting"] == []

    # The API server accepts Events again: the next report is written, and the agent says so.
    c.api.events_fail = None
    c.api.apply(service("thief3", ["10.96.5.10"], [("http", 80, 8080, "TCP")]))
    wait_until(lambda: events_on(c, "thief3", "FrontendConflict"), 20, "the conflict's event")
    assert "Kubernetes Events are written again" in c.agent.log(this_run=True)
    assert c.agent.proc is not None and c.agent.proc.poll() is None
