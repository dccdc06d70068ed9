"""The broker's configuration file (TOML), read once at start.

listen = "127.0.0.1:8443"
nats_url = "nats://127.0.0.1:4222"
default_provider = "hsm0"
providers = ["hsm0"]          # crypto services `status` expects to answer
ca = true                     # `status` expects the CA service to answer too
sign_timeout = 5.0            # seconds; generation gets generate_timeout
generate_timeout = 120.0
handshake_timeout = 10.0      # TLS handshake; then idle_timeout (300) without a call,
keepalive_interval = 60.0     # and keepalive pings answered within keepalive_timeout (20)
[tls]
cert = "pki/broker.crt"       # relative paths are relative to this file
key = "pki/broker.key"
client_ca = "pki/internal-ca.crt"

Optional bus identity (mgmt.natsauth; `kmsctl up` writes these):
nats_user = "broker"
nats_password_file = "secrets/nats/broker.password"
nats_ca = "nats/tls/bus-ca.crt"

Record sealing (edgekms.sealed; `kmsctl up` writes these): the broker's own key, and
every writer's public key to verify what it reads. Without them records are not sealed.
seal_writer = "broker"
seal_key_file = "secrets/seal/broker.key"
seal_counter_file = "secrets/seal/broker.counters"   # counters seen (replays), optional
seal_public_keys = { broker = "<hex>", ca = "<hex>", ceremony = "<hex>" }

Its audit stream's limits, where the broker creates that stream itself (no `kmsctl up`,
as on the board): sized to the JetStream store, which refuses what it cannot reserve.
audit_max_bytes = "96MiB"     # B, KiB, MiB or GiB; default 2GiB
audit_max_msgs = 1000000      # optional; default 20000000

On a cluster (docs/cluster.md), where each provider is one node's token: the node of
each provider, named in the UNAVAILABLE a key's operations answer while that node is down.
provider_nodes = { hsm-a = "nas1", hsm-b = "nas2" }

Retention (edgekms.retention; broker/archiver.py): with an archive dir, this broker
archives every writer's stream beyond its window, signs a checkpoint and purges what it
archived. One broker per deployment archives; `kmsctl up` sets the dir.
audit_archive_dir = "audit-archive"
audit_window = 0.5            # share of each stream's limits kept in it (0 < w <= 0.8)
audit_max_age = 604800        # seconds a message stays at most (0: no age bound)
audit_archive_interval = 30.0 # seconds between rounds
Metrics (edgekms.metrics): /metrics, /healthz and /readyz on this address; absent or ""
for none. The audit metrics come from a check of every audit chain this often (0: none).
metrics_listen = "127.0.0.1:9464"
audit_check_interval = 15.0
A fleet device's broker (docs/cluster.md, "Fleet"): IssueCertificate, GetCACertificates
and GetCRL go to the hub's CA across the leaf connection, as this device; no local CA.
hub_ca_device = "a1"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekms.audit import AUDIT_FIELDS, StreamLimit, parse_limit_fields
from edgekms.busauth import BusCredentials, parse_bus_fields
from edgekms.errors import InvalidArgument
from edgekms.fleet import DEVICE_ID_RE
from edgekms.kvstore import parse_replicas
from edgekms.metrics import LISTEN_FIELD, parse_listen_field
from edgekms.retention import (
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_AGE_S,
    DEFAULT_WINDOW_FRACTION,
    RetentionPolicy,
    parse_window_fraction,
)
from edgekms.sealed import RecordSeal, parse_seal_fields
from edgekms.subjects import PROVIDER_ID_RE


class ConfigError(ValueError):
    """The config file is missing, unreadable or wrong; the message names the field."""


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class BrokerConfig:
    listen: str
    nats_url: str
    default_provider: str
    providers: tuple[str, ...]
    tls: TLSConfig
    sign_timeout: float = 5.0
    generate_timeout: float = 120.0
    # A CA service runs beside this broker: `status` reports whether it answers.
    ca: bool = False
    bus: BusCredentials = field(default_factory=BusCredentials)
    # Record sealing (edgekms.sealed): the broker's own key and every writer's public
    # key; None (no seal_* fields) only on a development bus: `kmsctl up` always seals.
    seal: RecordSeal | None = None
    # Connections: a TLS handshake must finish within handshake_timeout; a connection
    # with no call for idle_timeout is closed (GOAWAY); an open one is pinged every
    # keepalive_interval and dropped when a ping goes unanswered for keepalive_timeout,
    # so half-open connections (a peer gone without FIN) are not held for ever.
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    keepalive_interval: float = 60.0
    keepalive_timeout: float = 20.0
    # The enrollment listener (server-only TLS: EnrollmentService and health only);
    # "" for none. docs/security.md, "Enrollment".
    enroll_listen: str = ""
    # PEM bundle of TPM manufacturer CAs an EK certificate must chain to, for
    # TPM-attested enrollment; None: only tokens with a registered EK attest.
    ek_ca_file: Path | None = None
    # How long a TPM attestation or unlock challenge stays answerable (broker.attest):
    # long enough for a slow TPM's ActivateCredential/Quote and the round trip back.
    attest_challenge_ttl: float = 60.0
    # Its audit stream's limits where the broker creates it (no `kmsctl up`: the board);
    # None: edgekms.audit's defaults (2 GiB). docs/security.md, "Sizing for a board".
    audit_limit: StreamLimit | None = None
    # provider -> the cluster node whose token it is (docs/cluster.md); empty on one box.
    provider_nodes: dict[str, str] = field(default_factory=dict)
    # Copies of a bucket or its audit stream the broker creates (a cluster: 3); what
    # exists keeps its own (edgekms.kvstore).
    replicas: int = 1
    # Retention: where archives and checkpoints go ("" or None: this broker does not
    # archive), and the window it keeps.
    audit_archive_dir: Path | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    # Where /metrics, /healthz and /readyz are served (edgekms.metrics); None: nowhere.
    metrics_listen: str | None = None
    # Seconds between two passes of the audit chain check behind the audit metrics
    # (broker.metrics.AuditChainCheck); 0: no check.
    audit_check_interval: float = 15.0
    # On a fleet device: its id at the hub; IssueCertificate, GetCACertificates and
    # GetCRL are sent to the hub's CA across the leaf connection (broker.hub_ca).
    hub_ca_device: str = ""


# attest_challenge_ttl's bounds: under 2 s a real TPM cannot answer in time; over 10
# minutes a captured challenge stays worth stealing for too long.
MIN_CHALLENGE_TTL = 2.0
MAX_CHALLENGE_TTL = 600.0


# A node name as nats-server's server_name and the docs use it.
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _provider_nodes(raw: dict[str, Any], providers: tuple[str, ...], path: Path) -> dict[str, str]:
    """provider_nodes: each key one of `providers`, each value a node name."""
    table = raw.get("provider_nodes", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'provider_nodes' must be a table of provider = node")
    for provider, node in table.items():
        if provider not in providers:
            raise ConfigError(f"{path}: provider_nodes names {provider!r}, not in providers")
        if not isinstance(node, str) or not NODE_NAME_RE.match(node):
            raise ConfigError(f"{path}: provider_nodes.{provider} is not a node name")
    return dict(table)


def _field(table: dict[str, Any], name: str, kind: type, path: Path) -> Any:
    if name not in table:
        raise ConfigError(f"{path}: missing field {name!r}")
    value = table[name]
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: {name!r} must be a {kind.__name__}")
    return value


BUS_FIELDS = ("nats_user", "nats_password_file", "nats_ca")
RETENTION_FIELDS = ("audit_archive_dir", "audit_window", "audit_max_age", "audit_archive_interval")
SEAL_FIELDS = ("seal_writer", "seal_key_file", "seal_public_keys", "seal_counter_file")
KNOWN_FIELDS = frozenset(
    {
        "listen",
        "nats_url",
        "default_provider",
        "providers",
        "sign_timeout",
        "generate_timeout",
        "handshake_timeout",
        "idle_timeout",
        "keepalive_interval",
        "keepalive_timeout",
        "ca",
        "enroll_listen",
        "provider_nodes",
        "replicas",
        "ek_ca_file",
        "attest_challenge_ttl",
        "tls",
        LISTEN_FIELD,
        "audit_check_interval",
        "hub_ca_device",
        *BUS_FIELDS,
        *SEAL_FIELDS,
        *AUDIT_FIELDS,
        *RETENTION_FIELDS,
    }
)
KNOWN_TLS_FIELDS = frozenset({"cert", "key", "client_ca"})


def _reject_unknown(table: dict[str, Any], known: frozenset[str], path: Path, where: str) -> None:
    """A misspelt field would otherwise be ignored and its default used in silence."""
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field {where}{unknown[0]!r}")


def _seconds(raw: dict[str, Any], name: str, default: float, path: Path) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{path}: {name!r} must be a positive number of seconds")
    return float(value)


def load_config(path: Path) -> BrokerConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    _reject_unknown(raw, KNOWN_FIELDS, path, "")
    tls_raw = _field(raw, "tls", dict, path)
    _reject_unknown(tls_raw, KNOWN_TLS_FIELDS, path, "tls.")
    tls = TLSConfig(
        *(base / _field(tls_raw, name, str, path) for name in ("cert", "key", "client_ca"))
    )
    providers = tuple(_field(raw, "providers", list, path))
    default = _field(raw, "default_provider", str, path)
    for provider in (*providers, default):
        if not isinstance(provider, str) or not PROVIDER_ID_RE.match(provider):
            raise ConfigError(f"{path}: bad provider id {provider!r}")
    if default not in providers:
        raise ConfigError(f"{path}: default_provider {default!r} is not in providers")
    ca = raw.get("ca", False)
    if not isinstance(ca, bool):
        raise ConfigError(f"{path}: 'ca' must be true or false")
    bus, problems = parse_bus_fields(raw, base)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    seal, problems = parse_seal_fields(raw, base)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    if seal is not None and seal.writer != "broker":
        raise ConfigError(f"{path}: seal_writer must be 'broker' for the broker")
    ek_ca = raw.get("ek_ca_file", "")
    if not isinstance(ek_ca, str):
        raise ConfigError(f"{path}: 'ek_ca_file' must be a path")
    challenge_ttl = _seconds(raw, "attest_challenge_ttl", 60.0, path)
    if not MIN_CHALLENGE_TTL <= challenge_ttl <= MAX_CHALLENGE_TTL:
        raise ConfigError(
            f"{path}: 'attest_challenge_ttl' must be {MIN_CHALLENGE_TTL:g} to "
            f"{MAX_CHALLENGE_TTL:g} seconds"
        )
    audit_limit, problems = parse_limit_fields(raw)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    replicas, problems = parse_replicas(raw)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    archive_dir, retention = _retention(raw, base, path)
    metrics_listen, problems = parse_listen_field(raw)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    check = raw.get("audit_check_interval", 15.0)
    if isinstance(check, bool) or not isinstance(check, int | float) or check < 0:
        raise ConfigError(f"{path}: 'audit_check_interval' must be 0 or more seconds")
    hub_ca_device = raw.get("hub_ca_device", "")
    if not isinstance(hub_ca_device, str) or (
        hub_ca_device and not DEVICE_ID_RE.match(hub_ca_device)
    ):
        raise ConfigError(
            f"{path}: 'hub_ca_device' must be a device id (a-z 0-9 -, at most 32 characters)"
        )
    return BrokerConfig(
        hub_ca_device=hub_ca_device,
        replicas=replicas,
        metrics_listen=metrics_listen,
        audit_check_interval=float(check),
        bus=bus,
        seal=seal,
        listen=_field(raw, "listen", str, path),
        nats_url=_field(raw, "nats_url", str, path),
        default_provider=default,
        providers=providers,
        tls=tls,
        sign_timeout=_seconds(raw, "sign_timeout", 5.0, path),
        generate_timeout=_seconds(raw, "generate_timeout", 120.0, path),
        handshake_timeout=_seconds(raw, "handshake_timeout", 10.0, path),
        idle_timeout=_seconds(raw, "idle_timeout", 300.0, path),
        keepalive_interval=_seconds(raw, "keepalive_interval", 60.0, path),
        keepalive_timeout=_seconds(raw, "keepalive_timeout", 20.0, path),
        ca=ca,
        enroll_listen=str(raw.get("enroll_listen", "")),
        ek_ca_file=(base / ek_ca) if ek_ca else None,
        attest_challenge_ttl=challenge_ttl,
        audit_limit=audit_limit,
        provider_nodes=_provider_nodes(raw, providers, path),
        audit_archive_dir=archive_dir,
        retention=retention,
    )


def _retention(raw: dict[str, Any], base: Path, path: Path) -> tuple[Path | None, RetentionPolicy]:
    """The archive dir (relative to the config file) and the window, each field checked."""
    folder = raw.get("audit_archive_dir", "")
    if not isinstance(folder, str):
        raise ConfigError(f"{path}: 'audit_archive_dir' must be a path")
    try:
        window = parse_window_fraction(raw.get("audit_window", DEFAULT_WINDOW_FRACTION))
    except InvalidArgument as exc:
        raise ConfigError(f"{path}: 'audit_window': {exc.message}") from None
    age = raw.get("audit_max_age", DEFAULT_MAX_AGE_S)
    if isinstance(age, bool) or not isinstance(age, int | float) or age < 0:
        raise ConfigError(f"{path}: 'audit_max_age' must be seconds, 0 or more")
    interval = _seconds(raw, "audit_archive_interval", DEFAULT_INTERVAL_S, path)
    policy = RetentionPolicy(window_fraction=window, max_age_s=float(age), interval_s=interval)
    return (base / folder if folder else None), policy
