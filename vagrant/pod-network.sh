#!/usr/bin/env bash
# Vagrant lab, every boot (kpr-lab-pod-network.service): routes to the other nodes' pod CIDRs over the private
# network, and masquerading for pod traffic that leaves the cluster CIDR. Installed as
# /usr/local/sbin/kpr-lab-pod-network by common.sh, which also writes /etc/default/kpr-lab-pod-network.
set -euo pipefail

: "${CLUSTER_CIDR:?}"
read -r -a peers <<< "${PEERS:-}"

for peer in "${peers[@]}"; do
  via=${peer%%=*}
  cidr=${peer#*=}
  # The private interface may still be coming up: its address is the route's next hop.
  for attempt in $(seq 30); do
    if ip route replace "$cidr" via "$via"; then
      break
    fi
    if [ "$attempt" -eq 30 ]; then
      echo "kpr-lab-pod-network: no route to $cidr via $via" >&2
      exit 1
    fi
    sleep 2
  done
done

rule=(-s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" -m comment --comment "kpr-lab: pods to outside the cluster" -j MASQUERADE)
iptables -t nat -C POSTROUTING "${rule[@]}" 2>/dev/null || iptables -t nat -A POSTROUTING "${rule[@]}"
