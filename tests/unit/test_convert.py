"""kpr.objects.convert: raw Kubernetes objects → kpr.model dataclasses."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from kpr.agent.store import Store
from kpr.datapath import abi
from kpr.model.types import PROTOCOLS, Endpoint, EndpointPort, NodeInfo, ServiceKey, ServicePort, ServiceSpec
from kpr.objects.convert import (
    InvalidObject,
    endpoint_slice_from_dict,
    node_from_dict,
    object_kind,
    parse_trigger_time,
    service_from_dict,
)

pytestmark = pytest.mark.unit

SERVICE_YAML = """
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  resourceVersion: "4711"
  labels: {app: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96:0000::a"]
  externalIPs: [198.51.100.7, 198.51.100.7, "2001:DB8::7"]
  loadBalancerSourceRanges: [" 10.1.2.3/8", 192.168.1.0/24, "2001:db8::1/32"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Cluster
  healthCheckNodePort: 32001
  trafficDistribution: PreferClose
  ports:
    - {name: http, port: 80, targetPort: web, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
    - {name: sig, port: 2905, protocol: SCTP}
status:
  loadBalancer:
    ingress:
      - ip: 203.0.113.1
      - {ip: 203.0.113.2, ipMode: Proxy}
      - hostname: lb.example.com
      - {ip: 203.0.113.3, ipMode: VIP}
"""

SLICE_YAML = """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  resourceVersion: "99"
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2024-05-01T10:00:00Z"}
addressType: IPv6
ports:
  - {name: http, port: 8080, protocol: TCP}
  - {name: dns, port: 5353, protocol: UDP}
  - {name: nameless}
  - {name: zero, port: 0}
  - port: 9000
endpoints:
  - addresses: ["FD00:244:0:1::2", "fd00:244::99"]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
    zone: zone-a
    hints:
      forZones: [{name: zone-a}, {name: zone-b}]
      forNodes: [{name: node-a}]
  - addresses: ["fd00:244:0:2::3"]
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: ["fd00:244:0:2::4"]
  - addresses: ["fd00:244:0:2::5"]
    conditions: {ready: false}
  - addresses: ["fd00:244:0:2::6"]
    conditions: {ready: null, serving: null, terminating: null}
"""

NODE_YAML = """
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a, kubernetes.io/hostname: node-a}
status:
  addresses:
    - {type: Hostname, address: node-a}
    - {type: InternalIP, address: 192.168.0.10}
    - {type: InternalIP, address: "FD00:192::10"}
    - {type: ExternalIP, address: 203.0.113.50}
    - {type: InternalDNS, address: node-a.internal}
    - {type: ExternalIP, address: 192.168.0.10}
"""


def load(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


# --- Service ------------------------------------------------------------------------------------------------------


def test_service_full() -> None:
    svc = service_from_dict(load(SERVICE_YAML))
    assert svc.key == ServiceKey("shop", "web")
    assert svc.type == "LoadBalancer"
    assert svc.cluster_ips == ("10.96.0.10", "fd00:10:96::a")
    assert svc.ports == (
        ServicePort(name="http", protocol="TCP", port=80, target_port="web", node_port=30080),
        ServicePort(name="dns", protocol="UDP", port=53, target_port=5353, node_port=0),
        ServicePort(name="sig", protocol="SCTP", port=2905, target_port=2905, node_port=0),
    )
    assert svc.external_ips == ("198.51.100.7", "2001:db8::7")
    assert svc.load_balancer_ips == ("203.0.113.1", "203.0.113.3")
    assert svc.load_balancer_source_ranges == ("10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32")
    assert svc.affinity_timeout == 300
    assert svc.external_traffic_policy == "Local"
    assert svc.internal_traffic_policy == "Cluster"
    assert svc.health_check_node_port == 32001
    assert svc.traffic_distribution == "PreferClose"
    assert not svc.headless
    assert svc.proxy_name == ""
    assert svc.resource_version == "4711"


def test_service_minimal_defaults() -> None:
    svc = service_from_dict({"metadata": {"name": "tiny"}, "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 1}]}})
    assert svc.key == ServiceKey("default", "tiny")
    assert svc.type == "ClusterIP"
    assert svc.cluster_ips == ("10.0.0.1",)
    assert svc.ports == (ServicePort(name="", protocol="TCP", port=1, target_port=1, node_port=0),)
    assert (svc.affinity_timeout, svc.internal_traffic_policy, svc.external_traffic_policy) == (0, "Cluster", "Cluster")
    assert (svc.external_ips, svc.load_balancer_ips, svc.load_balancer_source_ranges) == ((), (), ())


def test_service_tolerates_nulls() -> None:
    svc = service_from_dict(
        {
            "metadata": {"name": "n", "namespace": None, "labels": None, "resourceVersion": None},
            "spec": {
                "clusterIP": "10.0.0.1",
                "clusterIPs": None,
                "ports": [{"port": 80, "protocol": None, "name": None, "nodePort": None, "targetPort": None}],
                "externalIPs": None,
                "loadBalancerSourceRanges": None,
                "sessionAffinity": None,
                "internalTrafficPolicy": None,
                "externalTrafficPolicy": None,
                "trafficDistribution": None,
            },
            "status": {"loadBalancer": {"ingress": None}},
        }
    )
    assert svc.key == ServiceKey("default", "n")
    assert svc.ports == (ServicePort("", "TCP", 80, 80, 0),)
    assert svc.cluster_ips == ("10.0.0.1",)


def test_session_affinity_default_timeout() -> None:
    d = load(SERVICE_YAML)
    del d["spec"]["sessionAffinityConfig"]
    assert service_from_dict(d).affinity_timeout == 10800
    d["spec"]["sessionAffinity"] = "None"
    assert service_from_dict(d).affinity_timeout == 0


@pytest.mark.parametrize(
    ("spec", "cluster_ips", "headless"),
    [
        ({"clusterIP": "None"}, (), True),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, (), True),
        ({"clusterIP": ""}, (), False),
        ({}, (), False),
        ({"type": "ExternalName", "externalName": "db.example.com"}, (), False),
        ({"type": "ExternalName", "clusterIP": "10.0.0.5"}, (), False),
        ({"clusterIP": "010.000.000.011"}, ("10.0.0.11",), False),
        ({"clusterIPs": ["fd00::0:1", "10.0.0.1"]}, ("fd00::1", "10.0.0.1"), False),
    ],
)
def test_service_cluster_ips(spec: dict[str, Any], cluster_ips: tuple[str, ...], headless: bool) -> None:
    svc = service_from_dict({"metadata": {"name": "s"}, "spec": spec})
    assert (svc.cluster_ips, svc.headless) == (cluster_ips, headless)


def test_service_proxy_name_label() -> None:
    d = load(SERVICE_YAML)
    d["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "cilium"
    assert service_from_dict(d).proxy_name == "cilium"


def _bad_service(path: list[Any], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(load(SERVICE_YAML))
    target: Any = d
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["spec", "ports", 1, "port"], 70000, "spec.ports[1].port 70000 is out of range 1-65535"),
        (["spec", "ports", 0, "port"], 0, "spec.ports[0].port 0 is out of range 1-65535"),
        (["spec", "ports", 0, "port"], "80", "spec.ports[0].port '80' is not an integer"),
        (["spec", "ports", 0, "port"], None, "spec.ports[0].port None is not an integer"),
        (["spec", "ports", 0, "port"], True, "spec.ports[0].port True is not an integer"),
        (["spec", "ports", 0, "nodePort"], 65536, "spec.ports[0].nodePort 65536 is out of range 1-65535"),
        (["spec", "ports", 1, "targetPort"], -1, "spec.ports[1].targetPort -1 is out of range 1-65535"),
        (["spec", "ports", 2, "protocol"], "ICMP", "spec.ports[2].protocol 'ICMP' is not one of TCP, UDP, SCTP"),
        (["spec", "ports", 2, "protocol"], "tcp", "spec.ports[2].protocol 'tcp' is not one of TCP, UDP, SCTP"),
        (["spec", "clusterIPs", 1], "fd00::zz", "spec.clusterIPs[1] 'fd00::zz' is not a valid IP address"),
        (["spec", "clusterIPs"], ["10.96.0.10", "10.96.0.11"], "spec.clusterIPs[1] 10.96.0.11 is a second IPv4"),
        (["spec", "externalIPs", 0], "198.51.100.300", "spec.externalIPs[0] '198.51.100.300' is not a valid IP"),
        (["spec", "externalIPs", 0], "fe80::1%eth0", "spec.externalIPs[0] 'fe80::1%eth0' is not a valid IP"),
        (["spec", "loadBalancerSourceRanges", 1], "10.0.0.0/33", "spec.loadBalancerSourceRanges[1] '10.0.0.0/33'"),
        (["status", "loadBalancer", "ingress", 0, "ip"], "lb", "status.loadBalancer.ingress[0].ip 'lb' is not a"),
        (
            ["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"],
            86401,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401 is out of range 1-86400",
        ),
        (
            ["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"],
            0,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds 0 is out of range 1-86400",
        ),
        (["spec", "type"], "Magic", "spec.type 'Magic' is not one of ClusterIP, NodePort, LoadBalancer, Externa"),
        (["spec", "externalTrafficPolicy"], "Global", "spec.externalTrafficPolicy 'Global' is not one of Clus"),
        (["spec", "internalTrafficPolicy"], "local", "spec.internalTrafficPolicy 'local' is not one of Clus"),
        (["spec", "healthCheckNodePort"], 99999, "spec.healthCheckNodePort 99999 is out of range 1-65535"),
        (["metadata", "name"], "", "metadata.name is missing"),
    ],
)
def test_service_invalid(path: list[Any], value: Any, message: str) -> None:
    bad = _bad_service(path, value)
    name = "<unnamed>" if path == ["metadata", "name"] else "web"
    with pytest.raises(InvalidObject) as err:
        service_from_dict(bad)
    assert str(err.value).startswith(f"Service shop/{name}: {message}")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Web", "metadata.name 'Web' is not a DNS-1123 subdomain"),
        ("name", "web\ud800", "metadata.name 'web\\ud800' is not a DNS-1123 subdomain"),  # YAML can say "\ud800"
        ("namespace", "shop.eu", "metadata.namespace 'shop.eu' is not a DNS-1123 label"),
        ("port", "h\ud800", "spec.ports[0].name 'h\\ud800' is not a DNS-1123 label"),
        ("port", "x" * 64, "spec.ports[0].name"),
    ],
)
def test_names_the_api_server_would_refuse_are_refused(field: str, value: str, message: str) -> None:
    """A manifest may hold any text; a name that is no DNS-1123 label or subdomain never reaches the maps (a lone
    surrogate used to stop the agent when it encoded the name for svc_names)."""
    d = copy.deepcopy(load(SERVICE_YAML))
    if field == "port":
        d["spec"]["ports"][0]["name"] = value
    else:
        d["metadata"][field] = value
    with pytest.raises(InvalidObject, match=re.escape(message)):
        service_from_dict(d)
    sl: dict[str, Any] = {"metadata": {"name": "web-abc", "namespace": "shop"}, "addressType": "IPv4"}
    sl["ports"] = [{"port": 1, "name": value if field == "port" else "http"}]
    if field != "port":
        sl["metadata"][field] = value
    with pytest.raises(InvalidObject):
        endpoint_slice_from_dict(sl)


def test_invalid_object_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^Service default/web: spec\.ports\[0\]\.port 70000 is out of range"):
        service_from_dict({"metadata": {"name": "web"}, "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 70000}]}})


# --- EndpointSlice ------------------------------------------------------------------------------------------------


def test_endpoint_slice_full() -> None:
    es = endpoint_slice_from_dict(load(SLICE_YAML))
    assert (es.namespace, es.name, es.service_name, es.address_type) == ("shop", "web-abc12", "web", "IPv6")
    assert es.service_key == ServiceKey("shop", "web")
    assert es.resource_version == "99"
    assert es.trigger_time == 1714557600.0
    assert es.ports == (
        EndpointPort("http", "TCP", 8080),
        EndpointPort("dns", "UDP", 5353),
        EndpointPort("", "TCP", 9000),
    )
    assert es.endpoints == (
        Endpoint(
            addresses=("fd00:244:0:1::2", "fd00:244::99"),
            ready=True,
            serving=True,
            terminating=False,
            node_name="node-a",
            zone="zone-a",
            hint_zones=("zone-a", "zone-b"),
            hint_nodes=("node-a",),
        ),
        Endpoint(addresses=("fd00:244:0:2::3",), ready=False, serving=True, terminating=True),
        Endpoint(addresses=("fd00:244:0:2::4",), ready=True, serving=True, terminating=False),
        # An absent serving condition counts as serving even when not ready (kube-proxy: Serving == nil || *Serving).
        Endpoint(addresses=("fd00:244:0:2::5",), ready=False, serving=True, terminating=False),
        Endpoint(addresses=("fd00:244:0:2::6",), ready=True, serving=True, terminating=False),
    )


def test_endpoint_slice_fqdn_addresses_kept_as_is() -> None:
    es = endpoint_slice_from_dict(
        {
            "metadata": {"name": "x", "namespace": "ns"},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["DB.example.com"]}],
            "ports": None,
        }
    )
    assert es.endpoints == (Endpoint(addresses=("DB.example.com",)),)
    assert es.service_name == ""
    assert es.ports == ()
    assert es.trigger_time is None


def test_endpoint_slice_ipv4_canonical() -> None:
    es = endpoint_slice_from_dict(
        {
            "metadata": {"name": "x"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.001.002"], "conditions": None, "hints": None}, None],
        }
    )
    assert es.endpoints[0].addresses == ("10.244.1.2",)
    assert es.endpoints[1].addresses == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"addressType": "IPv5"}, "addressType 'IPv5' is not one of IPv4, IPv6, FQDN"),
        ({"addressType": None}, "addressType None is not one of IPv4, IPv6, FQDN"),
        ({"ports": [{"port": 8080}, {"port": 65536}]}, "ports[1].port 65536 is out of range 1-65535"),
        ({"ports": [{"port": -5}]}, "ports[0].port -5 is out of range 1-65535"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "ports[0].protocol 'ICMP' is not one of TCP, UDP, SCTP"),
        ({"endpoints": [{"addresses": ["fd00::1"]}, {"addresses": ["nope"]}]}, "endpoints[1].addresses[0] 'nope'"),
        ({"endpoints": [{"addresses": ["10.0.0.1"]}]}, "endpoints[0].addresses[0] 10.0.0.1 is not an IPv6 address"),
        (
            {"endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": "false"}}]},
            "endpoints[0].conditions.ready 'false' is not a boolean",
        ),
        (
            {"endpoints": [{"addresses": ["fd00::1"], "conditions": {"terminating": 1}}]},
            "endpoints[0].conditions.terminating 1 is not a boolean",
        ),
    ],
)
def test_endpoint_slice_invalid(change: dict[str, Any], message: str) -> None:
    d = load(SLICE_YAML)
    d.update(change)
    with pytest.raises(InvalidObject) as err:
        endpoint_slice_from_dict(d)
    assert str(err.value).startswith(f"EndpointSlice shop/web-abc12: {message}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T10:00:00Z", 1714557600.0),
        ("2024-05-01T10:00:00.25Z", 1714557600.25),
        ("2024-05-01T10:00:00.123456789Z", 1714557600.123456),
        ("2024-05-01T12:00:00+02:00", 1714557600.0),
        ("2024-05-01T10:00:00", 1714557600.0),
        ("yesterday", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_trigger_time(value: Any, expected: float | None) -> None:
    got = parse_trigger_time(value)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-6)


def test_trigger_time_unquoted_in_yaml() -> None:
    d = load(SLICE_YAML.replace('"2024-05-01T10:00:00Z"', "2024-05-01T10:00:00Z"))
    assert endpoint_slice_from_dict(d).trigger_time == 1714557600.0


# --- Node ---------------------------------------------------------------------------------------------------------


def test_node() -> None:
    node = node_from_dict(load(NODE_YAML))
    assert node.name == "node-a"
    assert node.zone == "zone-a"
    assert node.primary_ips == ("192.168.0.10", "fd00:192::10")  # the first InternalIP of each family
    assert node.labels["kubernetes.io/hostname"] == "node-a"
    external_only = node_from_dict(
        {"metadata": {"name": "n"}, "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.9"}]}}
    )
    assert external_only.primary_ips == ("203.0.113.9",)


def test_node_without_zone_or_addresses() -> None:
    node = node_from_dict({"metadata": {"name": "bare", "labels": None}, "status": None})
    assert (node.name, node.zone, node.primary_ips) == ("bare", "", ())
    assert (node.being_deleted, node.taints) == (False, ())


def test_node_deletion_and_taints_are_kept_for_the_health_check() -> None:
    node = node_from_dict(
        {
            "metadata": {"name": "n", "deletionTimestamp": "2026-12-05T10:00:00Z"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}, {"effect": "x"}]},
        }
    )
    assert node.being_deleted and node.taints == ("ToBeDeletedByClusterAutoscaler",)


def test_a_change_of_health_facts_alone_reprograms_no_service() -> None:
    store = Store(NodeInfo("n", zone="z"))
    store.upsert_service(ServiceSpec(ServiceKey("default", "web"), cluster_ips=("10.96.0.1",)))
    assert store.set_node(NodeInfo("n", zone="z", taints=("ToBeDeletedByClusterAutoscaler",))) == set()
    assert store.node.taints == ("ToBeDeletedByClusterAutoscaler",)
    assert store.set_node(NodeInfo("n", zone="other")) == {ServiceKey("default", "web")}


def test_node_invalid() -> None:
    d = load(NODE_YAML)
    d["status"]["addresses"][1]["address"] = "192.168.0.300"
    with pytest.raises(InvalidObject, match=r"^Node node-a: status\.addresses\[1\]\.address '192\.168\.0\.300'"):
        node_from_dict(d)


# --- kind ---------------------------------------------------------------------------------------------------------


def test_object_kind() -> None:
    assert object_kind(load(SERVICE_YAML)) == "Service"
    assert object_kind(load(SLICE_YAML)) == "EndpointSlice"
    assert object_kind(load(NODE_YAML)) == "Node"
    # list items from the API carry no kind
    for text, kind in ((SERVICE_YAML, "Service"), (SLICE_YAML, "EndpointSlice"), (NODE_YAML, "Node")):
        item = load(text)
        del item["kind"]
        assert object_kind(item) == kind
    assert object_kind({"metadata": {"name": "x"}}) == ""
    assert object_kind({"kind": "ConfigMap", "data": {}}) == "ConfigMap"


def test_every_protocol_a_service_may_name_has_a_number_in_the_datapath() -> None:
    assert tuple(abi.PROTOCOL_NUMBERS) == PROTOCOLS
    assert {abi.PROTOCOL_NAMES[abi.PROTOCOL_NUMBERS[p]] for p in PROTOCOLS} == set(PROTOCOLS)
