# A real nfcapd (nfdump 1.7 from Debian 12) for docker-compose.yml: stores what ipfixer exports in /flows.
ARG BASE_IMAGE=debian:12-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -q && apt-get install -y -q --no-install-recommends nfdump \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /flows
VOLUME /flows
# -b/-p come from the compose file; -t 60: one file per minute (read them with nfdump -R /flows)
ENTRYPOINT ["nfcapd", "-w", "/flows"]
CMD ["-b", "127.0.0.1", "-p", "4739", "-t", "60"]
