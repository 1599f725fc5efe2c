"""CNI chaining: `kpr-cni`, the plugin that runs after the cluster's own CNI plugin (see kpr/cni/plugin.py).

With the agent started as `kpr agent --socket-lb=hostns-only`, connect() is translated only for the node's own
sockets; a pod whose conflist ends with kpr-cni gets kpr's per-packet programs on its host-side veth instead, so the
pod itself (a service mesh's iptables rules, a VM in the pod) sees the ClusterIP on the wire.
"""
