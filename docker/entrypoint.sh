#!/bin/sh
# edgekms-entrypoint ROLE: the one place that knows each container's command line.
# Roles: setup (one-shot: bus identities, secrets, SoftHSM token), nats, init (one-shot:
# the bootstrap ceremony), crypto-hsm, crypto-tpm, ca, broker.
#
# Readiness: each role waits for what it needs (edgekms-wait: a file a one-shot writes, a
# port another service opens) before it starts, so the stack comes up under any engine
# without a healthcheck scheduler (podman has none without systemd). compose's
# depends_on only orders the starts; a role that waited in vain exits non-zero and
# restart: on-failure tries again.
#
# Every service has its own volume under $DATA (docs/deploy.md, "Secrets per service"):
#   setup/   the master copy of every secret and the bus CA key   (setup only)
#   public/  bus CA and nats-server certificates                  (read-only for all)
#   nats/    nats.conf (bcrypt hashes), server key, JetStream      (nats)
#   hsm0/    SoftHSM token, PIN, crypto-hsm0's bus password        (crypto-hsm)
#   tpm0/    TPM key blobs, hierarchy auth, crypto-tpm0's bus password (crypto-tpm)
#   swtpm/   swtpm's two 0600 Unix sockets                         (swtpm, crypto-tpm)
#   ca/      the CA service's bus password                         (ca, read-only)
#   broker/  broker's bus password, TLS key and certificates       (broker, read-only)
#   init/    kmsctl's bus password, ceremony output, admin bundle  (init)
# Secrets are files (0600); none reaches argv, a config file or the log.
set -eu

DATA=${EDGEKMS_DATA_DIR:-/var/lib/edgekms}
CONF=${EDGEKMS_CONF_DIR:-/etc/edgekms}
SETUP=${EDGEKMS_SETUP:-/usr/local/bin/edgekms-setup}
NATS_URL=${EDGEKMS_NATS_URL:-tls://nats:4222}
NATS_HOSTPORT=${NATS_URL#*://}
WAIT=${EDGEKMS_WAIT:-/usr/local/bin/edgekms-wait}
# Where kmsctl on the host reaches the broker (the published port), for the client config.
BROKER_ADDRESS=${EDGEKMS_BROKER_ADDRESS:-127.0.0.1:8443}
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
nats)
    python3 "$WAIT" "file:$DATA/nats/nats.conf"
    exec nats-server -c "$DATA/nats/nats.conf" "$@"
    ;;
init)
    python3 "$WAIT" "tcp:$NATS_HOSTPORT"
    # The ceremony signs through crypto-hsm, whose readiness cannot be asked from here
    # (its bus identity only replies): the idempotent ceremony is retried until it
    # succeeds or the deadline passes. --new-admin: a try that made the internal CA's key
    # but failed before the admin certificate is finished by the next (a completed
    # ceremony changes nothing).
    deadline=$(($(date +%s) + ${EDGEKMS_INIT_TIMEOUT:-180}))
    until kmsctl init --data-dir "$DATA/init" --nats-url "$NATS_URL" --provider hsm0 \
        --broker-address "$BROKER_ADDRESS" --new-admin \
        --broker-name broker --broker-name localhost --broker-name 127.0.0.1 \
        --nats-user kmsctl --nats-password-file "$DATA/init/nats.password" \
        --nats-ca "$DATA/public/bus-ca.crt" "$@"; do
        [ "$(date +%s)" -ge "$deadline" ] && { log "ceremony failed"; exit 1; }
        sleep 2
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
    python3 "$WAIT" "tcp:$NATS_HOSTPORT"
    exec kms-crypto --config "$CONF/crypto-hsm0.toml" "$@"
    ;;
crypto-tpm)
    # swtpm's 0600 sockets (edgekms-swtpm volume); their existence, not a probe
    # connection, which would take swtpm's one client slot.
    SWTPM_SOCK=${EDGEKMS_SWTPM_SOCK:-$DATA/swtpm/swtpm.sock}
    python3 "$WAIT" "tcp:$NATS_HOSTPORT" "sock:$SWTPM_SOCK" "sock:$SWTPM_SOCK.ctrl"
    # As firmware would, then as `kmsctl up --tpm swtpm` does: the platform hierarchy
    # disabled, and random owner/endorsement/lockout auth in this volume (idempotent:
    # a rerun keeps them; refused, exit 6, if someone else owns this TPM).
    python3 /usr/local/bin/edgekms-lock-platform "swtpm:path=$SWTPM_SOCK"
    kmsctl tpm provision --tpm "swtpm:path=$SWTPM_SOCK" --data-dir "$DATA/tpm0" -o json
    exec kms-crypto --config "$CONF/crypto-tpm0.toml" "$@"
    ;;
ca)
    python3 "$WAIT" "tcp:$NATS_HOSTPORT"
    exec kmsctl ca serve --config "$CONF/ca.toml" "$@"
    ;;
broker)
    python3 "$WAIT" "file:$DATA/broker/pki/internal-ca.crt" "tcp:$NATS_HOSTPORT"
    exec kms-broker --config "$CONF/broker.toml" "$@"
    ;;
*)
    echo "usage: edgekms-entrypoint setup|nats|init|crypto-hsm|crypto-tpm|ca|broker [ARGS...]" >&2
    exit 64
    ;;
esac
