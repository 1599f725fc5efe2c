"""kpr.sources.manifests against hostile or clumsy input: every file is read only when complete, only when it is a
regular file of sane size and depth, and no file's content can stop the others from being read.

Each test names the finding it guards. Files written "atomically" are renamed into place, as kubectl users and
kpr.lab.cluster.write_manifest do; "in place" means truncate and write while the file stays open.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kpr.lab.cluster import endpoint, endpoint_slice, service, write_manifest
from kpr.objects.events import Event, Replace, SourceError
from kpr.sources import manifests
from kpr.sources.manifests import ManifestPoller, ManifestSource, Snapshot

pytestmark = pytest.mark.unit

NODE = "node1"


def web(backends: int, name: str = "web", cluster_ip: str = "10.96.0.10") -> list[dict[str, Any]]:
    """A Service and its EndpointSlice with `backends` ready endpoints."""
    return [
        service(name, [cluster_ip], [("http", 80, 8080, "TCP")]),
        endpoint_slice(name, [endpoint(f"10.244.1.{i + 1}", NODE) for i in range(backends)], [("http", 8080, "TCP")]),
    ]


def web_yaml(backends: int, name: str = "web") -> str:
    return yaml.safe_dump_all(web(backends, name), sort_keys=False)


def write_atomically(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def backends(snapshot: Snapshot | None, name: str = "web") -> int | None:
    """How many endpoints the snapshot gives the Service (None: no such Service)."""
    assert snapshot is not None
    if not any(s.key.name == name for s in snapshot.services):
        return None
    return sum(len(s.endpoints) for s in snapshot.slices if s.service_name == name)


def settle(source: ManifestSource, polls: int = 3) -> Snapshot | None:
    """Poll a few times (a file there before the source needs two polls) and return the last snapshot sent."""
    last = None
    for _ in range(polls):
        snapshot = source.poll()
        if snapshot is not None:
            last = snapshot
    return last


def poll_within(source: ManifestSource, timeout: float = 5.0, unblock: Path | None = None) -> Snapshot | None:
    """One poll on a thread that must finish within `timeout` (a reader that opens a FIFO blocks forever)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(source.poll()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if unblock is not None:  # give the stuck reader its EOF so the thread ends
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"poll() still blocked after {timeout}s")
    assert result, "poll() raised"
    return result[0]


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    d = tmp_path / "manifests"
    d.mkdir()
    return d


@pytest.fixture
def source(directory: Path) -> Iterator[ManifestSource]:
    s = ManifestSource(directory, NODE)
    yield s
    s.close()


@pytest.fixture
def started(directory: Path, source: ManifestSource) -> ManifestSource:
    """A source whose first snapshot is out, with web (2 backends) in web.yaml and other (1) in other.yaml."""
    write_manifest(directory, "web.yaml", web(2))
    write_manifest(directory, "other.yaml", web(1, "other", "10.96.0.11"))
    first = settle(source)
    assert backends(first) == 2 and backends(first, "other") == 1 and first is not None and not first.errors
    return source


# --- finding 1: content that killed the reader ------------------------------------------------------------------------

HOSTILE: dict[str, tuple[str | bytes, str]] = {
    "metadata not a mapping": ("apiVersion: v1\nkind: Service\nmetadata: [a, b]\nspec: {}\n", "metadata is a list"),
    "Latin-1 byte": ("kind: Service\nmetadata: {name: web, annotations: {a: caf\xe9}}\n".encode("latin-1"), "UTF-8"),
    "YAML 3000 deep (flow)": ("kind: Service\nmetadata: {name: web}\nx: " + "[" * 3000 + "]" * 3000, "nesting"),
    "YAML 3000 deep (block)": ("- " * 3000 + "x\n", "nesting"),
    "JSON 3000 deep": ('{"kind": "Service", "x": ' + "[" * 3000 + "]" * 3000 + "}", "depth"),
    "YAML 150 deep": ("kind: Service\nmetadata: {name: web}\nx: " + "[" * 150 + "]" * 150, "100 levels"),
    "a document that contains itself": ("kind: Service\nmetadata: {name: web}\nx: &a [*a]\n", "contains itself"),
    "not a mapping": ("- just\n- a list\n", "not a mapping"),
    "List item not a mapping": ("kind: List\nitems: [3]\n", "items[0] is an integer"),
    "name not a string": ("kind: Service\nmetadata: {name: [web]}\n", "metadata.name is a list"),
    "impossible date": ("kind: Service\nmetadata: {name: web, creationTimestamp: 2024-13-45}\n", "month"),
    "integer of 5000 digits": ("kind: Service\nmetadata: {name: web}\nx: " + "1" * 5000 + "\n", "digits"),
    "unhashable key": ("kind: Service\nmetadata: {name: web}\nspec: {[1]: 2}\n", "unhashable"),
    "broken YAML": ("kind: Service\nmetadata: {name: web\n", "cannot parse"),
    "broken JSON": ('{"kind": "Service", "metadata": {"name": "web"}', "cannot parse as JSON"),
}


