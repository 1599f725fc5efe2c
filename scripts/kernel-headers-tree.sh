#!/usr/bin/env bash
# A self-contained kernel headers tree for BCC, for nodes that have neither headers nor CONFIG_IKHEADERS: the last
# fallback of kpr.datapath.toolchain (KPR_KERNEL_HEADERS). kpr's programs use only UAPI structures, stable across
# kernels, so Debian's current headers serve any recent kernel. BCC compiles inside one directory (-Iinclude,
# -Iarch/<arch>/include, their generated/ and uapi/ parts, -include include/linux/kconfig.h), while Debian splits a
# kernel's headers into a -common package (every architecture's sources) and a flavour package (the generated files);
# this merges the two, keeping only this architecture: about 40 MB.
#
#   kernel-headers-tree.sh debian OUT                 download Debian's current headers (not installed: the flavour
#                                                     package depends on gcc) and merge them into OUT
#   kernel-headers-tree.sh merge FLAVOUR COMMON OUT   merge two unpacked trees, e.g. /usr/src/linux-headers-X-amd64
#                                                     and /usr/src/linux-headers-X-common
# Used by deploy/Containerfile (debian) and tests/package/test_wheel.py (merge).
set -euo pipefail

merge() {
  local flavour=$1 common=$2 out=$3 arch
  arch=$(find "$flavour/arch" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n 1)
  if [ -z "$arch" ] || [ ! -d "$common/arch/$arch/include" ] || [ ! -f "$common/include/linux/kconfig.h" ]; then
    echo "kernel-headers-tree: $flavour and $common are not a flavour and a -common headers tree" >&2
    exit 1
  fi
  rm -rf "$out"
  mkdir -p "$out/arch/$arch"
  cp -a "$common/include" "$out/include"
  cp -a "$common/arch/$arch/include" "$out/arch/$arch/include"
  mkdir -p "$out/include/generated" "$out/arch/$arch/include/generated"
  cp -a "$flavour/include/generated/." "$out/include/generated/"
  cp -a "$flavour/arch/$arch/include/generated/." "$out/arch/$arch/include/generated/"
  echo "kernel-headers-tree: $out ($arch, from $(basename "$flavour"))"
}

debian() {
  local out=$1 work meta flavour_pkg common_pkg
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  # The metapackage (linux-headers-amd64, -arm64, ...) names the current version's flavour package, which names
  # its -common package.
  meta=linux-headers-$(dpkg --print-architecture)
  flavour_pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-headers-/ {print $2; exit}')
  common_pkg=$(apt-cache depends "$flavour_pkg" | awk '/Depends: linux-headers-.*-common/ {print $2; exit}')
  if [ -z "$flavour_pkg" ] || [ -z "$common_pkg" ]; then
    echo "kernel-headers-tree: cannot tell the headers packages behind $meta (apt-get update first?)" >&2
    exit 1
  fi
  (cd "$work" && apt-get download -qq "$flavour_pkg" "$common_pkg")
  for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
  done
  merge "$work/root/usr/src/$flavour_pkg" "$work/root/usr/src/$common_pkg" "$out"
}

case "${1:-}" in
  debian) [ $# -eq 2 ] || { echo "usage: $0 debian OUT" >&2; exit 2; }; debian "$2" ;;
  merge) [ $# -eq 4 ] || { echo "usage: $0 merge FLAVOUR COMMON OUT" >&2; exit 2; }; merge "$2" "$3" "$4" ;;
  *) echo "usage: $0 debian OUT | merge FLAVOUR COMMON OUT" >&2; exit 2 ;;
esac
