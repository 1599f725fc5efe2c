#!/usr/bin/env bash
# Every node of the Vagrant lab: kernel settings, containerd, kubelet/kubeadm/kubectl, and the pod network (bridge +
# host-local CNI with this node's static pod CIDR, routes to the other nodes' pod CIDRs). Run by Vagrant as root
# with the environment the Vagrantfile sets; safe to run again.
set -euo pipefail

: "${NODE_NAME:?}" "${NODE_IP:?}" "${POD_CIDR:?}" "${CLUSTER_CIDR:?}" "${K8S_VERSION:?}"
PEERS=${PEERS:-}
KPR_CNI_MODE=${KPR_CNI_MODE:-bridge}
REPO=${KPR_REPO:-/vagrant}
export DEBIAN_FRONTEND=noninteractive

echo "== $NODE_NAME: kernel settings"
swapoff -a
sed -i -E '/^[^#].*\sswap\s/ s/^/#/' /etc/fstab
cat > /etc/modules-load.d/kpr-lab.conf <<'EOF'
overlay
br_netfilter
EOF
modprobe overlay
modprobe br_netfilter
cat > /etc/sysctl.d/90-kpr-lab.conf <<'EOF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
EOF
sysctl --quiet --system

echo "== $NODE_NAME: packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  ca-certificates curl gpg rsync \
  containerd containernetworking-plugins \
  iproute2 iptables conntrack socat ethtool ebtables >/dev/null

# containerd with the systemd cgroup driver, as kubelet expects on a cgroup v2 host.
if ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml 2>/dev/null; then
  mkdir -p /etc/containerd
  containerd config default > /etc/containerd/config.toml
  sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
  sed -i 's#sandbox_image = .*#sandbox_image = "registry.k8s.io/pause:3.9"#' /etc/containerd/config.toml
  systemctl restart containerd
fi

# kubelet, kubeadm, kubectl from pkgs.k8s.io.
keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
repo="https://pkgs.k8s.io/core:/stable:/v${K8S_VERSION}/deb/"
mkdir -p /etc/apt/keyrings
curl -fsSL "${repo}Release.key" | gpg --batch --yes --dearmor -o "$keyring"
echo "deb [signed-by=$keyring] $repo /" > /etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq --no-install-recommends kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null
# The private network's address, not the NAT one every Vagrant machine shares.
echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" > /etc/default/kubelet
systemctl enable --now kubelet

echo "== $NODE_NAME: pod network ($POD_CIDR, CNI mode $KPR_CNI_MODE)"
# containerd looks for CNI plugins in /opt/cni/bin; Debian installs them in /usr/lib/cni.
mkdir -p /opt/cni/bin /etc/cni/net.d
for plugin in /usr/lib/cni/*; do
  [ -e "/opt/cni/bin/${plugin##*/}" ] || ln -s "$plugin" "/opt/cni/bin/${plugin##*/}"
done
case "$KPR_CNI_MODE" in
  bridge) chained='' ;;
  # kpr-cni after bridge: it sees the pod's addresses in prevResult (install-kpr.sh links the binary).
  chained) chained=',
    {"type": "kpr-cni"}' ;;
  *) echo "common.sh: KPR_CNI_MODE must be bridge or chained, not '$KPR_CNI_MODE'" >&2; exit 1 ;;
esac
rm -f /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist
cat > /etc/cni/net.d/10-kpr-lab.conflist <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kpr-lab",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}$chained
  ]
}
EOF

# Routes to the other nodes' pod CIDRs and masquerading for traffic that leaves the cluster, at every boot.
install -m 0755 "$REPO/vagrant/pod-network.sh" /usr/local/sbin/kpr-lab-pod-network
cat > /etc/default/kpr-lab-pod-network <<EOF
CLUSTER_CIDR=$CLUSTER_CIDR
PEERS="$PEERS"
EOF
install -m 0644 "$REPO/vagrant/kpr-lab-pod-network.service" /etc/systemd/system/kpr-lab-pod-network.service
systemctl daemon-reload
systemctl enable kpr-lab-pod-network.service
systemctl restart kpr-lab-pod-network.service
