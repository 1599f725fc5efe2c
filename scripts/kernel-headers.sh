#!/usr/bin/env bash
# Make /lib/modules/$(uname -r)/build exist, which BCC compiles against. The running kernel's own headers package
# when the archive has it; otherwise Debian's current headers, linked: kpr's programs use only UAPI structures,
# which are stable across kernel versions. Used by scripts/setup.sh and vagrant/install-kpr.sh; run as root.
set -euo pipefail

release=$(uname -r)
build=/lib/modules/$release/build
[ -e "$build" ] && exit 0
if apt-get install -y -qq --no-install-recommends "linux-headers-$release" >/dev/null 2>&1 && [ -e "$build" ]; then
  exit 0
fi
apt-get install -y -qq --no-install-recommends linux-headers-amd64 >/dev/null
headers=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' | sort -V | tail -n 1)
if [ -z "$headers" ]; then
  echo "kernel-headers: no /usr/src/linux-headers-*-amd64 to link $build to" >&2
  exit 1
fi
mkdir -p "/lib/modules/$release"
ln -sfn "$headers" "$build"
ln -sfn "${headers%-amd64}-common" "/lib/modules/$release/source"
echo "kernel-headers: linked $build -> $headers"
