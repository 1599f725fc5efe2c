"""`make demo MODE=kubernetes`: kpr on the real Kubernetes control plane, driven with kubectl.

kube-apiserver, kube-controller-manager, kube-scheduler and etcd (the pinned release scripts/k8s-build.sh built) run
in a lab namespace; two lab nodes, each with a kpr agent using the `kpr` ServiceAccount; the lab kubelet runs the
pods. A Deployment and a NodePort Service are applied, served from a pod and from outside, scaled, and restarted
under traffic. Everything stays inside the lab's network namespaces.
"""

from __future__ import annotations

import sys
import time

from kpr.datapath.inspect import read_services
from kpr.lab.cluster import finish_client_loop, finish_holder, start_client_loop, start_holder, wait_until
from kpr.lab.demo import DemoFailed, bar, say
from kpr.lab.kubernetes import KubernetesLab, deployment, selector_service
from kpr.lab.lab import Lab
from kpr.lab.layout import Node


def programmed(node: Node, frontend: str) -> int:
    row = next((r for r in read_services(node.bpffs_dir) if r.frontend == frontend), None)
    return len(row.scopes[0].backends) if row else -1


def main() -> int:
    started = time.monotonic()
    with Lab() as lab:
        say("The real control plane in a lab namespace, two lab nodes with kpr agents (no kube-proxy)")
        k = KubernetesLab.start(lab)
        try:
            print(
                f"   etcd, kube-apiserver, kube-controller-manager, kube-scheduler at {k.cp.server}: "
                f"ready in {k.cp.start_seconds:.1f} s"
            )
            print("   kpr agents run as ServiceAccount kube-system/kpr, bound to deploy/clusterrole.yaml")
            print("$ kubectl get nodes -o wide")
            print(k.kubectl("get", "nodes", "-o", "wide").rstrip())

            say("kubectl apply: Deployment web (3 replicas) and a NodePort Service; a client Deployment on node1")
            k.apply(deployment("web", 3, spread=True), selector_service("web", type="NodePort"))
            k.apply(deployment("client", 1, ports=(), node="node1"))
            k.wait_rollout("default", "web")
            k.wait_rollout("default", "client")
            print(k.kubectl("get", "pods", "-o", "wide").rstrip())
            print(k.kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=web").rstrip())
            info = k.service("web")
            vip, node_port = info["ips"][0], info["node_ports"]["http"]
            n1 = k.nodes[0]
            wait_until(lambda: programmed(n1, f"{vip}:80/TCP") == 3, 15, "web programmed")
            (client_obj,) = k.pods("default", "app=client")
            client = k.pod("default", client_obj["metadata"]["name"])

            say(f"Traffic: the client pod to the ClusterIP {vip}:80, an external client to NodePort {node_port}")
            for who, host, port in ((client, vip, 80), (k.ext, n1.ipv4, node_port)):
                result = lab.client(who, "tcp", host, port, count=150)
                print(f"   150 connections from {who.name} to {host}:{port}: {result['ok']} answered")
                print(bar(result["served"], 150))
                if result["ok"] != 150:
                    raise DemoFailed(f"{150 - result['ok']} of 150 connections from {who.name} to {host}:{port} failed")

            say("kubectl scale deployment/web --replicas=5")
            k.kubectl("scale", "deployment/web", "--replicas=5")
            k.wait_rollout("default", "web")
            t0 = time.monotonic()
            wait_until(lambda: programmed(n1, f"{vip}:80/TCP") == 5, 15, "five backends", interval=0.01)
            print(f"   rollout status done; node1's maps had all five {1000 * (time.monotonic() - t0):.0f} ms later")
            print(k.agents["node1"].kpr("services", "--bpffs-dir", str(n1.bpffs_dir), "--address", vip).stdout)

            say("kubectl rollout restart deployment/web, under traffic (short connections + held connections)")
            loop = start_client_loop(lab, client, vip, 80, 25, interval=0.02)
            hold = start_holder(lab, k.ext, tcp=(n1.ipv4, info["node_ports"]["stream"]), connections=6)
            old = k.pod_names("web")
            k.kubectl("rollout", "restart", "deployment/web")
            k.wait_rollout("default", "web", timeout=90)
            wait_until(lambda: old <= set(k.kubelet.stopped_at), 30, "the old pods stopped")
            short, held = finish_client_loop(loop), finish_holder(hold)
            cut = [c for c in held["tcp"] if c["end"] not in (None, "closed")]
            print(
                f"   {short['ok']} short connections, errors {short['errors'] or 'none'}; "
                f"{len(held['tcp'])} held connections, {len(cut)} cut (each old pod's held connections ended with "
                "its process, by a FIN, after it stopped serving)"
            )
            if short["errors"] or cut:
                raise DemoFailed(f"the rollout cut traffic: errors {short['errors']}, {len(cut)} held connections cut")

            say("kpr status on node1")
            node = k.nodes[0]
            status = k.agents["node1"].kpr(
                "status", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir)
            )
            print(status.stdout.rstrip())
        finally:
            k.close()
        lab.assert_host_isolated()
    say(f"Done in {time.monotonic() - started:.0f} s; every namespace, cgroup, pin and process is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
