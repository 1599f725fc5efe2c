#!/usr/bin/env bash
# Vagrant lab, worker: join the cluster, fetch the kpr ServiceAccount token with the node's own credentials
# (vagrant/kpr-node-token.yaml allows that), then kpr.service. Run by Vagrant as root after common.sh and
# install-kpr.sh; waits for the control plane, so machines may come up in parallel (libvirt does).
set -euo pipefail

: "${NODE_NAME:?}" "${API_ADDRESS:?}" "${KUBEADM_TOKEN:?}"
REPO=${KPR_REPO:-/vagrant}
api="https://$API_ADDRESS:6443"

if [ ! -f /etc/kubernetes/kubelet.conf ]; then
  echo "== $NODE_NAME: waiting for the API server at $api"
  for attempt in $(seq 180); do
    if curl -ksf "$api/readyz" >/dev/null; then
      break
    fi
    if [ "$attempt" -eq 180 ]; then
      echo "worker: $api never became ready" >&2
      exit 1
    fi
    sleep 5
  done
  echo "== $NODE_NAME: kubeadm join"
  # Lab only: the host-only network is trusted instead of pinning the CA's hash, which does not exist yet when the
  # Vagrantfile is read.
  kubeadm join "$API_ADDRESS:6443" \
    --node-name="$NODE_NAME" \
    --token="$KUBEADM_TOKEN" \
    --discovery-token-unsafe-skip-ca-verification
fi

echo "== $NODE_NAME: kpr's identity"
token=""
for _ in $(seq 120); do
  token=$(kubectl --kubeconfig /etc/kubernetes/kubelet.conf -n kube-system get secret kpr-node-token \
    -o jsonpath='{.data.token}' 2>/dev/null | base64 -d || true)
  if [ -n "$token" ]; then
    break
  fi
  sleep 5
done
if [ -z "$token" ]; then
  echo "worker: cannot read kube-system/kpr-node-token with the node's credentials; did control-plane.sh run?" >&2
  exit 1
fi
printf '%s' "$token" | bash "$REPO/vagrant/start-kpr.sh" "$api"
