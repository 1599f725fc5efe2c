#!/usr/bin/env bash
# Prepare this machine for kpr: Debian packages, kernel headers for BCC, bpffs, and the venv.
# Idempotent and quick when everything is already there; `make demo` and `make test` run it first.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  python3-bpfcc libbpfcc bpftool   # BCC from Debian: the PyPI package named "bcc" is an unrelated project
  linux-headers-amd64              # BCC compiles against kernel headers (see the link below)
  iproute2 iptables nftables conntrack socat
  openssl                          # the real-Kubernetes lab: certificates for its control plane
  containernetworking-plugins      # the reference CNI plugins, the "existing plugin" in chaining tests
  python3-venv
  ruby shellcheck                  # tests/unit/test_deploy.py: `ruby -c Vagrantfile`, shellcheck on vagrant/*.sh
  gcc iperf3                       # make bench: compiles bench/loadgen.c; bulk TCP throughput
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: kpr loads BPF programs and builds network namespaces; run as root" >&2
    exit 1
  fi
}

system() {
  need_root
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi

  bash scripts/kernel-headers.sh  # BCC compiles against /lib/modules/$(uname -r)/build

  if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf
    echo "setup: mounted bpffs on /sys/fs/bpf"
  fi
  if ! grep -q " cgroup2 " /proc/self/mounts; then
    echo "setup: no cgroup v2 mount found; kpr's socket programs attach to a cgroup v2 directory" >&2
    exit 1
  fi
}

venv() {
  local python=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
  fi
  .venv/bin/python - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: kpr needs Python 3.11 or newer, the venv has {sys.version.split()[0]}")
PY
  # Debian's bcc module is pure Python over libbcc (ctypes); a link makes it importable in the venv.
  local site
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
  fi
  .venv/bin/python -c 'import bcc, kpr' || { echo "setup: the venv cannot import bcc" >&2; exit 1; }
}

case "${1:-all}" in
  system) system ;;
  venv) venv ;;
  all) system; venv ;;
  *) echo "usage: $0 [system|venv|all]" >&2; exit 2 ;;
esac
