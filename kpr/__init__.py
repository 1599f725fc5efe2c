"""kpr: eBPF load balancing for Kubernetes Services, in place of kube-proxy.

The packages form layers, lowest first. A package imports only from layers below its own (skipping layers is fine),
never from its own layer's other packages or from above; tests/unit/test_layers.py reads every import of every
module, those inside functions included, and fails on an upward or sideways arrow and on any cycle between packages:

    log < datapath < model < objects < reconcile < k8s, sources < agent < cli

- log: structlog set-up, for every layer.
- datapath: the kernel side. bpf(2) on pinned objects, the map ABI (abi.py mirrors bpf/kpr.h; codec.py encodes and
  decodes its entries), BCC (only in the loader's child process), netlink through pyroute2, network namespaces. It
  knows no domain model: values are text addresses, host-order ports and protocol names ("TCP").
- model: Kubernetes semantics, pure (Service + EndpointSlices + Node -> frontends); imports nothing of kpr.
- objects: raw Kubernetes objects -> model's dataclasses (convert.py), the events a source emits and the Source
  protocol the agent drives (events.py). It depends on model only, so the two sources share it and not each other.
- reconcile: desired frontends per service -> ordered map operations through datapath's map writers.
- k8s, sources: the two sources, peers: the API reflectors, and a directory of manifests.
- agent: the daemon, wiring sources, model, reconciler and datapath together.
- cli: the commands; they read the maps through datapath directly, and run the agent.

At the edges, imported by nothing in kpr: cni (kpr-cni, one short process per pod: it uses kpr.datapath.veth and
nothing else) and lab (namespaces, control planes and agents for tests, demos and benchmarks: it may use any layer).
"""
