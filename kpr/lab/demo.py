"""`make demo`: a lab node with three pods behind a Service, traffic through kpr, then a backend removed.

Everything happens inside network namespaces this script creates and removes; the host network is never touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kpr.datapath.inspect import read_services
from kpr.lab.cluster import (
    LabAgent,
    Port,
    endpoint_slice,
    pod_endpoints,
    service,
    wait_until,
    write_manifest,
)
from kpr.lab.lab import Lab
from kpr.lab.layout import External, Node, Pod

V4, V6 = "10.96.0.10", "fd00:96::10"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def bar(served: dict[str, int], total: int) -> str:
    return "\n".join(
        f"   {name:<6} {count:>4}  {'#' * round(40 * count / total)}" for name, count in sorted(served.items())
    )


def web_manifests(node: Node, pods: Sequence[Pod]) -> list[dict[str, object]]:
    ports: list[Port] = [("http", 80, "http", "TCP", 30080), ("dns", 53, 8080, "UDP", 30053)]
    slice_ports = [("http", 8080, "TCP"), ("dns", 8080, "UDP")]
    node_object = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node.ipv4}, {"type": "InternalIP", "address": node.ipv6}]
        },
    }
    return [
        node_object,
        service("web", [V4, V6], ports, type="NodePort"),
        endpoint_slice("web", pod_endpoints(pods, 4), slice_ports, family=4),
        endpoint_slice("web", pod_endpoints(pods, 6), slice_ports, family=6),
    ]


class DemoFailed(RuntimeError):
    """Traffic the demo shows did not all get through."""


def traffic(lab: Lab, client: Pod | External, proto: str, vip: str, port: int, count: int = 300) -> None:
    result = lab.client(client, proto, vip, port, count=count)
    shown = f"[{vip}]:{port}" if ":" in vip else f"{vip}:{port}"
    print(
        f"   {count} {proto.upper()} requests from '{client.name}' to {shown}: {result['ok']} answered, "
        f"errors {result['errors'] or 'none'}; the client saw its peer as {', '.join(result['peers'])}; "
        f"the backends saw the client as {', '.join(result['seen_as'])}"
    )
    print(bar(result["served"], count))
    if result["ok"] != count:  # a demo that shows failures must not pass for one that works
        raise DemoFailed(f"{count - result['ok']} of {count} {proto.upper()} requests to {shown} failed")


def chain(lab: Lab, node: Node, pod: Pod) -> None:
    """kpr-cni ADD for `pod`, as a container runtime calls it after the bridge plugin (prevResult = its result)."""
    prev_result = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": pod.host_veth}, {"name": "eth0", "sandbox": f"/run/netns/{pod.netns}"}],
        "ips": [{"address": f"{pod.ipv4}/24", "interface": 1}, {"address": f"{pod.ipv6}/64", "interface": 1}],
    }
    conf = {
        "cniVersion": "1.0.0",
        "name": "demo",
        "type": "kpr-cni",
        "bpffsDir": str(node.bpffs_dir),
        "prevResult": prev_result,
    }
    env = [
        "env",
        "CNI_COMMAND=ADD",
        f"CNI_CONTAINERID=demo-{pod.name}",
        f"CNI_NETNS=/run/netns/{pod.netns}",
        "CNI_IFNAME=eth0",
        "CNI_PATH=/usr/lib/cni",
    ]
    kpr_cni = Path(sys.executable).with_name("kpr-cni")
    result = lab.run(node, [*env, str(kpr_cni)], input=json.dumps(conf))
    print(
        f"   kpr-cni ADD for pod '{pod.name}' printed prevResult back ({len(result.stdout)} bytes); "
        f"on {pod.host_veth} now: tc filters kpr_pod_in4/6 (ingress) and kpr_pod_out4/6 (egress)"
    )
    lab.run(pod, ["iptables", "-A", "OUTPUT", "-d", V4, "-p", "tcp", "--dport", "80", "-j", "ACCEPT"])
    print(f"   and inside the pod, an iptables rule that counts packets to {V4}:80 (what a service mesh matches on)")


def iptables_count(lab: Lab, pod: Pod) -> int:
    out = lab.run(pod, ["iptables", "-L", "OUTPUT", "-v", "-n", "-x"]).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if V4 in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=["socket", "chaining", "kubernetes"],
        default="socket",
        help="chaining: --socket-lb=hostns-only and the client pod chained by kpr-cni; kubernetes: the real "
        "control plane (make k8s builds it), kubectl, a Deployment and a rollout",
    )
    mode = parser.parse_args().mode
    try:
        if mode == "kubernetes":
            from kpr.lab import demo_kubernetes

            return demo_kubernetes.main()
        return run(chaining=mode == "chaining")
    except DemoFailed as e:  # the lab is torn down by now
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
        return 1


def run(chaining: bool) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kpr-demo-") as tmp, Lab() as lab:
        manifests = Path(tmp)
        say("Lab: node 'node1' (its own network namespace and cgroup), pods pod-a, pod-b, pod-c and a client")
        node = lab.add_node("node1")
        pods = [lab.add_pod(node, name) for name in ("pod-a", "pod-b", "pod-c")]
        client = lab.add_pod(node, "client", echo=False)
        ext = lab.add_external("ext")
        print(f"   an external client 'ext' on the underlay: {ext.ipv4} {ext.ipv6}; node1 is {node.ipv4} there")
        for p in pods:
            print(f"   {p.name}: {p.ipv4} {p.ipv6}  (echo server on 8080/tcp and 8080/udp)")

        say(
            f"Service default/web (NodePort): ClusterIP {V4} and {V6}, 80/TCP -> 8080 and 53/UDP -> 8080, "
            "NodePorts 30080 and 30053"
        )
        write_manifest(manifests, "web.yaml", web_manifests(node, pods))
        extra = ["--devices", "eth0", *(["--socket-lb", "hostns-only"] if chaining else [])]
        agent = LabAgent(lab, node, manifests, extra_args=extra).start()
        agent.wait_started()
        print(
            f"   kpr agent running on node1 (pid {agent.proc.pid if agent.proc else '?'}), "
            f"programs attached to {node.cgroup}"
        )

        if chaining:
            say("CNI chaining: sockets of the host only at connect(); pod 'client' per packet at its veth")
            chain(lab, node, client)
        say(
            "Traffic to the ClusterIP, load balanced "
            + ("per packet at the client's veth" if chaining else "at connect() by kpr")
        )
        traffic(lab, client, "tcp", V4, 80)
        if chaining:
            print(
                f"   the pod's own iptables counter for {V4}:80 saw {iptables_count(lab, client)} packets: "
                "the ClusterIP is on the wire inside the pod"
            )
        traffic(lab, client, "udp", V4, 53)
        traffic(lab, client, "tcp", V6, 80)

        say(f"From outside: 'ext' to the NodePort {node.ipv4}:30080, load balanced per packet at tc on node1's eth0")
        traffic(lab, ext, "tcp", node.ipv4, 30080)
        traffic(lab, ext, "udp", node.ipv6, 30053)
        print("   (the pods are on node1, so no masquerade: they see the external client's own address)")

        say("kpr services (read straight from the pinned BPF maps)")
        print(agent.kpr("services", "--bpffs-dir", str(node.bpffs_dir)).stdout.rstrip())

        say("pod-c leaves the EndpointSlices (as when it is scaled away)")
        write_manifest(manifests, "web.yaml", web_manifests(node, pods[:2]))
        t0 = time.monotonic()
        gone = f"{pods[2].ipv4}:8080/TCP"
        wait_until(
            lambda: all(
                gone not in (b.address for s in r.scopes for b in s.backends) for r in read_services(node.bpffs_dir)
            ),
            15,
            "pod-c to leave the maps",
            interval=0.01,
        )
        print(
            f"   the maps followed in {1000 * (time.monotonic() - t0):.0f} ms "
            "(the agent polls the manifest directory every 200 ms, then coalesces for 50 ms)"
        )
        traffic(lab, client, "tcp", V4, 80)

        say("kpr explain: what happens to a new flow, in words")
        print(agent.kpr("explain", "--bpffs-dir", str(node.bpffs_dir), client.ipv4, f"{V4}:80/TCP").stdout.rstrip())

        say("kpr status")
        print(
            agent.kpr("status", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir)).stdout.rstrip()
        )

        say("kpr cleanup: detach the programs, unpin the maps")
        agent.stop()
        print(
            agent.kpr("cleanup", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir)).stdout.rstrip()
        )
        lab.assert_host_isolated()
    say(f"Done in {time.monotonic() - started:.0f} s; every namespace, cgroup and pin is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