@pytest.mark.parametrize("content, expected", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_content_is_an_error_naming_the_file_and_keeps_the_last_good_version(
    directory: Path, started: ManifestSource, content: str | bytes, expected: str
) -> None:
    """Finding 1: each of these killed the reader thread. Now: an error naming the file (and the field), the last
    good version of that file stays in effect, the other files are still read."""
    name = "web.json" if expected == "cannot parse as JSON" else "web.yaml"
    if name == "web.json":
        write_atomically(directory / "web.json", orjson.dumps({"kind": "List", "items": web(2)}))
        (directory / "web.yaml").unlink()
        assert backends(settle(started)) == 2
    write_atomically(directory / name, content)
    snapshot = started.poll()
    assert backends(snapshot) == 2, "the last good version stays in effect"
    assert snapshot is not None
    [error] = snapshot.errors
    assert str(directory / name) in error and expected in error, error
    assert started.poll() is None, "reported once, not read again until it changes"
    write_manifest(directory, "other.yaml", web(3, "other", "10.96.0.11"))
    assert backends(started.poll(), "other") == 3, "the other files are still read"
    write_manifest(directory, name, web(4))
    fixed = started.poll()
    assert backends(fixed) == 4 and fixed is not None and not fixed.errors


def test_an_object_with_a_bad_field_keeps_its_last_good_version(directory: Path, started: ManifestSource) -> None:
    bad = web(3)
    bad[0]["spec"]["ports"][0]["port"] = 70000
    write_manifest(directory, "web.yaml", bad)
    snapshot = started.poll()
    assert snapshot is not None and [s.ports[0].port for s in snapshot.services if s.key.name == "web"] == [80]
    assert backends(snapshot) == 3, "the slice, valid, is used"
    [error] = snapshot.errors
    assert error.startswith(f"{directory / 'web.yaml'}: document 1: Service default/web: spec.ports[0].port 70000")


def test_the_non_utf8_error_says_where(directory: Path, started: ManifestSource) -> None:
    write_atomically(directory / "web.yaml", b"kind: Service\nmetadata:\n  name: caf\xe9\n")
    snapshot = started.poll()
    assert snapshot is not None
    assert snapshot.errors == [
        f"{directory / 'web.yaml'}: is not UTF-8: byte 0xe9 at line 3, column 12; save it as UTF-8"
    ]


def test_the_poller_survives_hostile_files_present_at_start_and_keeps_following(directory: Path) -> None:
    """Finding 1: with such a file present at start the agent exited 1; later changes were never applied."""
    for name, (content, _expected) in HOSTILE.items():
        write_atomically(directory / f"{name.replace(' ', '-')}.yaml", content)
    write_manifest(directory, "web.yaml", web(2))
    out: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    poller = ManifestPoller(ManifestSource(directory, NODE), out, stop, interval=0.02)
    poller.start()
    try:
        events = drain_until(out, lambda e: isinstance(e, Replace) and e.kind == "Node", 5.0)
        errors = [e for e in events if isinstance(e, SourceError)]
        assert len(errors) == len(HOSTILE) and all(e.reason == "invalid" for e in errors), errors
        for name in HOSTILE:
            assert sum(e.message.startswith(f"{directory / name.replace(' ', '-')}.yaml: ") for e in errors) == 1, name
        assert replaced(events, "EndpointSlice") == {"web-v4": 2}

        write_manifest(directory, "web.yaml", web(3))
        events = drain_until(out, lambda e: isinstance(e, Replace) and e.kind == "EndpointSlice", 5.0)
        assert replaced(events, "EndpointSlice") == {"web-v4": 3}
        assert poller.thread.is_alive() and not poller.failure and poller.problem() == ""
        assert time.monotonic() - poller.last_poll < 1.0
    finally:
        stop.set()
        poller.thread.join(5)


def test_an_unexpected_error_in_a_poll_is_reported_once_and_polling_goes_on(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_manifest(directory, "web.yaml", web(2))
    out: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    source = ManifestSource(directory, NODE)
    poller = ManifestPoller(source, out, stop, interval=0.02)
    poller.start()
    try:
        drain_until(out, lambda e: isinstance(e, Replace) and e.kind == "Node", 5.0)
        real_poll = source.poll
        calls = 0

        def broken() -> Snapshot | None:
            nonlocal calls
            calls += 1
            if calls <= 5:
                raise RuntimeError("a bug")
            return real_poll()

        monkeypatch.setattr(source, "poll", broken)
        wait_for(lambda: calls > 5, 5.0)
        write_manifest(directory, "web.yaml", web(3))
        events = drain_until(out, lambda e: isinstance(e, Replace) and e.kind == "EndpointSlice", 5.0)
        failures = [e for e in events if isinstance(e, SourceError)]
        assert [(e.reason, "RuntimeError: a bug" in e.message) for e in failures] == [("read_failed", True)]
        assert replaced(events, "EndpointSlice") == {"web-v4": 3}
        assert poller.thread.is_alive() and poller.failure == ""
    finally:
        stop.set()
        poller.thread.join(5)


def test_the_poller_exposes_a_failure_and_its_age(directory: Path) -> None:
    poller = ManifestPoller(ManifestSource(directory, NODE), queue.Queue(), threading.Event(), interval=0.02)
    poller.poll_once()
    assert poller.failure == "" and poller.last_poll > 0 and poller.problem() == ""
    directory.rename(directory.with_name("gone"))
    poller.poll_once()
    assert "does not exist" in poller.failure and poller.problem() == poller.failure
    poller.last_poll -= 120
    assert "no poll" in poller.problem()


# --- finding 2: a file rewritten in place was programmed half written ----------------------------------------------


def test_a_file_rewritten_in_place_is_used_only_once_closed(directory: Path, started: ManifestSource) -> None:
    """Finding 2: truncate + write in chunks. The half-written file (the Service without its slice) was programmed:
    a Service with 0 backends, connections refused."""
    new = web_yaml(3)
    half = new[: new.index("---")]  # the Service document only
    with open(directory / "web.yaml", "r+") as f:
        f.truncate()
        f.flush()
        assert started.poll() is None, "an empty file being written is not used"
        f.write(half)
        f.flush()
        for _ in range(3):  # however long the writer takes, as long as it holds the file open
            assert started.poll() is None, "a half-written file is not used"
        f.write(new[len(half) :])
    assert backends(started.poll()) == 3, "used at the first poll after the writer closed it"


def test_without_inotify_a_changed_file_is_used_once_stable_across_two_polls(
    directory: Path, started: ManifestSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 2, where inotify says nothing (NFS, a symlinked file, an overflowed queue)."""
    monkeypatch.setattr(started._changes, "closed", lambda directory, name: None)
    new = web_yaml(3)
    half = new[: new.index("---")]
    seen = []
    with open(directory / "web.yaml", "r+") as f:
        f.truncate()
        f.write(half)
        f.flush()
        seen.append(started.poll())
        f.write(new[len(half) :])
    seen.append(started.poll())  # changed since the last poll: not yet
    seen.append(started.poll())  # the same size, times, inode and content twice: used
    assert seen[:2] == [None, None] and backends(seen[2]) == 3


def test_an_atomic_write_is_used_at_the_next_poll(directory: Path, started: ManifestSource) -> None:
    write_manifest(directory, "web.yaml", web(3))
    assert backends(started.poll()) == 3


def test_the_first_snapshot_waits_for_a_file_being_written(directory: Path, source: ManifestSource) -> None:
    """A restarting agent must not program (and prune) from a file it caught half written."""
    write_manifest(directory, "other.yaml", web(1, "other", "10.96.0.11"))
    new = web_yaml(3)
    cut = new.index("---")
    with open(directory / "web.yaml", "w") as f:
        f.write(new[: cut // 2])
        f.flush()
        assert source.poll() is None, "nothing known about web.yaml yet: it must be the same at the next poll"
        f.write(new[cut // 2 : cut])
        f.flush()
        for _ in range(3):
            assert source.poll() is None, "written since, not closed: the first snapshot waits"
        f.write(new[cut:])
    first = source.poll()
    assert backends(first) == 3 and backends(first, "other") == 1


def test_a_file_that_stays_unparsable_keeps_its_last_good_version(directory: Path, started: ManifestSource) -> None:
    (directory / "web.yaml").write_text("kind: Service\nmetadata: {name: web\n")  # closed, broken
    snapshot = started.poll()
    assert backends(snapshot) == 2 and snapshot is not None and "cannot parse" in snapshot.errors[0]
    (directory / "web.yaml").write_text("kind: Service\nmetadata: {name: web, x: [\n")
    snapshot = started.poll()
    assert backends(snapshot) == 2 and snapshot is not None and "cannot parse" in snapshot.errors[0]


# --- finding 3: FIFOs and symlink loops ---------------------------------------------------------------------------


def test_a_fifo_is_reported_once_and_never_opened(directory: Path, started: ManifestSource) -> None:
    """Finding 3: the reader blocked forever opening a FIFO."""
    fifo = directory / "pipe.yaml"
    os.mkfifo(fifo)
    snapshot = poll_within(started, unblock=fifo)
    assert snapshot is not None and snapshot.errors == [f"{fifo}: a FIFO, not a regular file; not read"]
    assert backends(snapshot) == 2
    assert poll_within(started, unblock=fifo) is None, "reported once"
    write_manifest(directory, "web.yaml", web(3))
    assert backends(poll_within(started, unblock=fifo)) == 3


def test_a_symlink_loop_is_reported_once_and_the_rest_is_read(directory: Path, started: ManifestSource) -> None:
    """Finding 3: every poll failed, nothing was logged."""
    (directory / "loop.yaml").symlink_to("loop.yaml")
    (directory / "sub").mkdir()
    (directory / "sub" / "up").symlink_to("..")  # a directory loop: not followed
    snapshot = started.poll()
    assert snapshot is not None and sorted(snapshot.errors) == [
        f"{directory / 'loop.yaml'}: a symbolic link loop; not read",
        f"{directory / 'sub' / 'up'}: a symbolic link to a directory; not followed",
    ]
    assert backends(snapshot) == 2
    assert started.poll() is None, "reported once"
    write_manifest(directory / "sub", "more.yaml", web(1, "more", "10.96.0.12"))
    assert backends(settle(started), "more") == 1


def test_symlinked_files_are_read_and_dangling_ones_keep_their_last_good_version(
    directory: Path, source: ManifestSource, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.yaml"
    write_atomically(target, web_yaml(2))
    (directory / "web.yaml").symlink_to(target)
    assert backends(settle(source)) == 2
    write_atomically(target, web_yaml(3))
    assert backends(settle(source)) == 3, "a symlinked file is followed (two-poll rule)"
    target.unlink()
    snapshot = source.poll()
    assert backends(snapshot) == 3 and snapshot is not None
    assert snapshot.errors == [f"{directory / 'web.yaml'}: a dangling symbolic link (to {target}); not read"]


def test_poller_reports_each_problem_once(directory: Path) -> None:
    os.mkfifo(directory / "pipe.yaml")
    (directory / "loop.yaml").symlink_to("loop.yaml")
    out: queue.Queue[Event] = queue.Queue()
    poller = ManifestPoller(ManifestSource(directory, NODE), out, threading.Event())
    for _ in range(5):
        poller.poll_once()
    errors = [e for e in drain(out) if isinstance(e, SourceError)]
    assert sorted((e.reason, Path(e.message.split(":")[0]).name) for e in errors) == [
        ("unreadable", "loop.yaml"),
        ("unreadable", "pipe.yaml"),
    ]
    poller.source.close()


# --- finding 4: big files and the pure-Python YAML loader ---------------------------------------------------------


def big_slice_yaml(n: int) -> str:
    """A Service and one EndpointSlice of n endpoints, as kubectl -o yaml writes them (~120 bytes an endpoint)."""
    objects = web(0)
    objects[1]["endpoints"] = objects[1].pop("endpoints")  # last, so that the lines below belong to it
    lines = [yaml.safe_dump_all(objects, sort_keys=False).rstrip("\n").replace("endpoints: []", "endpoints:")]
    for i in range(n):
        lines.append(
            f"- addresses:\n  - 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n  conditions:\n    ready: true\n"
            f"    serving: true\n    terminating: false\n  nodeName: node{i % 50}"
        )
    return "\n".join(lines) + "\n"


def test_yaml_is_loaded_with_libyaml_and_json_with_orjson(
    directory: Path, source: ManifestSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 4: the pure-Python loader took 7.4 s on a 1.2 MB slice of 10k endpoints (libyaml: 1.75 s)."""
    assert yaml.__with_libyaml__, "PyYAML without libyaml: install it with its C extension"
    loaders = []
    real_load_all = yaml.load_all

    def spy_load_all(stream: Any, Loader: Any = None) -> Any:
        loaders.append(Loader)
        return real_load_all(stream, Loader)

    monkeypatch.setattr(yaml, "load_all", spy_load_all)
    text = big_slice_yaml(10_000)
    assert len(text) > 1_000_000
    write_atomically(directory / "big.yaml", text)
    assert backends(settle(source)) == 10_000
    assert loaders and all(loader is yaml.CSafeLoader for loader in loaders)

    json_calls = []
    real_loads = orjson.loads

    def spy_loads(data: Any) -> Any:
        json_calls.append(data)
        return real_loads(data)

    monkeypatch.setattr(orjson, "loads", spy_loads)
    write_atomically(directory / "big.json", orjson.dumps({"kind": "List", "items": web(3, "json", "10.96.0.12")}))
    assert backends(settle(source), "json") == 3 and json_calls


def test_a_file_over_the_size_limit_is_refused_and_keeps_its_last_good_version(
    directory: Path, started: ManifestSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 4: a 50 MB file kept the reader busy for 26 s."""
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 2000)
    content = web_yaml(40)
    assert len(content) > 2000
    write_atomically(directory / "web.yaml", content)
    snapshot = started.poll()
    assert backends(snapshot) == 2 and snapshot is not None
    assert snapshot.errors == [f"{directory / 'web.yaml'}: is {len(content)} bytes, over the limit of 2000 bytes"]
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 32 * 2**20)
    write_atomically(directory / "web.yaml", "x: " + "a" * (40 * 2**20) + "\n")
    snapshot = started.poll()
    assert snapshot is not None and snapshot.errors == [
        f"{directory / 'web.yaml'}: is 40.0 MiB, over the limit of 32.0 MiB"
    ]


@pytest.fixture
def pure_python_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine without libyaml: nesting is checked from the parse events."""
    monkeypatch.setattr(manifests, "_LOADER", yaml.SafeLoader)
    manifests._loader_limits_nesting.cache_clear()
    yield
    manifests._loader_limits_nesting.cache_clear()


@pytest.mark.parametrize("depth, ok", [(100, True), (101, False), (3000, False)])
def test_the_depth_bound_without_libyaml(
    directory: Path, started: ManifestSource, pure_python_loader: None, depth: int, ok: bool
) -> None:
    # the document is one level, the lists under x the others
    content = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10}\nx: " + "[" * (depth - 1)
    write_atomically(directory / "web.yaml", content + "]" * (depth - 1) + "\n")
    snapshot = started.poll()
    assert snapshot is not None and backends(snapshot) == (0 if ok else 2)
    assert bool(snapshot.errors) is not ok, snapshot.errors
    if not ok:
        assert "nests more than 100 levels deep (at line 4)" in snapshot.errors[0]


@pytest.mark.parametrize("depth, ok", [(100, True), (101, False), (999, False)])
def test_the_depth_bound_with_libyaml(directory: Path, started: ManifestSource, depth: int, ok: bool) -> None:
    assert manifests._loader_limits_nesting()
    content = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10}\nx: " + "[" * (depth - 1)
    write_atomically(directory / "web.yaml", content + "]" * (depth - 1) + "\n")
    snapshot = started.poll()
    assert snapshot is not None
    assert bool(snapshot.errors) is not ok, snapshot.errors
    if not ok:
        assert "document 1 nests more than 100 levels deep" in snapshot.errors[0]


def test_aliases_are_measured_where_they_lead(directory: Path, started: ManifestSource) -> None:
    """Ten anchors of 12 levels each, each holding the one before: 120 levels from 12 written."""
    lines = ["kind: Service", "metadata: {name: web}", "x0: &a0 " + "[" * 12 + "]" * 12]
    lines += [f"x{i}: &a{i} " + "[" * 11 + f"*a{i - 1}" + "]" * 11 for i in range(1, 10)]
    write_atomically(directory / "web.yaml", "\n".join(lines) + "\n")
    snapshot = started.poll()
    assert snapshot is not None and "nests more than 100 levels deep" in snapshot.errors[0]


# --- finding 5: the same object in two files --------------------------------------------------------------------


def test_an_object_in_two_files_is_reported_and_the_first_in_path_order_wins(
    directory: Path, source: ManifestSource
) -> None:
    """Finding 5: the later file won silently."""
    write_manifest(directory, "a.yaml", web(1))
    write_manifest(directory, "b.yaml", web(2))
    snapshot = settle(source)
    assert backends(snapshot) == 1 and snapshot is not None
    a, b = directory / "a.yaml", directory / "b.yaml"
    assert snapshot.errors == [
        f"Service default/web is in both {a} and {b}; the one in {a} is used",
        f"EndpointSlice default/web-v4 is in both {a} and {b}; the one in {a} is used",
    ]


def test_a_copy_added_later_does_not_take_over(directory: Path, source: ManifestSource) -> None:
    write_manifest(directory, "b.yaml", web(2))
    assert backends(settle(source)) == 2
    write_manifest(directory, "a.yaml", web(1))  # first in path order, but b.yaml was there first
    snapshot = source.poll()
    assert backends(snapshot) == 2 and snapshot is not None
    a, b = directory / "a.yaml", directory / "b.yaml"
    assert f"Service default/web is in both {b} and {a}; the one in {b} is used" in snapshot.errors
    (directory / "b.yaml").unlink()
    snapshot = source.poll()
    assert backends(snapshot) == 1 and snapshot is not None and not snapshot.errors


def test_an_object_twice_in_one_file_is_reported_and_the_first_wins(directory: Path, source: ManifestSource) -> None:
    write_manifest(directory, "web.yaml", [*web(1), web(3)[1]])
    snapshot = settle(source)
    assert backends(snapshot) == 1 and snapshot is not None
    twice = "EndpointSlice default/web-v4 is in both document 2 and document 3; the first is used"
    assert snapshot.errors == [f"{directory / 'web.yaml'}: {twice}"]


# --- helpers for the poller tests ---------------------------------------------------------------------------------


def drain(out: queue.Queue[Event]) -> list[Event]:
    events = []
    while True:
        try:
            events.append(out.get_nowait())
        except queue.Empty:
            return events


def drain_until(out: queue.Queue[Event], last: Any, timeout: float) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = out.get(timeout=0.05)
        except queue.Empty:
            continue
        events.append(event)
        if last(event):
            return events
    pytest.fail(f"no final event within {timeout}s; got {events}")


def wait_for(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def replaced(events: list[Event], kind: str) -> dict[str, int]:
    """Name → endpoint count of the last Replace of EndpointSlices among the events."""
    [last] = [e for e in events if isinstance(e, Replace) and e.kind == kind][-1:]
    return {s.name: len(s.endpoints) for s in last.objects}  # type: ignore[union-attr]
