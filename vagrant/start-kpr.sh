#!/usr/bin/env bash
# Vagrant lab: write kpr's kubeconfig (the API server given as $1, the kpr ServiceAccount token on stdin), check
# that it grants what kpr needs, then start kpr.service and wait until /healthz answers.
# Usage: start-kpr.sh https://192.168.56.10:6443 < token
set -euo pipefail

server=${1:?usage: start-kpr.sh https://API_SERVER:6443 < token}
token=$(cat)
if [ -z "$token" ]; then
  echo "start-kpr: no token on stdin" >&2
  exit 1
fi

# The API server's own address, never the `kubernetes` ClusterIP: kpr is what makes ClusterIPs work.
install -d -m 0700 /etc/kpr
umask 077
cat > /etc/kpr/kubeconfig.new <<CONFIG
apiVersion: v1
kind: Config
clusters:
  - name: kpr-lab
    cluster:
      server: $server
      certificate-authority: /etc/kubernetes/pki/ca.crt
users:
  - name: kpr
    user:
      token: $token
contexts:
  - name: kpr
    context:
      cluster: kpr-lab
      user: kpr
current-context: kpr
CONFIG
mv /etc/kpr/kubeconfig.new /etc/kpr/kubeconfig

for check in "list services" "watch services" "list endpointslices.discovery.k8s.io" \
  "watch endpointslices.discovery.k8s.io" "list nodes" "watch nodes" "create events"; do
  read -r verb resource <<< "$check"
  if ! kubectl --kubeconfig /etc/kpr/kubeconfig auth can-i "$verb" "$resource" --all-namespaces >/dev/null; then
    echo "start-kpr: the kpr ServiceAccount may not $verb $resource; is deploy/clusterrole.yaml applied?" >&2
    exit 1
  fi
done

systemctl enable --quiet kpr.service
systemctl restart kpr.service
for _ in $(seq 120); do
  if curl -fsS http://127.0.0.1:10256/healthz >/dev/null 2>&1; then
    echo "start-kpr: kpr is healthy on $(hostname)"
    exit 0
  fi
  sleep 1
done
echo "start-kpr: kpr did not become healthy within 120 s" >&2
journalctl -u kpr.service -n 50 --no-pager >&2
exit 1
