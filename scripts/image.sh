#!/usr/bin/env bash
# make image: build deploy/Containerfile with buildah, without a container registry. The Debian base comes from
# debootstrap (a minbase bookworm rootfs, cached in .cache/image/) imported as the local image $BASE; the
# Containerfile's own steps still fetch Debian packages and PyPI wheels. Run as root from anywhere.
#   IMAGE=ghcr.io/kpr-project/kpr:0.1.0  the tag to build
#   MIRROR=http://deb.debian.org/debian  where debootstrap fetches from
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-ghcr.io/kpr-project/kpr:0.1.0}
BASE=localhost/kpr-base:bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CACHE=.cache/image

if [ "$(id -u)" -ne 0 ]; then
  echo "image: debootstrap and buildah need root" >&2
  exit 1
fi
missing=()
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

base_image() {
  if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    return
  fi
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/rootfs.tar" ]; then
    local rootfs="$CACHE/rootfs"
    rm -rf "$rootfs"
    echo "image: debootstrap bookworm (minbase) into $rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # As debian:bookworm-slim: updates and security suites, no package cache, no documentation.
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/99-no-recommends"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" --numeric-owner -cf "$CACHE/rootfs.tar.partial" .
    mv "$CACHE/rootfs.tar.partial" "$CACHE/rootfs.tar"
    rm -rf "$rootfs"
  fi
  local ctr
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$CACHE/rootfs.tar" /
  buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
  echo "image: base $BASE from $CACHE/rootfs.tar"
}

base_image
# chroot isolation: RUN steps need no OCI runtime and no cgroup setup (this works on cgroup v1/hybrid hosts and
# inside containers too); the build's network is the host's, and pip trusts what the host trusts (a proxy's CA).
ca=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  ca=(--volume /etc/ssl/certs/ca-certificates.crt:/run/kpr-build-ca.crt:ro --build-arg PIP_CERT=/run/kpr-build-ca.crt)
fi
buildah build --pull=never --layers --isolation chroot "${ca[@]}" --build-arg "BASE=$BASE" -f deploy/Containerfile -t "$IMAGE" .

# The image's own check: its installed kpr compiles and pins every program with what the image has (no
# /lib/modules here, so the shipped headers unless the kernel has kheaders), into a bpffs directory of its own under
# the host's /sys/fs/bpf (as the DaemonSet mounts it), which it then removes.
pin=kpr-image-check-$$
ctr=$(buildah from --pull=never "$IMAGE")
cleanup() {
  buildah rm "$ctr" >/dev/null 2>&1 || true
  if [ -d "/sys/fs/bpf/$pin" ]; then
    find "/sys/fs/bpf/$pin" -mindepth 1 -delete
    rmdir "/sys/fs/bpf/$pin"
  fi
}
trap cleanup EXIT
# shellcheck disable=SC2016  # $1 is the inner shell's
buildah run --isolation chroot --cap-add CAP_SYS_ADMIN,CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON \
  --volume /sys/fs/bpf:/run/kpr/bpffs:rw "$ctr" -- sh -c '
    python -m kpr.datapath.loader --bpffs-dir "$1" --tc >/tmp/loader.out 2>/tmp/loader.log \
      || { cat /tmp/loader.out /tmp/loader.log >&2; exit 1; }
    echo "image: loader check: $(tail -n 1 /tmp/loader.out)"
    python -c "import sys; from pathlib import Path; from kpr.datapath.loader import unpin_all; unpin_all(Path(sys.argv[1]))" "$1"
  ' check "/run/kpr/bpffs/$pin"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
