#!/bin/sh
# edgekms-entrypoint ROLE: the one place that knows each container's command line.
# Roles: setup (one-shot: bus identities, secrets, SoftHSM token), init (one-shot: the
# bootstrap ceremony), crypto-hsm, crypto-tpm, ca, broker.
#
# Every service has its own volume under $DATA (docs/deploy.md, "Secrets per service"):
#   setup/   the master copy of every secret and the bus CA key   (setup only)
#   public/  bus CA and nats-server certificates                  (read-only for all)
#   nats/    nats.conf (bcrypt hashes), server key, JetStream      (nats)
#   hsm0/    SoftHSM token, PIN, crypto-hsm0's bus password        (crypto-hsm)
#   tpm0/    TPM key blobs, crypto-tpm0's bus password             (crypto-tpm)
#   ca/      the CA service's bus password                         (ca, read-only)
#   broker/  broker's bus password, TLS key and certificates       (broker, read-only)
#   init/    kmsctl's bus password, ceremony output, admin bundle  (init)
# Secrets are files (0600); none reaches argv, a config file or the log.
set -eu

DATA=${EDGEKMS_DATA_DIR:-/var/lib/edgekms}
CONF=${EDGEKMS_CONF_DIR:-/etc/edgekms}
SETUP=${EDGEKMS_SETUP:-/usr/local/bin/edgekms-setup}
NATS_URL=${EDGEKMS_NATS_URL:-tls://nats:4222}
# The one provider the CA service may sign with; `kmsctl ca init --provider` must name it.
CA_PROVIDER=${EDGEKMS_CA_PROVIDER:-hsm0}

log() { echo "edgekms-entrypoint role=$ROLE $*" >&2; }

ROLE=${1:-}
[ $# -gt 0 ] && shift
case "$ROLE" in
setup)
    umask 077
    mkdir -p "$DATA/setup" "$DATA/public" "$DATA/nats" "$DATA/hsm0" "$DATA/tpm0/keys" \
        "$DATA/ca" "$DATA/broker" "$DATA/init"
    python3 "$SETUP" --secrets "$DATA/setup" --public "$DATA/public" \
        --nats-conf "$DATA/nats/nats.conf" --nats-store "$DATA/nats/jetstream" \
        --nats-key "$DATA/nats/nats-server.key" --nats-host 0.0.0.0 \
        --tls-name nats --tls-name localhost --tls-name 127.0.0.1 \
        --providers hsm0,tpm0 --ca-provider "$CA_PROVIDER" --softhsm "$DATA/hsm0/softhsm" \
        --install "nats-server.key=$DATA/nats/nats-server.key" \
        --install "hsm0.pin=$DATA/hsm0/pin" \
        --install "nats/crypto-hsm0.password=$DATA/hsm0/nats.password" \
        --install "nats/crypto-tpm0.password=$DATA/tpm0/nats.password" \
        --install "nats/ca.password=$DATA/ca/nats.password" \
        --install "nats/broker.password=$DATA/broker/nats.password" \
        --install "nats/kmsctl.password=$DATA/init/nats.password" \
        "$@"
    log "secrets, bus config and token ready"
    ;;
init)
    # crypto-hsm is healthy once it holds its bus connection; its service may need a
    # moment more to answer, so the (idempotent) ceremony gets a few bounded tries.
    # --new-admin: a try that made the internal CA's key but failed before the admin
    # certificate is finished by the next (a completed ceremony changes nothing).
    tries=0
    until kmsctl init --data-dir "$DATA/init" --nats-url "$NATS_URL" --provider hsm0 \
        --broker-address 127.0.0.1:8443 --new-admin \
        --broker-name broker --broker-name localhost --broker-name 127.0.0.1 \
        --nats-user kmsctl --nats-password-file "$DATA/init/nats.password" \
        --nats-ca "$DATA/public/bus-ca.crt" "$@"; do
        tries=$((tries + 1))
        [ "$tries" -ge 5 ] && { log "ceremony failed"; exit 1; }
        sleep 3
    done
    # The broker gets its own key and certificates, nothing of the admin bundle.
    umask 077
    mkdir -p "$DATA/broker/pki"
    for f in broker.crt broker.key internal-ca.crt; do
        cp "$DATA/init/pki/$f" "$DATA/broker/pki/$f"
    done
    if [ -n "${EDGEKMS_CLIENT_EXPORT:-}" ] && [ -d "$DATA/init/client" ]; then
        cp -a "$DATA/init/client/." "$EDGEKMS_CLIENT_EXPORT/"
        log "client config exported to $EDGEKMS_CLIENT_EXPORT"
    fi
    ;;
crypto-hsm)
    exec kms-crypto --config "$CONF/crypto-hsm0.toml" "$@"
    ;;
crypto-tpm)
    exec kms-crypto --config "$CONF/crypto-tpm0.toml" "$@"
    ;;
ca)
    exec kmsctl ca serve --config "$CONF/ca.toml" "$@"
    ;;
broker)
    exec kms-broker --config "$CONF/broker.toml" "$@"
    ;;
*)
    echo "usage: edgekms-entrypoint setup|init|crypto-hsm|crypto-tpm|ca|broker [ARGS...]" >&2
    exit 64
    ;;
esac
