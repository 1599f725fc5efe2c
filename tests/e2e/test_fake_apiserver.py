"""The fake API server against the real `kubernetes` client: if these pass, the agent's e2e tests talk real protocol."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.e2e.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.e2e

PROXYABLE = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as s:
        yield s


def make_client(server: FakeApiServer, tmp_path: Path, **settings: Any) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(server.kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg)
    for name, value in settings.items():
        setattr(cfg, name, value)
    return client.ApiClient(cfg)


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    with make_client(server, tmp_path) as c:
        yield c


def svc(name: str, namespace: str = "default", labels: dict[str, str] | None = None, ip: str = "10.96.0.1") -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    return {"kind": "Service", "metadata": meta, "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}}


def node(name: str) -> dict:
    return {"kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}


def slice_(name: str, namespace: str, service: str, addresses: list[str]) -> dict:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def when_watching(server: FakeApiServer, action: Callable[[], object], watches: int = 1) -> threading.Thread:
    """Run action in a thread as soon as the server holds `watches` open watch streams."""

    def run() -> None:
        deadline = time.monotonic() + 5
        while server.open_watches() < watches and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], timeout: float = 3) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def watch_all(func: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict]:
    """Every event of one watch through the client's Watch helper, until the server's timeoutSeconds ends it."""
    return list(watch.Watch().stream(func, *args, **kwargs))


def raw_events(response: urllib3.HTTPResponse) -> Iterator[dict]:
    """Each chunk of a watch stream is exactly one JSON event and its newline."""
    for chunk in response.read_chunked(decode_content=False):
        assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1, chunk
        yield json.loads(chunk)


def test_serves_a_given_listening_socket_without_rebinding_it() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = FakeApiServer(sock)
    assert server.url == f"http://127.0.0.1:{port}"
    with server, client.ApiClient(client.Configuration(host=server.url)) as c:
        assert client.VersionApi(c).get_code().major == "1"
        assert sock.getsockname()[1] == port
    assert sock.fileno() == -1  # stop() closes it


def test_list_pages_through_continue_with_a_consistent_snapshot(server: FakeApiServer, api: client.ApiClient) -> None:
    for name, ns in [("a", "default"), ("b", "shop"), ("c", "default"), ("d", "shop"), ("e", "default")]:
        server.apply(svc(name, ns))
    server.apply(svc("headless", labels={"service.kubernetes.io/headless": ""}))
    server.apply(svc("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    core = client.CoreV1Api(api)

    first = core.list_service_for_all_namespaces(label_selector=PROXYABLE, limit=2)
    assert first.metadata._continue
    # Changes after the first page must not show up in the later pages of the same list.
    server.apply(svc("e", ip="10.96.0.99"))
    server.delete("Service", "d", "shop")
    server.apply(svc("f"))
    pages, token = [first], first.metadata._continue
    while token:
        pages.append(core.list_service_for_all_namespaces(label_selector=PROXYABLE, limit=2, _continue=token))
        token = pages[-1].metadata._continue
    items = [i for p in pages for i in p.items]
    assert [f"{i.metadata.namespace}/{i.metadata.name}" for i in items] == [
        "default/a", "default/c", "default/e", "shop/b", "shop/d",
    ]  # fmt: skip
    assert {p.metadata.resource_version for p in pages} == {first.metadata.resource_version}
    assert items[2].spec.cluster_ip == "10.96.0.1"
    assert all(len(p.items) <= 2 for p in pages)

    fresh = core.list_service_for_all_namespaces(label_selector=PROXYABLE)
    assert [i.metadata.name for i in fresh.items] == ["a", "c", "e", "f", "b"]
    assert int(fresh.metadata.resource_version) == server.resource_version
    assert fresh.metadata._continue is None


def test_list_items_omit_kind_and_api_version(server: FakeApiServer, api: client.ApiClient) -> None:
    server.apply(svc("a"))
    response = client.CoreV1Api(api).list_namespaced_service("default", _preload_content=False)
    body = json.loads(response.data)
    assert (body["kind"], body["apiVersion"]) == ("ServiceList", "v1")
    assert "kind" not in body["items"][0] and "apiVersion" not in body["items"][0]
    meta = body["items"][0]["metadata"]
    assert meta["namespace"] == "default" and meta["uid"] and meta["creationTimestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("app", ["a", "b"]),
        ("!app", ["c"]),
        ("app=web", ["a"]),
        ("app==web", ["a"]),
        ("app!=web", ["b", "c"]),  # != also matches objects without the label
        ("app,tier!=front", ["b"]),
        (PROXYABLE, ["a", "b"]),
    ],
)
def test_label_selectors(server: FakeApiServer, api: client.ApiClient, selector: str, names: list[str]) -> None:
    server.apply(svc("a", labels={"app": "web", "tier": "front"}))
    server.apply(svc("b", labels={"app": "db"}))
    server.apply(svc("c", labels={"service.kubernetes.io/headless": ""}))
    listed = client.CoreV1Api(api).list_namespaced_service("default", label_selector=selector)
    assert [i.metadata.name for i in listed.items] == names


def test_an_unparseable_label_selector_is_400(api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api).list_service_for_all_namespaces(label_selector="app in (a,b)")
    assert err.value.status == 400


def test_a_continue_token_expires_with_compaction(server: FakeApiServer, api: client.ApiClient) -> None:
    for name in "abc":
        server.apply(svc(name))
    core = client.CoreV1Api(api)
    first = core.list_service_for_all_namespaces(limit=1)
    server.apply(svc("a", ip="10.96.0.2"))
    server.compact()
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(limit=1, _continue=first.metadata._continue)
    assert err.value.status == 410
    assert json.loads(err.value.body)["reason"] == "Expired"


def test_watch_sees_added_modified_deleted_and_bookmarks(server: FakeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    changes: list[int] = []

    def change() -> None:
        changes.append(int(server.apply(svc("web"))["metadata"]["resourceVersion"]))
        changes.append(int(server.apply(svc("web", ip="10.96.0.7"))["metadata"]["resourceVersion"]))
        server.delete("Service", "web")
        changes.append(server.resource_version)

    thread = when_watching(server, change)
    w = watch.Watch()
    seen: list[tuple[str, int, Any]] = []
    for event in w.stream(core.list_service_for_all_namespaces, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=10):  # fmt: skip
        seen.append((event["type"], int(event["raw_object"]["metadata"]["resourceVersion"]), event["object"]))
        if event["type"] == "BOOKMARK" and len(changes) == 3 and seen[-1][1] == changes[-1]:
            w.stop()
    thread.join()
    changed = [(t, v) for t, v, _ in seen if t != "BOOKMARK"]
    assert changed == list(zip(["ADDED", "MODIFIED", "DELETED"], changes, strict=True))
    assert seen[-1][:2] == ("BOOKMARK", changes[-1])
    objects = [o for t, _, o in seen if t != "BOOKMARK"]
    assert isinstance(objects[0], client.V1Service) and objects[1].spec.cluster_ip == "10.96.0.7"
    assert objects[2].spec.cluster_ip == "10.96.0.7"  # DELETED carries the last state
    assert w.resource_version == str(changes[-1])


def test_watch_from_unset_or_zero_version_starts_with_synthetic_added(
    server: FakeApiServer, api: client.ApiClient
) -> None:
    server.apply(svc("b", "shop"))
    server.apply(svc("a"))
    core = client.CoreV1Api(api)
    for rv in (None, "0"):
        kwargs = {"resource_version": rv} if rv else {}
        events = watch_all(core.list_service_for_all_namespaces, timeout_seconds=1, **kwargs)
        assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_objects_leaving_and_entering_the_selector_are_deleted_and_added(
    server: FakeApiServer, api: client.ApiClient
) -> None:
    server.apply(svc("web"))
    server.apply(svc("hidden", labels={"service.kubernetes.io/headless": ""}))
    rv = server.resource_version

    def change() -> None:
        server.apply(svc("web", labels={"service.kubernetes.io/headless": ""}))
        server.apply(svc("hidden", labels={}))
        server.apply(svc("hidden", labels={}, ip="10.96.0.3"))
        server.apply(svc("web", labels={"service.kubernetes.io/headless": ""}, ip="10.96.0.4"))  # not visible

    thread = when_watching(server, change)
    core = client.CoreV1Api(api)
    response = core.list_service_for_all_namespaces(
        watch=True, resource_version=str(rv), label_selector=PROXYABLE, timeout_seconds=1, _preload_content=False
    )
    events = [(e["type"], e["object"]["metadata"]["name"], e["object"]) for e in raw_events(response)]
    thread.join()
    assert [(t, n) for t, n, _ in events] == [("DELETED", "web"), ("ADDED", "hidden"), ("MODIFIED", "hidden")]
    deleted = events[0][2]
    assert deleted["metadata"].get("labels") == {}  # the old content...
    assert deleted["metadata"]["resourceVersion"] == str(rv + 1)  # ...at the event's version


def test_raw_watch_is_chunked_one_event_per_line_and_ends_at_timeout(
    server: FakeApiServer, api: client.ApiClient
) -> None:
    server.apply(svc("web"))
    rv = server.resource_version
    thread = when_watching(server, lambda: server.apply(svc("web", ip="10.96.0.9")))
    started = time.monotonic()
    response = client.CoreV1Api(api).list_service_for_all_namespaces(
        watch=True, resource_version=str(rv), allow_watch_bookmarks=True, timeout_seconds=2, _preload_content=False
    )
    assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["Content-Type"] == "application/json"
    events = list(raw_events(response))  # ends without an exception: a clean end of the chunked body
    thread.join()
    assert 1.8 < time.monotonic() - started < 4
    assert events[0]["type"] == "MODIFIED"
    assert (events[0]["object"]["kind"], events[0]["object"]["apiVersion"]) == ("Service", "v1")
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert len(bookmarks) >= 5 and len(events) == len(bookmarks) + 1
    last = {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv + 1)}}
    assert bookmarks[-1]["object"] == last


def test_too_old_resource_version_is_an_error_event_in_the_stream(server: FakeApiServer, api: client.ApiClient) -> None:
    old = int(server.apply(svc("web"))["metadata"]["resourceVersion"])
    server.apply(svc("web", ip="10.96.0.2"))
    server.compact()
    now = server.resource_version
    core = client.CoreV1Api(api)
    response = core.list_service_for_all_namespaces(
        watch=True, resource_version=str(old), timeout_seconds=2, _preload_content=False
    )
    assert response.status == 200
    assert list(raw_events(response)) == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {old} ({now})", "reason": "Expired", "code": 410,
            },
        }
    ]  # fmt: skip
    with pytest.raises(ApiException) as err:
        watch_all(core.list_service_for_all_namespaces, resource_version=str(old), timeout_seconds=1)
    assert err.value.status == 410
    # The compaction point itself is still a valid place to resume from.
    assert watch_all(core.list_service_for_all_namespaces, resource_version=str(now), timeout_seconds=1) == []


def test_too_old_resource_version_as_an_http_410(server: FakeApiServer, api: client.ApiClient) -> None:
    old = int(server.apply(svc("web"))["metadata"]["resourceVersion"])
    server.apply(svc("web", ip="10.96.0.2"))
    server.compact()
    server.expired_as_http = True
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(
            watch=True, resource_version=str(old), timeout_seconds=2, _preload_content=False
        )
    assert err.value.status == 410
    with pytest.raises(ApiException) as err:
        watch_all(core.list_service_for_all_namespaces, resource_version=str(old), timeout_seconds=1)
    assert err.value.status == 410
    assert json.loads(err.value.body)["reason"] == "Expired"


def test_drop_watches_cuts_the_stream_without_a_clean_end(server: FakeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    rv = server.resource_version
    thread = when_watching(server, server.drop_watches)
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        watch_all(core.list_service_for_all_namespaces, resource_version=str(rv), timeout_seconds=10)
    thread.join()
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 2
    while server.open_watches() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.open_watches() == 0
    server.apply(svc("web"))  # the server itself carries on
    events = watch_all(core.list_service_for_all_namespaces, resource_version=str(rv), timeout_seconds=1)
    assert [e["type"] for e in events] == ["ADDED"]


def test_a_watch_the_client_closes_is_no_longer_open(server: FakeApiServer, api: client.ApiClient) -> None:
    response = client.CoreV1Api(api).list_service_for_all_namespaces(
        watch=True, resource_version=str(server.resource_version), _preload_content=False
    )
    assert wait_for(lambda: server.open_watches() == 1)
    response.close()  # the order the client's Watch uses; release_conn() first would pool the open connection
    response.release_conn()
    assert wait_for(lambda: server.open_watches() == 0)


@pytest.mark.parametrize(("code", "reason"), [(503, "ServiceUnavailable"), (429, "TooManyRequests")])
def test_unavailable_answers_with_retry_after(server: FakeApiServer, tmp_path: Path, code: int, reason: str) -> None:
    server.unavailable(30, status=code, retry_after=2)
    with make_client(server, tmp_path, retries=0) as c:  # no urllib3 retries: see the raw answer
        with pytest.raises(ApiException) as err:
            client.CoreV1Api(c).list_node()
        assert err.value.status == code
        assert err.value.headers["Retry-After"] == "2"
        assert json.loads(err.value.body)["reason"] == reason
        server.unavailable(0)
        assert client.CoreV1Api(c).list_node().items == []


def test_default_client_waits_out_a_short_outage_itself(server: FakeApiServer, api: client.ApiClient) -> None:
    """urllib3's default Retry honours Retry-After on 503 (up to 3 times), so the caller only sees longer outages."""
    server.unavailable(0.5, retry_after=1)
    started = time.monotonic()
    assert client.CoreV1Api(api).list_node().items == []
    assert time.monotonic() - started >= 1
    assert [p for _, p, _ in server.requests].count("/api/v1/nodes") == 2


