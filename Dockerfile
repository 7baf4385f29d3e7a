# ipfixer appliance image: Debian 12 with bcc from Debian; kernel headers come from the host (mounted).
# Installs the wheel built from this tree (`pip install .`, not editable), so the image runs exactly what
# a pip user gets. Build options (both optional; see README, "Docker compose"):
#   --build-arg BASE_IMAGE=...   a Debian 12 image other than debian:12-slim (e.g. one made by
#                                deploy/base-image.sh where no image registry is reachable)
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt
#                                a CA bundle pip trusts (behind a TLS-intercepting proxy); BuildKit only
#                                (DOCKER_BUILDKIT=1 with docker 20.10), never stored in the image.
ARG BASE_IMAGE=debian:12-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-pip python3-bpfcc libbpfcc iproute2 conntrack nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ipfixer/src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY ipfixer ./ipfixer
COPY bpf ./bpf
COPY templates ./templates
COPY config ./config
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv --system-site-packages /opt/ipfixer/.venv \
    && /opt/ipfixer/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -q . \
    && ln -s /opt/ipfixer/.venv/bin/ipfixer /usr/local/bin/ipfixer \
    && mkdir -p /etc/ipfixer && cp config/ipfixer.yaml /etc/ipfixer/ipfixer.yaml \
    && cd / && rm -rf /opt/ipfixer/src
WORKDIR /
ENTRYPOINT ["ipfixer"]
CMD ["run", "--config", "/etc/ipfixer/ipfixer.yaml"]
