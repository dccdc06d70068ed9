"""The CA service's config file (TOML), as `kmsctl ca serve --config` reads it.

nats_url = "nats://127.0.0.1:4222"
http_listen = "127.0.0.1:8180"      # CRL, OCSP and CA certificates for relying parties
base_url = "http://nas.lan:8180"    # put into certificates as CRL DP / AIA; "" for none
profiles_file = "profiles.toml"     # optional custom profiles; relative to this file
nats_user = "ca"                    # optional bus identity (mgmt.natsauth), with
nats_password_file = "ca.password"  # its password file and the bus CA (relative paths:
nats_ca = "bus-ca.crt"              # relative to this file)
seal_writer = "ca"                  # optional record sealing (edgekms.sealed): the CA's
seal_key_file = "seal-ca.key"       # own Ed25519 key (0600) and every writer's public key
seal_counter_file = "seal-ca.counters"  # optional: counters seen, to catch replays
seal_public_keys = { broker = "<hex>", ca = "<hex>", ceremony = "<hex>" }
crl_lifetime = "7d"                 # optional: how long each CRL is good for (1m..30d);
                                    # minutes only where agents keep crl files fresh
audit_max_bytes = "16MiB"           # optional: the CA's audit stream (ACME), where it
audit_max_msgs = 100000             # makes it itself (the board); default 1GiB, 20000000
metrics_listen = "127.0.0.1:9465"   # optional: /metrics, /healthz, /readyz (edgekms.metrics)
fleet = true                        # optional: a hub's CA also answers fleet devices'
                                    # certificate requests (ca_service.fleet)
spiffe_bundle_listen = "0.0.0.0:8443"  # optional: our SPIFFE bundle endpoint over
                                    # https_spiffe (ca_service.spiffe_endpoint)
[acme]                              # optional: ACME over HTTPS (ca_service.acme.settings)
listen = "0.0.0.0:8555"
"""

from __future__ import annotations

import datetime
import tomllib
from pathlib import Path

from ca_service.acme.settings import parse_acme
from ca_service.crl import CRL_VALIDITY
from ca_service.service import ServeConfig
from edgekms.audit import AUDIT_FIELDS, parse_limit_fields
from edgekms.busauth import parse_bus_fields
from edgekms.durations import parse_crl_lifetime
from edgekms.errors import InvalidArgument
from edgekms.kvstore import parse_replicas
from edgekms.metrics import LISTEN_FIELD, parse_listen_field
from edgekms.sealed import WRITER_CA, parse_seal_fields


class CAConfigError(ValueError):
    """The CA config is missing, unreadable or wrong; the message names file and field."""


KNOWN_FIELDS = frozenset(
    {
        "nats_url",
        "http_listen",
        "base_url",
        "profiles_file",
        "nats_user",
        "nats_password_file",
        "nats_ca",
        "seal_writer",
        "seal_key_file",
        "seal_public_keys",
        "acme",
        "crl_lifetime",
        "seal_counter_file",
        "replicas",
        "fleet",
        "spiffe_bundle_listen",
        LISTEN_FIELD,
        *AUDIT_FIELDS,
    }
)


def _crl_lifetime(path: Path, value: object) -> datetime.timedelta:
    if value is None:
        return CRL_VALIDITY
    if not isinstance(value, str):
        raise CAConfigError(f'{path}: crl_lifetime must be a string like "7d"')
    try:
        return parse_crl_lifetime(value)
    except InvalidArgument as exc:
        raise CAConfigError(f"{path}: crl_lifetime: {exc.message}") from None


def load_serve_config(path: Path) -> ServeConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise CAConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CAConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - KNOWN_FIELDS)
    if unknown:
        raise CAConfigError(f"{path}: unknown field {unknown[0]!r}")
    nats_url = raw.get("nats_url")
    if not isinstance(nats_url, str) or not nats_url:
        raise CAConfigError(f"{path}: missing field 'nats_url'")
    host, sep, port = str(raw.get("http_listen", "127.0.0.1:8180")).rpartition(":")
    if not sep or not port.isdigit():
        raise CAConfigError(f"{path}: http_listen must be host:port")
    profiles = raw.get("profiles_file")
    base_url = raw.get("base_url", "")
    if not isinstance(base_url, str):
        raise CAConfigError(f"{path}: base_url must be a string")
    bus, problems = parse_bus_fields(raw, path.parent)
    if problems:
        raise CAConfigError(f"{path}: {problems[0]}")
    seal, problems = parse_seal_fields(raw, path.parent)
    if problems:
        raise CAConfigError(f"{path}: {problems[0]}")
    if seal is not None and seal.writer != WRITER_CA:
        raise CAConfigError(f"{path}: seal_writer must be {WRITER_CA!r} for the CA")
    acme = None
    if "acme" in raw:
        try:
            acme = parse_acme(raw["acme"])
        except ValueError as exc:
            raise CAConfigError(f"{path}: {exc}") from None
    crl_validity = _crl_lifetime(path, raw.get("crl_lifetime"))
    audit_limit, problems = parse_limit_fields(raw)
    if problems:
        raise CAConfigError(f"{path}: {problems[0]}")
    replicas, problems = parse_replicas(raw)
    if problems:
        raise CAConfigError(f"{path}: {problems[0]}")
    metrics_listen, problems = parse_listen_field(raw)
    if problems:
        raise CAConfigError(f"{path}: {problems[0]}")
    fleet = raw.get("fleet", False)
    if not isinstance(fleet, bool):
        raise CAConfigError(f"{path}: fleet must be true or false")
    bundle_listen = raw.get("spiffe_bundle_listen", "")
    b_host, b_sep, b_port = str(bundle_listen).rpartition(":")
    if bundle_listen and (
        not isinstance(bundle_listen, str)
        or not b_sep
        or not b_host
        or not b_port.isdigit()
        or not 0 < int(b_port) < 65536
    ):
        raise CAConfigError(f"{path}: spiffe_bundle_listen must be host:port")
    return ServeConfig(
        spiffe_bundle_listen=(b_host, int(b_port)) if bundle_listen else None,
        fleet=fleet,
        replicas=replicas,
        metrics_listen=metrics_listen,
        acme=acme,
        crl_validity=crl_validity,
        audit_limit=audit_limit,
        bus=bus,
        seal=seal,
        nats_url=nats_url,
        http_host=host,
        http_port=int(port),
        base_url=base_url,
        profiles_file=(path.parent / profiles) if isinstance(profiles, str) else None,
    )
