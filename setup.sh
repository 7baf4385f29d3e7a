#!/usr/bin/env bash
# One-command, idempotent setup for ipfixer on Debian 12 (run as root).
#  - Debian packages: bcc (python3-bpfcc), kernel headers, iproute2, nftables, conntrack,
#    and the real collectors/peers the tests and benchmarks talk to (nfdump, tshark, pmacct, softflowd, ...).
#  - /lib/modules/$(uname -r)/{build,source} links when the running kernel ships no headers,
#    so bcc can compile the TC classifier.
#  - a venv (.venv) made by /usr/bin/python3 with --system-site-packages so `import bcc` works,
#    and `pip install -e .[test]`.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: must run as root (installs Debian packages, links kernel headers)" >&2
  exit 1
fi

PKGS=(python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 python3-venv python3-pip
      iproute2 iputils-ping nftables conntrack nfdump tshark tcpdump softflowd iperf3
      netsniff-ng ethtool procps psmisc kmod pmacct
      docker.io docker-compose debootstrap)  # tests/deploy: a private dockerd (never the system service)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Kernel headers for bcc: the running kernel may have no /lib/modules tree; point it at Debian's headers.
KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
if [ ! -e "$MODDIR/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  if [ -z "$hdr" ]; then
    echo "setup.sh: no /usr/src/linux-headers-*-amd64 found after installing linux-headers-amd64" >&2
    exit 1
  fi
  common=${hdr%-amd64}-common
  mkdir -p "$MODDIR"
  ln -sfn "$hdr" "$MODDIR/build"
  ln -sfn "$common" "$MODDIR/source"
  echo "setup.sh: linked $MODDIR/build -> $hdr, source -> $common"
fi

# A venv that sees Debian's bcc module.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import bcc, pyroute2, construct, pydantic' \
  || { echo "setup.sh: python dependencies failed to import" >&2; exit 1; }
echo "setup.sh: ready (.venv/bin/ipfixer)"
