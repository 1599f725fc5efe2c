#!/usr/bin/env bash
# k8s-build.sh — build one pinned Kubernetes release (plus a matching etcd)
# from the Go module proxy into .cache/k8s/bin/ for the lab tiers.
#
# Usage:
#   scripts/k8s-build.sh                     # default set (7 binaries)
#   scripts/k8s-build.sh --with-e2e          # default set + e2e.test
#   scripts/k8s-build.sh kube-apiserver etcd # only these
#   scripts/k8s-build.sh --force ...         # rebuild even if up to date
#
# Default set: kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl
# kubelet etcd.  Optional: e2e.test (large, built with `go test -c`).
#
# Each binary has a stamp file (.cache/k8s/bin/.<name>.stamp) recording what
# it was built from; when every wanted binary exists and its stamp matches,
# the script exits without running go at all.  Changing K8S_VERSION (or
# ETCD_VERSION) rebuilds.
#
# How: k8s.io/kubernetes cannot be built as a plain dependency, because its
# go.mod requires its ~30 staging modules (k8s.io/api, k8s.io/client-go, ...)
# at v0.0.0 with replace directives into ./staging, which only apply in its
# own repo.  We generate a throwaway module in .cache/k8s/src/ that requires
# k8s.io/kubernetes and replaces each staging module with its published
# v0.<minor>.<patch> tag; the list is read from the release's go.mod.  etcd is
# built from its own module in .cache/k8s/src-etcd/ so that its dependency
# versions are etcd's and not bumped by the kubernetes graph.  etcd's
# version is, by default, the one the release pins in build/dependencies.yaml.
#
# Environment overrides (optional):
#   ETCD_VERSION=v3.x.y   build this etcd instead of the release's pinned one

set -euo pipefail

# The single place where the Kubernetes version is pinned.
# v1.37.2 is the newest stable release whose go.mod accepts Go 1.26
# (v1.38.0-beta.0 requires go >= 1.27.0).
K8S_VERSION=v1.37.2

readonly KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl kubelet)
readonly DEFAULT_BINS=("${KUBE_BINS[@]}" etcd)
readonly ALL_BINS=("${DEFAULT_BINS[@]}" e2e.test)
# Build tags used by the upstream release build (hack/lib/golang.sh).
readonly KUBE_TAGS=selinux,notest,grpcnotrace

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$ROOT/.cache/k8s
BIN=$CACHE/bin
SRC=$CACHE/src
ESRC=$CACHE/src-etcd

die() { echo "k8s-build: $*" >&2; exit 1; }
log() { echo "k8s-build: $*"; }

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
}

# ---------------------------------------------------------------- arguments
with_e2e=0
force=0
wanted=()
for arg in "$@"; do
    case $arg in
        --with-e2e) with_e2e=1 ;;
        --force|-f) force=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$arg' (see --help)" ;;
        *)
            ok=0
            for b in "${ALL_BINS[@]}"; do [[ $arg == "$b" ]] && ok=1; done
            ((ok)) || die "unknown binary '$arg'; choose from: ${ALL_BINS[*]}"
            wanted+=("$arg")
            ;;
    esac
