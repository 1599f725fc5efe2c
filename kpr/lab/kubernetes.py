"""A lab cluster on the real Kubernetes control plane: what the k8s test tier and `make demo MODE=kubernetes` use.

Lab nodes in two zones run kpr's agents with the `kpr` ServiceAccount's token, bound to exactly
deploy/clusterrole.yaml; the lab kubelet runs the Pods the real scheduler binds to them; an external client sits on
the underlay with a route to the LoadBalancer range via node1. Everything is driven through the API as a cluster is:
kubectl, run inside the control plane's namespace (the API server is never reachable from the host network).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpr.lab.cluster import LabAgent
from kpr.lab.controlplane import ControlPlane
from kpr.lab.kubelet import LabKubelet
from kpr.lab.lab import Lab
from kpr.lab.layout import External, Node, Pod

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ZONES = {"node1": "zone-a", "node2": "zone-b"}
LB_RANGE = "172.16.100.0/24"  # LoadBalancer ingress IPs tests assign; the external client routes them via node1
ECHO_PORTS = (("http", 8080, "TCP"), ("stream", 9000, "TCP"), ("dns", 8080, "UDP"))  # name, containerPort, protocol
SERVICE_PORTS = (("http", 80, "http", "TCP"), ("stream", 90, "stream", "TCP"), ("dns", 53, "dns", "UDP"))


def deployment(
    name: str,
    replicas: int,
    *,
    namespace: str = "default",
    ports: Sequence[tuple[str, int, str]] = ECHO_PORTS,
    node: str | None = None,
    spread: bool = False,
    grace: int = 3,
) -> dict[str, Any]:
    """A Deployment (rolling update, maxSurge 1, maxUnavailable 0) of lab echo pods on `ports`; `node` pins them,
    `spread` spreads them evenly over the nodes."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": grace,
        "containers": [
            {
                "name": "echo",
                "image": "lab/echo",  # the lab kubelet runs kpr.lab.echo, whatever the image
                "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports],
            }
        ],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    if spread:
        spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app": name}},
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def selector_service(
    name: str,
    *,
    namespace: str = "default",
    type: str = "ClusterIP",
    ports: Sequence[tuple[str, int, int | str, str]] = SERVICE_PORTS,
    selector: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Service selecting app=`selector` (default: its own name); extra keyword arguments are spec fields."""
    body: dict[str, Any] = {
        "type": type,
        "selector": {"app": selector or name},
        "ports": [{"name": n, "port": p, "targetPort": t, "protocol": proto} for n, p, t, proto in ports],
        **spec,
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": body}


@dataclass
class KubernetesLab:
    lab: Lab
    cp: ControlPlane
    kubelet: LabKubelet
    nodes: list[Node]
    ext: External
    agents: dict[str, LabAgent] = field(default_factory=dict)

    @classmethod
    def start(cls, lab: Lab, node_names: Sequence[str] = ("node1", "node2")) -> KubernetesLab:
        """Nodes, the control plane, the lab kubelet and a kpr agent per node, as kpr runs in a cluster."""
        nodes = [lab.add_node(name) for name in node_names]
        cp = ControlPlane(lab).start()
        ext = lab.add_external("ext")
        lab.run(ext, ["ip", "route", "add", LB_RANGE, "via", nodes[0].ipv4])
        kubelet = LabKubelet(lab, cp, nodes, zones=ZONES).start()
        k = cls(lab, cp, kubelet, nodes, ext)
        try:
            for manifest in ("serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml"):
                k.kubectl("apply", "-f", "-", input=(DEPLOY / manifest).read_text())
            kubeconfig = cp.service_account_kubeconfig("kube-system", "kpr")
            for node in nodes:
                k.agents[node.name] = LabAgent(lab, node, kubeconfig=kubeconfig, extra_args=["--devices", "eth0"])
                k.agents[node.name].start()
            for agent in k.agents.values():
                agent.wait_started()
        except BaseException:
            k.close()
            raise
        return k

    def close(self) -> None:
        """Stop the kubelet (the lab's close() takes the rest)."""
        self.kubelet.close()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cp.kubectl(*args, input=input, check=check).stdout

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(objects)))

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def pod(self, namespace: str, name: str) -> Pod:
        """The lab pod running a Pod (for traffic from inside it)."""
        return self.kubelet.pod(namespace, name)

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return list(self.get("pods", "-n", namespace, "-l", selector)["items"])

    def pod_names(self, app: str, namespace: str = "default") -> set[str]:
        """The Pods of app=`app` not being deleted."""
        return {
            p["metadata"]["name"]
            for p in self.pods(namespace, f"app={app}")
            if not p["metadata"].get("deletionTimestamp")
        }

    def wait_rollout(self, namespace: str, deployment: str, timeout: float = 60) -> None:
        self.kubectl("rollout", "status", "-n", namespace, f"deployment/{deployment}", f"--timeout={int(timeout)}s")

    def service(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """A Service's clusterIPs, nodePorts by port name and healthCheckNodePort, as the API server allocated them."""
        spec = self.get("service", "-n", namespace, name)["spec"]
        return {
            "ips": spec.get("clusterIPs", []),
            "node_ports": {p["name"]: p.get("nodePort") for p in spec["ports"]},
            "health": spec.get("healthCheckNodePort"),
        }
