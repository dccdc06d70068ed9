# A software TPM 2.0 for the crypto-tpm container: swtpm on TCP (commands 2321, control 2322).
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends swtpm swtpm-tools \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10002 --home-dir /var/lib/swtpm --shell /usr/sbin/nologin swtpm-user \
 && install -d -o swtpm-user -m 0700 /var/lib/swtpm
USER swtpm-user
VOLUME /var/lib/swtpm
EXPOSE 2321 2322
ENTRYPOINT ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=/var/lib/swtpm", \
            "--server", "type=tcp,port=2321,bindaddr=0.0.0.0", \
            "--ctrl", "type=tcp,port=2322,bindaddr=0.0.0.0", \
            "--flags", "not-need-init,startup-clear"]
