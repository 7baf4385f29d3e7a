#!/usr/bin/env bash
# Build a Debian 12 (bookworm) base image without any image registry: debootstrap from this machine's
# own apt sources, then `docker import`. For machines that cannot pull debian:12-slim.
#
#   deploy/base-image.sh [TAG]            (default tag: ipfixer-base:bookworm; run as root)
#
# The root filesystem tarball is cached per day under ${IPFIXER_BASE_CACHE:-/var/cache/ipfixer/base}
# (bookworm-YYYYMMDD.tar), so a second build on the same machine and day only re-imports it. It already
# holds the Debian packages the ipfixer and nfcapd images install, so their builds do not download them.
# The docker CLI used is ${DOCKER:-docker} (DOCKER_HOST selects the engine).
set -euo pipefail
TAG=${1:-ipfixer-base:bookworm}
DOCKER=${DOCKER:-docker}
CACHE=${IPFIXER_BASE_CACHE:-/var/cache/ipfixer/base}
SUITE=bookworm
PKGS=python3,python3-venv,python3-pip,python3-bpfcc,libbpfcc,iproute2,conntrack,nftables,ca-certificates,nfdump,procps

# The first bookworm mirror in this machine's apt sources (deb822 *.sources or one-line *.list).
mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" '$1=="deb" && $0 ~ (" " s " ") {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$SUITE" 'BEGIN{RS=""} $0 ~ ("Suites:[^\n]*(^| )" s "( |\n|$)") && match($0, /URIs: *[^ \n]+/) {
      u = substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); if (u ~ /\/debian\/?$/) {print u; exit}}' "$f"
  done
}
MIRROR=$(mirror | head -n1)
[ -n "$MIRROR" ] || { echo "base-image.sh: no $SUITE mirror found in /etc/apt/sources.list*" >&2; exit 1; }

mkdir -p "$CACHE"
TAR="$CACHE/$SUITE-$(date -u +%Y%m%d).tar"
if [ ! -s "$TAR" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/ipfixer-base.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "base-image.sh: debootstrap $SUITE from $MIRROR" >&2
  debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$work/root" "$MIRROR" >"$work/log" 2>&1 \
    || { tail -n 30 "$work/log" >&2; exit 1; }
  # The same sources as the host's mirror, for apt-get inside image builds.
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" > "$work/root/etc/apt/sources.list"
  rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/archives/"*.deb
  tar -C "$work/root" --numeric-owner -cf "$TAR.part" .
  mv "$TAR.part" "$TAR"
  find "$CACHE" -name "$SUITE-*.tar" ! -name "$(basename "$TAR")" -delete  # keep only today's
fi
"$DOCKER" import --change 'CMD ["/bin/bash"]' "$TAR" "$TAG" >/dev/null
echo "$TAG"