def test_endpoint_slices_list_and_watch(server: FakeApiServer, api: client.ApiClient) -> None:
    server.apply(slice_("web-abc", "shop", "web", ["10.0.0.1"]))
    server.apply(slice_("db-xyz", "data", "db", ["10.0.1.1"]))
    discovery = client.DiscoveryV1Api(api)
    everything = discovery.list_endpoint_slice_for_all_namespaces()
    assert [s.metadata.name for s in everything.items] == ["db-xyz", "web-abc"]
    assert isinstance(everything.items[0], client.V1EndpointSlice)
    assert everything.items[1].endpoints[0].addresses == ["10.0.0.1"]
    shop = discovery.list_namespaced_endpoint_slice("shop")
    assert [s.metadata.name for s in shop.items] == ["web-abc"]

    def change() -> None:
        server.apply(slice_("db-xyz", "data", "db", ["10.0.1.2"]))  # another namespace: not seen
        server.apply(slice_("web-abc", "shop", "web", ["10.0.0.1", "10.0.0.2"]))

    thread = when_watching(server, change)
    rv = shop.metadata.resource_version
    events = watch_all(discovery.list_namespaced_endpoint_slice, "shop", resource_version=rv, timeout_seconds=1)
    thread.join()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("MODIFIED", "web-abc")]
    assert [ep.addresses[0] for ep in events[0]["object"].endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert events[0]["raw_object"]["apiVersion"] == "discovery.k8s.io/v1"


def test_field_selector_picks_one_node(server: FakeApiServer, api: client.ApiClient) -> None:
    for name in ("n1", "n2", "n3"):
        server.apply(node(name))
    core = client.CoreV1Api(api)
    listed = core.list_node(field_selector="metadata.name=n2")
    assert [n.metadata.name for n in listed.items] == ["n2"]
    assert listed.items[0].metadata.namespace is None

    def change() -> None:
        server.apply({**node("n1"), "spec": {"podCIDR": "10.244.1.0/24"}})
        server.apply({**node("n2"), "spec": {"podCIDR": "10.244.2.0/24"}})

    thread = when_watching(server, change)
    rv = listed.metadata.resource_version
    events = watch_all(core.list_node, field_selector="metadata.name=n2", resource_version=rv, timeout_seconds=1)
    thread.join()
    assert [(e["type"], e["object"].metadata.name, e["object"].spec.pod_cidr) for e in events] == [
        ("MODIFIED", "n2", "10.244.2.0/24")
    ]
    with pytest.raises(ApiException) as err:
        core.list_node(field_selector="spec.unschedulable=true")
    assert err.value.status == 400


def test_restart_keeps_port_and_objects_and_forgets_history(server: FakeApiServer, api: client.ApiClient) -> None:
    before = int(server.apply(svc("web"))["metadata"]["resourceVersion"])
    server.apply(svc("web", ip="10.96.0.2"))
    url = server.url
    core = client.CoreV1Api(api)

    server.restart(new_history=False)
    events = watch_all(core.list_service_for_all_namespaces, resource_version=str(before), timeout_seconds=1)
    assert [e["type"] for e in events] == ["MODIFIED"]

    server.restart()
    assert server.url == url
    listed = core.list_service_for_all_namespaces()
    assert [s.spec.cluster_ip for s in listed.items] == ["10.96.0.2"]
    assert int(listed.metadata.resource_version) > before + 1_000_000
    response = core.list_service_for_all_namespaces(
        watch=True, resource_version=str(before), timeout_seconds=2, _preload_content=False
    )
    assert [e["object"]["code"] for e in raw_events(response)] == [410]


def test_pause_bookmarks_makes_the_watch_silent(server: FakeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    rv = str(server.resource_version)
    server.pause_bookmarks(True)
    response = core.list_service_for_all_namespaces(
        watch=True, resource_version=rv, allow_watch_bookmarks=True, _preload_content=False, _request_timeout=(5, 0.8)
    )
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):  # how an idle watch looks to a reader with a timeout
        next(raw_events(response))
    server.pause_bookmarks(False)
    events = watch_all(
        core.list_service_for_all_namespaces, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=1
    )
    assert len(events) >= 3 and {e["type"] for e in events} == {"BOOKMARK"}


def test_unknown_resources_and_objects_are_404_status(server: FakeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        core.list_pod_for_all_namespaces()
    assert err.value.status == 404 and json.loads(err.value.body)["kind"] == "Status"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("nope", "default")
    assert err.value.status == 404 and json.loads(err.value.body)["details"]["name"] == "nope"
    server.apply(node("n1"))
    assert core.read_node("n1").metadata.name == "n1"


def test_requests_are_recorded(server: FakeApiServer, api: client.ApiClient) -> None:
    client.CoreV1Api(api).list_service_for_all_namespaces(label_selector=PROXYABLE, limit=2)
    assert server.requests == [("GET", "/api/v1/services", {"labelSelector": PROXYABLE, "limit": "2"})]
    server.clear_requests()
    assert server.requests == []


def test_discovery_documents(api: client.ApiClient) -> None:
    assert client.VersionApi(api).get_code().git_version.startswith("v1.")
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    assert [g.name for g in client.ApisApi(api).get_api_versions().groups] == ["discovery.k8s.io"]
    resources = client.CoreV1Api(api).get_api_resources().resources
    assert sorted(r.name for r in resources) == ["nodes", "services"]


def test_store_versions_and_no_op_updates(server: FakeApiServer) -> None:
    first = server.apply(svc("web"))
    assert server.apply(svc("web")) == first  # no change, no new version
    second = server.apply(svc("web", ip="10.96.0.2"))
    assert int(second["metadata"]["resourceVersion"]) == int(first["metadata"]["resourceVersion"]) + 1
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert server.apply(node("n1"))["metadata"].get("namespace") is None
    assert server.get("Service", "web", "default") == second
    assert [o["metadata"]["name"] for o in server.objects("Service")] == ["web"]
    server.delete("Service", "web")
    assert server.get("Service", "web", "default") is None
    with pytest.raises(KeyError):
        server.delete("Service", "web")
    with pytest.raises(ValueError):
        server.apply({"kind": "Pod", "metadata": {"name": "p"}})
