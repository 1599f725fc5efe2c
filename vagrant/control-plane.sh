#!/usr/bin/env bash
# Vagrant lab, control plane: kubeadm init without kube-proxy, kpr's ServiceAccount and RBAC from deploy/, then
# kpr.service with that identity. Run by Vagrant as root after common.sh and install-kpr.sh; safe to run again.
set -euo pipefail

: "${NODE_NAME:?}" "${NODE_IP:?}" "${SERVICE_CIDR:?}" "${KUBEADM_TOKEN:?}"
REPO=${KPR_REPO:-/vagrant}
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f /etc/kubernetes/admin.conf ]; then
  echo "== $NODE_NAME: kubeadm init, without kube-proxy"
  # Lab only: the token never expires, so workers can be (re)provisioned at any time.
  kubeadm init \
    --skip-phases=addon/kube-proxy \
    --node-name="$NODE_NAME" \
    --apiserver-advertise-address="$NODE_IP" \
    --service-cidr="$SERVICE_CIDR" \
    --token="$KUBEADM_TOKEN" \
    --token-ttl=0
fi
install -d -o vagrant -g vagrant -m 0700 /home/vagrant/.kube
install -o vagrant -g vagrant -m 0600 /etc/kubernetes/admin.conf /home/vagrant/.kube/config

echo "== $NODE_NAME: kpr's identity"
# Not the DaemonSet: in this lab kpr runs from the checkout as a systemd unit.
kubectl apply \
  -f "$REPO/deploy/serviceaccount.yaml" \
  -f "$REPO/deploy/clusterrole.yaml" \
  -f "$REPO/deploy/clusterrolebinding.yaml" \
  -f "$REPO/vagrant/kpr-node-token.yaml"
token=""
for _ in $(seq 60); do
  token=$(kubectl -n kube-system get secret kpr-node-token -o jsonpath='{.data.token}' | base64 -d || true)
  if [ -n "$token" ]; then
    break
  fi
  sleep 1
done
if [ -z "$token" ]; then
  echo "control-plane: the token controller never filled kube-system/kpr-node-token" >&2
  exit 1
fi
printf '%s' "$token" | bash "$REPO/vagrant/start-kpr.sh" "https://$NODE_IP:6443"
