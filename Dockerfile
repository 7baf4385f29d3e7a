# ipfixer appliance image: Debian 12 with bcc from Debian, kernel headers come from the host (mounted).
FROM debian:12-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends \
      python3 python3-venv python3-pip python3-bpfcc libbpfcc iproute2 conntrack nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ipfixer
COPY pyproject.toml README.md ./
COPY ipfixer ./ipfixer
COPY bpf ./bpf
COPY templates ./templates
COPY config ./config
RUN python3 -m venv --system-site-packages /opt/ipfixer/.venv \
    && /opt/ipfixer/.venv/bin/pip install --no-cache-dir -e . \
    && ln -s /opt/ipfixer/.venv/bin/ipfixer /usr/local/bin/ipfixer
ENTRYPOINT ["ipfixer"]
CMD ["run", "--config", "/opt/ipfixer/config/ipfixer.yaml"]
