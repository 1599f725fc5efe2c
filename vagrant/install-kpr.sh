#!/usr/bin/env bash
# Vagrant lab, every node: install kpr from the synced checkout into /opt/kpr, as scripts/setup.sh does for a
# development checkout (Debian's BCC, kernel headers for it, a venv), and the kpr.service unit. The unit is started
# by start-kpr.sh once the node has kpr's kubeconfig. Run by Vagrant as root; safe to run again (it upgrades kpr).
set -euo pipefail

: "${NODE_NAME:?}"
REPO=${KPR_REPO:-/vagrant}
KPR_CNI_MODE=${KPR_CNI_MODE:-bridge}
export DEBIAN_FRONTEND=noninteractive

echo "== $NODE_NAME: kpr from $REPO"
# BCC from Debian: the PyPI package named "bcc" is an unrelated project.
apt-get install -y -qq --no-install-recommends python3-bpfcc libbpfcc bpftool python3-venv rsync >/dev/null

bash "$REPO/scripts/kernel-headers.sh"  # BCC compiles against /lib/modules/$(uname -r)/build
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

# A copy of the checkout, installed as a package (the BPF sources are package data, found with importlib.resources).
mkdir -p /opt/kpr/src
rsync -a --delete --exclude .git/ --exclude .venv/ --exclude .vagrant/ --exclude '*.egg-info/' \
  --exclude __pycache__/ "$REPO/" /opt/kpr/src/
if [ ! -x /opt/kpr/venv/bin/python ]; then
  python3 -m venv /opt/kpr/venv
fi
site=$(/opt/kpr/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
/opt/kpr/venv/bin/pip install -q --disable-pip-version-check /opt/kpr/src
/opt/kpr/venv/bin/python -c 'import bcc, kpr'
ln -sfn /opt/kpr/venv/bin/kpr /usr/local/bin/kpr

if [ "$KPR_CNI_MODE" = chained ]; then
  if [ -x /opt/kpr/venv/bin/kpr-cni ]; then
    ln -sfn /opt/kpr/venv/bin/kpr-cni /opt/cni/bin/kpr-cni
  else
    echo "install-kpr: WARNING: KPR_CNI_MODE=chained but this kpr has no kpr-cni; pods on $NODE_NAME will not" \
      "start until /opt/cni/bin/kpr-cni exists" >&2
  fi
fi

install -m 0644 "$REPO/vagrant/kpr.service" /etc/systemd/system/kpr.service
if [ ! -f /etc/default/kpr ]; then
  printf 'KPR_NODE_NAME=%s\nKPR_ARGS=\n' "$NODE_NAME" > /etc/default/kpr
fi
systemctl daemon-reload
# On a re-provision the running agent picks up the new code; its datapath stays in place meanwhile.
if systemctl is-active --quiet kpr.service; then
  systemctl restart kpr.service
fi
