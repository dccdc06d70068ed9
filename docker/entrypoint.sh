#!/bin/sh
# edgekms-entrypoint ROLE: the one place that knows each container's command line.
# Roles: setup (one-shot: secrets + SoftHSM token), init (one-shot: the bootstrap
# ceremony), crypto-hsm, crypto-tpm, ca, broker. Secrets are read from files on the
# data volume (0600); none reaches argv, a config file or the log.
set -eu

DATA=${EDGEKMS_DATA_DIR:-/var/lib/edgekms}
SECRETS=$DATA/secrets
CONF=${EDGEKMS_CONF_DIR:-/etc/edgekms}
NATS_PROVIDERS=${EDGEKMS_PROVIDERS:-hsm0 tpm0}

log() { echo "edgekms-entrypoint role=$ROLE $*" >&2; }

new_secret() {  # new_secret FILE: 32 random bytes, hex, unless FILE exists
    [ -s "$1" ] && return 0
    umask 077
    python3 -c 'import secrets; print(secrets.token_hex(32))' > "$1.tmp"
    mv "$1.tmp" "$1"
}

ROLE=${1:-}
[ $# -gt 0 ] && shift
case "$ROLE" in
setup)
    umask 077
    mkdir -p "$SECRETS" "$DATA/nats" "$DATA/softhsm" "$DATA/pki" "$DATA/tpm0" "$DATA/ca"
    new_secret "$SECRETS/hsm0.pin"
    new_secret "$SECRETS/hsm0.so-pin"
    python3 - "$DATA" "$NATS_PROVIDERS" <<'PY'
"""Bus identities exactly as `kmsctl up` makes them (mgmt.natsauth), and the token."""
import sys
from pathlib import Path

from mgmt import natsauth
from mgmt.natsserver import NatsServerConfig
from mgmt.pki import write_private
from mgmt.softhsm import init_token

data, providers = Path(sys.argv[1]), sys.argv[2].split()
secrets = data / "secrets"
identities = natsauth.stack_identities(providers, providers[0])
files = natsauth.ensure_passwords(secrets, [i.user for i in identities])
passwords = {user: natsauth.read_password(path) for user, path in files.items()}
tls = natsauth.ensure_bus_tls(data / "nats" / "tls", secrets, ("nats", "localhost", "127.0.0.1"))
config = NatsServerConfig(
    store_dir=data / "nats" / "jetstream",
    port=4222,
    host="0.0.0.0",
    tls_cert=tls.server_cert,
    tls_key=tls.server_key,
    authorization=natsauth.render_authorization(identities, passwords),
)
# Monitoring (the container's health check) answers on loopback only.
write_private(data / "nats" / "nats.conf", (config.render() + 'http: "127.0.0.1:8222"\n').encode())
token = init_token(
    data / "softhsm",
    "edgekms",
    (secrets / "hsm0.pin").read_text().strip(),
    (secrets / "hsm0.so-pin").read_text().strip(),
)
users = ",".join(sorted(passwords))
print(f"edgekms-entrypoint role=setup token={token.label} bus_users={users}", file=sys.stderr)
PY
    log "secrets, bus config and token ready"
    ;;
init)
    kmsctl init --data-dir "$DATA" --broker-config "$CONF/broker.toml" "$@"
    if [ -n "${EDGEKMS_CLIENT_EXPORT:-}" ] && [ -d "$DATA/client" ]; then
        cp -a "$DATA/client/." "$EDGEKMS_CLIENT_EXPORT/"
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
