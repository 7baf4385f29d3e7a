#!/usr/bin/env bash
# Build the two images docker-compose.yml runs (ipfixer:local, ipfixer-nfcapd:local) with BuildKit.
#   deploy/build-images.sh
# Options (environment):
#   BASE_IMAGE=ipfixer-base:bookworm   base image (default debian:12-slim); deploy/base-image.sh makes one
#                                      where no registry is reachable
#   IPFIXER_PIP_CA=/etc/ssl/certs/ca-certificates.crt
#                                      CA bundle pip trusts during the build (a BuildKit secret: behind a
#                                      TLS-intercepting proxy), never stored in the image
#   DOCKER=docker                      the docker CLI (DOCKER_HOST selects the engine)
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
args=(--network host)
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
secret=()
if [ -n "${IPFIXER_PIP_CA:-}" ]; then
  [ -r "$IPFIXER_PIP_CA" ] || { echo "build-images.sh: IPFIXER_PIP_CA=$IPFIXER_PIP_CA is not readable" >&2; exit 2; }
  secret=(--secret "id=pip_ca,src=$IPFIXER_PIP_CA")
fi
export DOCKER_BUILDKIT=1
"$DOCKER" build "${args[@]}" -f deploy/nfcapd.Dockerfile -t ipfixer-nfcapd:local .
"$DOCKER" build "${args[@]}" "${secret[@]}" -t ipfixer:local .