done
if ((${#wanted[@]} == 0)); then
    wanted=("${DEFAULT_BINS[@]}")
fi
if ((with_e2e)); then
    wanted+=(e2e.test)
fi
# De-duplicate, keeping the canonical order.
mapfile -t wanted < <(for b in "${ALL_BINS[@]}"; do
    for w in "${wanted[@]}"; do [[ $w == "$b" ]] && { echo "$b"; break; }; done
done)

# What a binary's stamp must say for it to count as up to date.
stamp_key() {
    if [[ $1 == etcd ]]; then
        echo "k8s=$K8S_VERSION etcd=${ETCD_VERSION:-pinned}"
    else
        echo "k8s=$K8S_VERSION"
    fi
}

up_to_date() {
    [[ -x $BIN/$1 && -f $BIN/.$1.stamp ]] &&
        [[ $(<"$BIN/.$1.stamp") == "$(stamp_key "$1")" ]]
}

t_start=$SECONDS
todo=()
for b in "${wanted[@]}"; do
    if ((force)) || ! up_to_date "$b"; then
        todo+=("$b")
    fi
done
if ((${#todo[@]} == 0)); then
    log "up to date: ${wanted[*]} (kubernetes $K8S_VERSION) in $BIN"
    exit 0
fi

# ---------------------------------------------------------------- toolchain
command -v go >/dev/null 2>&1 || die "go not found; install Go >= 1.26"
# Never let go fetch a different toolchain behind our back, never pick up a
# go.work from above, and never embed kpr's git state into the binaries.
export GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
go_version=$(go env GOVERSION) || die "'go env GOVERSION' failed"
go_version=${go_version#go}

# version_ge A B: A >= B (dotted versions).
version_ge() { [[ $(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1) == "$2" ]]; }

# mod_download MODULE@VERSION FIELD... -> prints field values, one per line.
mod_download() {
    local spec=$1 json field out
    shift
    if ! json=$(cd / && go mod download -json "$spec" 2>&1); then
        out=$(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
        out=${out:-$json}
        out=${out//\\u003e/>}
        die "cannot download $spec: ${out//\\u003c/<}"
    fi
    for field in "$@"; do
        out=$(sed -n "s/^[[:space:]]*\"$field\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" <<<"$json")
        [[ -n $out ]] || die "go mod download -json $spec: no $field in output"
        echo "$out"
    done
}

# go_directive GOMOD -> the "go" line's version.
go_directive() { awk '$1 == "go" && NF == 2 { print $2; exit }' "$1"; }

# check_go GOMOD WHAT: fail clearly if this Go is older than GOMOD requires.
check_go() {
    local need
    need=$(go_directive "$1")
    [[ -n $need ]] || die "no go directive in $1"
    version_ge "$go_version" "$need" ||
        die "$2 requires go >= $need, but go is $go_version; install a newer Go or pin an older version in ${BASH_SOURCE[0]}"
}

mkdir -p "$BIN" "$SRC" "$ESRC"
# Serialise concurrent runs (they would share the generated modules).
exec 9>"$CACHE/.lock"
flock 9

log "go $go_version; kubernetes $K8S_VERSION; building: ${todo[*]}"

# ---------------------------------------------------------------- kubernetes
# (Command substitution, not <(...), so that a failure stops the script.)
k8s_info=$(mod_download "k8s.io/kubernetes@$K8S_VERSION" GoMod Dir Info)
mapfile -t k8s_info <<<"$k8s_info"
K8S_GOMOD=${k8s_info[0]}
K8S_DIR=${k8s_info[1]}
K8S_INFO=${k8s_info[2]}
check_go "$K8S_GOMOD" "k8s.io/kubernetes $K8S_VERSION"

k8s_semver=${K8S_VERSION#v}
k8s_major=${k8s_semver%%.*}
k8s_minor=${k8s_semver#*.}
k8s_minor=${k8s_minor%%.*}
k8s_patch=${k8s_semver#*.*.}
staging_version=v0.$k8s_minor.$k8s_patch

# Staging modules: every "X => ./staging/..." replacement in the release's
# go.mod (block or single-line form) that the release actually requires.
mapfile -t staging < <(awk '
    $1 == "replace" && $2 == "(" { inblock = 1; next }
    inblock && $1 == ")"         { inblock = 0; next }
    inblock && $2 == "=>" && $3 ~ /^\.\/staging\// { print $1; next }
    $1 == "replace" && $3 == "=>" && $4 ~ /^\.\/staging\// { print $2 }
' "$K8S_GOMOD")
((${#staging[@]} > 0)) || die "found no ./staging replacements in $K8S_GOMOD"
required=$(go mod edit -json "$K8S_GOMOD") || die "cannot parse $K8S_GOMOD"
mapfile -t required < <(sed -n 's/^[[:space:]]*"Path": "\(.*\)",\{0,1\}$/\1/p' <<<"$required" | sort -u)

generate_k8s_module() {
    local m tmp
    tmp=$(mktemp "$SRC/go.mod.XXXXXX")
    {
        echo "// Generated by scripts/k8s-build.sh; do not edit, do not commit."
        echo "module kpr.local/k8s-build"
        echo
        echo "go $(go_directive "$K8S_GOMOD")"
        echo
        # Runtime defaults the release is built with (godebug lines/blocks).
        awk '$1 == "godebug" && $2 == "(" { b = 1; print; next }
             b { print; if ($1 == ")") b = 0; next }
             $1 == "godebug" { print }' "$K8S_GOMOD"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        for m in "${staging[@]}"; do
            # Staging modules listed in replace but not required (e.g.
            # sample-controller) are not in the graph and may not be
            # published at this tag; skip them.
            if printf '%s\n' "${required[@]}" | grep -qxF "$m"; then
                echo "	$m => $m $staging_version"
            fi
        done
        echo ")"
    } >"$tmp"
    # Keep go.sum (and the go.mod that go -mod=mod grew from it) when the
    # generated part is unchanged.
    if ! cmp -s "$tmp" "$SRC/go.mod.gen"; then
        cp "$tmp" "$SRC/go.mod"
        mv "$tmp" "$SRC/go.mod.gen"
        rm -f "$SRC/go.sum"
    else
        rm -f "$tmp"
        [[ -f $SRC/go.mod ]] || cp "$SRC/go.mod.gen" "$SRC/go.mod"
    fi
}

kube_ldflags() {
    # As hack/lib/version.sh does for a release build; buildDate is the
    # release's publication time from the module proxy (reproducible).
    local build_date key val flags="-s -w"
    build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$K8S_INFO")
    build_date=${build_date%%.*}
    [[ $build_date == *Z ]] || build_date="${build_date}Z"
    for kv in "gitVersion=$K8S_VERSION" "gitMajor=$k8s_major" "gitMinor=$k8s_minor" \
              "gitTreeState=archive" "buildDate=$build_date"; do
        key=${kv%%=*}
        val=${kv#*=}
        flags+=" -X k8s.io/client-go/pkg/version.$key=$val"
        flags+=" -X k8s.io/component-base/version.$key=$val"
    done
    echo "all=$flags"
}

# ---------------------------------------------------------------- etcd
etcd_version() {
    if [[ -n ${ETCD_VERSION:-} ]]; then
        echo "v${ETCD_VERSION#v}"
        return
    fi
    local v
    v=$(awk '/^[[:space:]]*- name: "?etcd"?[[:space:]]*$/ { f = 1; next }
             f && $1 == "version:" { gsub(/"/, "", $2); print $2; exit }
             f && /- name:/ { exit }' "$K8S_DIR/build/dependencies.yaml" 2>/dev/null || true)
    [[ -n $v ]] || v=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$K8S_GOMOD")
    [[ -n $v ]] || die "cannot tell which etcd kubernetes $K8S_VERSION uses; set ETCD_VERSION"
    echo "v${v#v}"
}

generate_etcd_module() {
    local ev=$1 gomod
    gomod=$(mod_download "go.etcd.io/etcd/server/v3@$ev" GoMod)
    check_go "$gomod" "go.etcd.io/etcd/server/v3 $ev"
    cat >"$ESRC/go.mod.new" <<EOF
// Generated by scripts/k8s-build.sh; do not edit, do not commit.
module kpr.local/etcd-build

go $(go_directive "$gomod")

require go.etcd.io/etcd/server/v3 $ev
EOF
    if ! cmp -s "$ESRC/go.mod.new" "$ESRC/go.mod.gen"; then
        cp "$ESRC/go.mod.new" "$ESRC/go.mod"
        mv "$ESRC/go.mod.new" "$ESRC/go.mod.gen"
        rm -f "$ESRC/go.sum"
    else
        rm -f "$ESRC/go.mod.new"
        [[ -f $ESRC/go.mod ]] || cp "$ESRC/go.mod.gen" "$ESRC/go.mod"
    fi
}

# ---------------------------------------------------------------- build
need_kube=0
for b in "${todo[@]}"; do [[ $b == etcd ]] || need_kube=1; done
if ((need_kube)); then
    generate_k8s_module
    KUBE_LDFLAGS=$(kube_ldflags)
fi

for b in "${todo[@]}"; do
    t0=$SECONDS
    out=$BIN/.$b.tmp
    rm -f "$out" "$BIN/.$b.stamp"
    case $b in
        etcd)
            ev=$(etcd_version)
            generate_etcd_module "$ev"
            (cd "$ESRC" && go build -trimpath -ldflags=-s\ -w -o "$out" go.etcd.io/etcd/server/v3) ||
                die "building etcd $ev failed"
            what="etcd $ev"
            ;;
        e2e.test)
            (cd "$SRC" && go test -c -trimpath -tags="$KUBE_TAGS" -ldflags="$KUBE_LDFLAGS" \
                -o "$out" k8s.io/kubernetes/test/e2e) ||
                die "building e2e.test failed"
            what="e2e.test $K8S_VERSION"
            ;;
        *)
            (cd "$SRC" && go build -trimpath -tags="$KUBE_TAGS" -ldflags="$KUBE_LDFLAGS" \
                -o "$out" "k8s.io/kubernetes/cmd/$b") ||
                die "building $b failed"
            what="$b $K8S_VERSION"
            ;;
    esac
    mv -f "$out" "$BIN/$b"
    stamp_key "$b" >"$BIN/.$b.stamp"
    log "built $what in $((SECONDS - t0)) s"
done

log "done: ${#todo[@]} binaries in $((SECONDS - t_start)) s -> $BIN"
