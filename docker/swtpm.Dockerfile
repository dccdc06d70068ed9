# A software TPM 2.0 for the crypto-tpm container: swtpm on two Unix sockets (commands
# swtpm.sock, control swtpm.sock.ctrl, mode 0600) in the edgekms-swtpm volume, which only
# crypto-tpm mounts besides it. Not TCP: swtpm takes commands and control requests (power
# off, reset) from anyone who reaches it, without authentication (mgmt/swtpm.py).
# It runs as the edgekms image's uid (10001), the one a 0600 socket lets crypto-tpm in.
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends swtpm \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 10001 edgekms \
 && useradd --system --uid 10001 --gid edgekms --home-dir /var/lib/swtpm --shell /usr/sbin/nologin edgekms \
 && install -d -o edgekms -g edgekms -m 0700 /var/lib/swtpm /var/lib/edgekms/swtpm
USER edgekms
VOLUME /var/lib/swtpm
# A socket left by a swtpm that was killed would make the new one fail to bind.
ENTRYPOINT ["sh", "-c", "rm -f /var/lib/edgekms/swtpm/swtpm.sock /var/lib/edgekms/swtpm/swtpm.sock.ctrl && exec swtpm socket --tpm2 --tpmstate dir=/var/lib/swtpm --server type=unixio,path=/var/lib/edgekms/swtpm/swtpm.sock,mode=0600 --ctrl type=unixio,path=/var/lib/edgekms/swtpm/swtpm.sock.ctrl,mode=0600 --flags not-need-init,startup-clear"]
