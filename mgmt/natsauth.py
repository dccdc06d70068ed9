"""Least privilege on the bus: one NATS identity per service, its permissions as data,
the credentials behind it, and the TLS that keeps them off the wire.

Each service connects as its own user and may touch only the subjects its job needs
(docs/design.md, "Security model"): the broker asks any crypto service and the CA; a crypto
service hears only `kms.crypto.<its id>.>` and may publish nothing but replies
(`allow_responses`); the CA service hears `kms.ca.>` and may ask only its own provider to
sign; JetStream API subjects are granted per stream, so a service reaches only its own
buckets and streams and nobody may create or delete anyone else's.

Replies: every identity requests with its own inbox prefix `_INBOX.<user>` and may
subscribe to that prefix only, so no identity can read another's replies.

Credentials are user + password. The server config holds only bcrypt hashes (stdlib
`crypt` where the platform has it); the passwords are files (0600) under
<data-dir>/secrets/nats, named by each service's config file, never on argv. nkeys would
spare the server even the hashes, but nats-py needs the `nkeys` package (and PyNaCl) for
them, which the device image does not carry.

TLS: the bus has its own small CA, generated in software on first start, not the
internal CA. The internal CA's key lives in the token and signs through the crypto
service, which talks over NATS, so nats-server must be up (with its certificate) before
the internal CA can sign anything. The bus CA key (0600, <data-dir>/secrets) signs only
the nats-server certificate, and clients trust only it for the bus.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgekms.algorithms import MAX_MESSAGE_SIZE
from edgekms.audit import writer_stream

# The client side moved to edgekms.busauth so services need not import mgmt; these
# names stay importable from here for kmsctl, bench and the tests.
from edgekms.busauth import INBOX_ROOT as INBOX_ROOT
from edgekms.busauth import USER_RE_PATTERN as USER_RE_PATTERN
from edgekms.busauth import BusCredentials as BusCredentials
from edgekms.busauth import client_tls_context as client_tls_context
from edgekms.busauth import inbox_prefix as inbox_prefix
from edgekms.busauth import parse_bus_fields as parse_bus_fields
from edgekms.busauth import read_password as read_password
from edgekms.client_certs import host_names, leaf_certificate, self_signed_ca
from edgekms.errors import InvalidArgument
from edgekms.fleet import fleet_stream
from edgekms.fleet_ca import FLEET_DEVICES_BUCKET, device_inbox
from edgekms.logs import fields
from edgekms.subjects import (
    AUDIT_PREFIX,
    AUDIT_STREAM,
    CA_BUCKET,
    CA_PREFIX,
    CA_SERVICE_NAME,
    CLASS_OPERATIONS,
    CLIENTS_BUCKET,
    CRYPTO_OPERATIONS,
    CRYPTO_PREFIX,
    IDEMPOTENCY_BUCKET,
    KEY_CLASS_CA,
    KEY_CLASS_INTERNAL,
    KEY_REGISTRY_BUCKET,
    PROVIDER_ID_RE,
    ca_registry_key_names,
    crypto_service_name,
    crypto_subject,
)

log = logging.getLogger(__name__)

AUDIT_SUBJECTS = f"{AUDIT_PREFIX}.>"


def audit_publish(writer: str) -> str:
    """The one audit subject a writer may publish on: its entries name it as their writer,
    and the verifier holds an entry's `writer` to the subject it was stored under."""
    return f"{AUDIT_PREFIX}.{writer}"


def audit_append(writer: str) -> tuple[str, ...]:
    """What an audit writer needs besides its subject: its stream's info and its chain
    head, and the head it left in the legacy stream (a data dir from before per-writer
    streams: its first entry in its own stream links to it)."""
    return tuple(
        subject
        for stream in (writer_stream(writer), AUDIT_STREAM)
        for subject in (
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
        )
    )


def audit_writers(providers: Sequence[str]) -> tuple[str, ...]:
    """Every audit writer of a stack: the broker, the CA, one per crypto service."""
    return (BROKER_USER, CA_USER, *(crypto_user(p) for p in providers))


def audit_streams(providers: Sequence[str]) -> tuple[str, ...]:
    """Every audit stream of a stack, the legacy one first (edgekms.audit)."""
    return (AUDIT_STREAM, *(writer_stream(w) for w in audit_writers(providers)))


def audit_reader(providers: Sequence[str]) -> tuple[str, ...]:
    """Reading every writer's stream (TailAudit, status) and listing them by subject."""
    return (
        "$JS.API.STREAM.NAMES",
        *(subject for stream in audit_streams(providers) for subject in stream_read(stream)),
    )


def audit_purge(providers: Sequence[str]) -> tuple[str, ...]:
    """The archiver's purge of each writer's stream (broker/archiver.py), for the
    broker only: it reads every one of these streams whole, so it can purge nothing it
    could not have archived (docs/security.md, "Retention"). Never the closed legacy
    stream, never a delete of one message, a stream update or delete."""
    return tuple(f"$JS.API.STREAM.PURGE.{writer_stream(w)}" for w in audit_writers(providers))


# The largest message on the bus is a Sign request carrying an Ed25519 message of
# MAX_MESSAGE_SIZE; everything else (digests, DER keys, certificates, CRLs of a small CA,
# KV records) is far smaller. The rest is room for the protobuf envelope and headers.
BUS_MAX_PAYLOAD = MAX_MESSAGE_SIZE + 64 * 1024

# What the CA service may ask of its provider: make, use and drop its own CA keys (class
# "ca", on kms.crypto.<provider>.ca.<Op>).
CA_CRYPTO_OPERATIONS = CLASS_OPERATIONS
# What `kmsctl up` itself may ask during the bootstrap ceremony (class "internal"); the
# grant exists only while the ceremony runs (stack_identities(ceremony=True)).
KMSCTL_CRYPTO_OPERATIONS = CLASS_OPERATIONS
# What the broker may ask of the internal CA's key: issuing client certificates.
BROKER_INTERNAL_OPERATIONS = ("GetPublicKey", "Sign")

# The registry records the CA service owns (ca_service/authority.py ROOT_LABEL,
# INTERMEDIATE_LABEL), and the one the ceremony writes.
CA_REGISTRY_KEYS = ca_registry_key_names()
CEREMONY_REGISTRY_KEYS = ("edgekms/internal-ca",)
# Streams the supervisor makes or hardens at start (edgekms.kvstore, edgekms.audit);
# the audit streams come from setup_streams(providers).
SETUP_STREAMS = (
    *(f"KV_{b}" for b in (KEY_REGISTRY_BUCKET, CLIENTS_BUCKET, IDEMPOTENCY_BUCKET, CA_BUCKET)),
    AUDIT_STREAM,
)


def setup_streams(providers: Sequence[str]) -> tuple[str, ...]:
    """SETUP_STREAMS and every writer's audit stream of a stack with these providers."""
    return (*SETUP_STREAMS, *audit_streams(providers)[1:])


# Where cluster nodes' supervisors ask for and answer with the sealed PKI of the
# cluster (mgmt.clusterinit); only the kmsctl identity of a cluster node may use it.
CLUSTER_PKI_SUBJECT = "kms.cluster.pki"

BROKER_USER = "broker"
CA_USER = "ca"
KMSCTL_USER = "kmsctl"
# bcrypt's work factor slows the guessing of a weak password; these are 256-bit random
# values (new_password), beyond guessing at any cost, and nats-server pays the factor on
# every connection: cost 11 took ~115 ms of its CPU per connect (each service, each probe,
# each reconnect), cost 4 (bcrypt's least) ~2 ms.
BCRYPT_COST = 4
SERVER_CERT_VALIDITY = datetime.timedelta(days=3650)


def crypto_user(provider: str) -> str:
    return f"crypto-{provider}"


# --- permission tables ----------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    """Subjects an identity may publish to and subscribe to (NATS wildcards allowed).

    An empty tuple means "nothing", never "everything": it is rendered as a deny of `>`.
    """

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False
    # Subjects refused although an allowed wildcard covers them (deny wins in nats-server).
    publish_deny: tuple[str, ...] = ()

    def render(self) -> dict[str, Any]:
        def side(allowed: tuple[str, ...], denied: tuple[str, ...] = ()) -> dict[str, list[str]]:
            if not allowed:
                return {"deny": [">"]}
            out = {"allow": list(allowed)}
            if denied:
                out["deny"] = list(denied)
            return out

        out: dict[str, Any] = {
            "publish": side(self.publish, self.publish_deny),
            "subscribe": side(self.subscribe),
        }
        if self.allow_responses:
            # One reply per request, within a minute (key generation can take that long).
            out["allow_responses"] = {"max": 1, "expires": "2m"}
        return out


@dataclass(frozen=True)
class Identity:
    user: str
    permissions: Permissions
    description: str = ""


def stream_read(stream: str) -> tuple[str, ...]:
    """JetStream API subjects to read one stream: info, get, direct get, ephemeral consumers."""
    api = "$JS.API"
    return (
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def stream_create(stream: str) -> tuple[str, ...]:
    """Creating one named stream (first start); never update, purge or delete."""
    return (f"$JS.API.STREAM.CREATE.{stream}",)


def kv_access(
    bucket: str, *, write: bool = True, create: bool = True, keys: Sequence[str] = ()
) -> tuple[str, ...]:
    """A KV bucket is stream KV_<bucket>; writes are publishes to $KV.<bucket>.<key>, so
    `keys` limits an identity's writes to those keys (none given: every key)."""
    stream = f"KV_{bucket}"
    subjects = stream_read(stream)
    if write:
        subjects += tuple(f"$KV.{bucket}.{k}" for k in keys) if keys else (f"$KV.{bucket}.>",)
    if create:
        subjects += stream_create(stream)
    return subjects


def stream_setup(streams: Sequence[str]) -> tuple[str, ...]:
    """Making a stream, or tightening an old one's settings (edgekms.kvstore.harden):
    the supervisor's grant while it sets the stack up, withdrawn before it serves."""
    return tuple(
        f"$JS.API.STREAM.{verb}.{stream}"
        for stream in streams
        for verb in ("INFO", "CREATE", "UPDATE")
    )


def micro_subscriptions(service_name: str) -> tuple[str, ...]:
    """What nats.micro subscribes to for discovery ($SRV.PING/INFO/STATS, all three forms)."""
    return (
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        f"$SRV.*.{service_name}",
        f"$SRV.*.{service_name}.*",
    )


def _check_provider(provider: str) -> None:
    if not PROVIDER_ID_RE.match(provider):
        raise InvalidArgument("bus.provider_invalid", f"{provider!r} is not a provider id")


def broker_identity(
    providers: Sequence[str] = (), fleet_devices: Sequence[str] = (), hub_ca_device: str = ""
) -> Identity:
    """The broker's grant; `providers` name the crypto services whose audit streams it
    reads for TailAudit and status (the CA's and its own it always reads). On a fleet
    hub, `fleet_devices` name the devices whose hub copy of their audit (KMS_FLEET_<ID>,
    edgekms.fleet) it reads for `TailAudit(device=...)`: a stream's name is one subject
    token, so each copy is granted by name, and the grant grows with the fleet. On a
    fleet device, `hub_ca_device` is its id: the broker hears the hub CA's answers on
    the device's inbox (broker.hub_ca; it already may publish on kms.ca.>)."""
    user = BROKER_USER
    hub_inbox = (f"{device_inbox(hub_ca_device)}.>",) if hub_ca_device else ()
    return Identity(
        user,
        Permissions(
            publish=(
                # User keys of any provider (three tokens: never another class's subjects),
                # and the internal CA's key for signing client certificates.
                *(crypto_subject("*", op) for op in CRYPTO_OPERATIONS),
                *(crypto_subject("*", op, KEY_CLASS_INTERNAL) for op in BROKER_INTERNAL_OPERATIONS),
                f"{CA_PREFIX}.>",
                # Health pings of any service (wildcards match whole tokens only, so
                # "kms-crypto-*" cannot be said); the answers are discovery data.
                "$SRV.PING.*",
                "$JS.API.INFO",
                *kv_access(KEY_REGISTRY_BUCKET),
                *kv_access(IDEMPOTENCY_BUCKET),
                *kv_access(CLIENTS_BUCKET),
                *audit_reader(providers),
                *(subject for d in fleet_devices for subject in stream_read(fleet_stream(d))),
                # Which devices a hub's fleet holds (kmsctl fleet's records, written by
                # the supervisor): a device never in it is refused at once.
                *kv_access(FLEET_DEVICES_BUCKET, write=False, create=False),
                *audit_purge(providers),
                *stream_create(writer_stream(BROKER_USER)),
                audit_publish(BROKER_USER),
            ),
            subscribe=(f"{inbox_prefix(user)}.>", *hub_inbox),
        ),
        "the gRPC ingress: routes to every crypto service and the CA, owns the registry",
    )


def crypto_identity(provider: str) -> Identity:
    _check_provider(provider)
    user = crypto_user(provider)
    return Identity(
        user,
        Permissions(
            # Replies, and its own audit entries (refusals of keys of another class).
            publish=(audit_publish(user), *audit_append(user), *stream_create(writer_stream(user))),
            subscribe=(
                f"{CRYPTO_PREFIX}.{provider}.>",
                *micro_subscriptions(crypto_service_name(provider)),
                f"{inbox_prefix(user)}.>",
            ),
            allow_responses=True,
        ),
        f"crypto service {provider}: answers its own subjects, publishes replies and its audit",
    )


def ca_identity(provider: str) -> Identity:
    _check_provider(provider)
    return Identity(
        CA_USER,
        Permissions(
            publish=(
                *(crypto_subject(provider, op, KEY_CLASS_CA) for op in CA_CRYPTO_OPERATIONS),
                *kv_access(CA_BUCKET),
                # A hub's CA reads the fleet's device registry (ca_service.fleet); the
                # operator writes it.
                *kv_access(FLEET_DEVICES_BUCKET, write=False, create=False),
                # The CA records its own keys (ca/root, ca/intermediate) in the registry,
                # and may write no other key's record.
                *kv_access(KEY_REGISTRY_BUCKET, keys=CA_REGISTRY_KEYS),
                *audit_append(CA_USER),
                *stream_create(writer_stream(CA_USER)),
                audit_publish(CA_USER),
            ),
            subscribe=(
                f"{CA_PREFIX}.>",
                *micro_subscriptions(CA_SERVICE_NAME),
                f"{inbox_prefix(CA_USER)}.>",
            ),
            allow_responses=True,
        ),
        f"CA service: answers kms.ca.>, signs only through provider {provider}",
    )


def kmsctl_identity(
    providers: Sequence[str],
    ceremony: bool = False,
    setup: bool = False,
    cluster: bool = False,
    fleet_devices: Sequence[str] = (),
) -> Identity:
    """`kmsctl up` itself: readiness pings; while `setup` (each start, until the supervisor
    reloads the server without it) making and hardening the stack's streams; while
    `ceremony` (first start only) the internal CA's key on the first provider and its
    registry record; on a `cluster` node, asking and answering the cluster's sealed PKI
    (mgmt.clusterinit), which no other identity may hear, and reading the fleet's device
    registry (mgmt.stack grants the node's broker their copies). On a fleet hub, `setup` also
    covers the hub's copy of each of `fleet_devices`' audit (edgekms.fleet.source_device)."""
    for provider in providers:
        _check_provider(provider)
    first = providers[0]
    keys = (
        tuple(crypto_subject(first, op, KEY_CLASS_INTERNAL) for op in KMSCTL_CRYPTO_OPERATIONS)
        if ceremony
        else ()
    )
    return Identity(
        KMSCTL_USER,
        Permissions(
            publish=(
                *keys,
                *(f"$SRV.PING.{crypto_service_name(p)}" for p in providers),
                f"$SRV.PING.{CA_SERVICE_NAME}",
                *kv_access(
                    KEY_REGISTRY_BUCKET, write=ceremony, create=False, keys=CEREMONY_REGISTRY_KEYS
                ),
                *(stream_setup(setup_streams(providers)) if setup else ()),
                *(stream_setup([fleet_stream(d) for d in fleet_devices]) if setup else ()),
                # A hub's device registry, written from `kmsctl fleet`'s records while
                # the stack sets up (the hub CA only reads it, ca_service.fleet).
                *(kv_access(FLEET_DEVICES_BUCKET) if setup and fleet_devices else ()),
                # On a cluster node, which devices a hub that is the cluster serves (to
                # grant its broker their copies); read only, never made here.
                *(kv_access(FLEET_DEVICES_BUCKET, write=False, create=False) if cluster else ()),
                *((CLUSTER_PKI_SUBJECT,) if cluster else ()),
            ),
            subscribe=(
                f"{inbox_prefix(KMSCTL_USER)}.>",
                *((CLUSTER_PKI_SUBJECT,) if cluster else ()),
            ),
            allow_responses=cluster,
        ),
        f"kmsctl up: readiness probes{', stack setup' if setup else ''}"
        f"{f', bootstrap ceremony on {first}' if ceremony else ''}",
    )


def stack_identities(
    providers: Sequence[str],
    ca_provider: str | None = None,
    *,
    ceremony: bool = False,
    setup: bool = False,
    local: Sequence[str] | None = None,
    fleet_devices: Sequence[str] = (),
    hub_ca_device: str = "",
) -> list[Identity]:
    """Every identity of one stack; the CA's signs through `ca_provider` (default: first).
    `fleet_devices`: on a fleet hub, the devices whose audit copies the broker reads;
    `hub_ca_device`: on a fleet device, its id (its broker asks the hub's CA).

    `ceremony`: the supervisor may make and use the internal CA's key (first start only).
    `setup`: the supervisor may make and harden the stack's streams (each start, briefly).
    `local`: on a cluster node, the providers whose crypto services run on this node
    (the others' identities live on their own nodes' servers); None: all of them, and
    no cluster grant for the supervisor.
    """
    if not providers:
        raise InvalidArgument("bus.no_providers", "a stack needs at least one provider")
    if len(set(providers)) != len(providers):
        raise InvalidArgument("bus.provider_duplicate", "provider ids must be distinct")
    for provider in providers:
        _check_provider(provider)
    return [
        broker_identity(providers, fleet_devices, hub_ca_device),
        *(crypto_identity(p) for p in providers if local is None or p in local),
        ca_identity(ca_provider or providers[0]),
        kmsctl_identity(
            providers, ceremony, setup, cluster=local is not None, fleet_devices=fleet_devices
        ),
    ]


# --- server side: credentials and the authorization block -------------------------------


def new_password() -> str:
    return secrets.token_urlsafe(32)


def password_hash(password: str, cost: int = BCRYPT_COST) -> str:
    """A bcrypt hash nats-server accepts; the plain password where no bcrypt is available."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13; the config then holds the password itself

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**cost))  # noqa: S324 - bcrypt
    except (ImportError, OSError, AttributeError):
        hashed = None
    if hashed and hashed.startswith("$2"):
        return hashed
    log.warning("bcrypt unavailable; bus passwords are stored as given in the 0600 server config")
    return password


def cached_password_hash(path: Path, cost: int = BCRYPT_COST) -> str:
    """The bcrypt hash of the password in `path`, kept beside it across restarts.

    A hash costs CPU (~0.1-0.2 s at cost 11) and `kmsctl up` needs one per bus user at
    every start; the cache (0600, `<user>.password.hash`) holds the hash with the SHA-256
    of the password it was made from, so a changed password (or cost) is rehashed. The
    passwords are 256-bit random values, so their SHA-256 reveals nothing a bcrypt hash
    of them would not.
    """
    import hashlib

    from mgmt.pki import write_private

    password = read_password(path)
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
    cache = path.with_name(path.name + ".hash")
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if (
            isinstance(cached, dict)
            and cached.get("sha256") == digest
            and cached.get("cost") == cost
            and isinstance(cached.get("hash"), str)
            and cached["hash"]
        ):
            return str(cached["hash"])
    except (OSError, ValueError):
        pass
    hashed = password_hash(password, cost)
    if hashed != password:  # never write a plain password (no bcrypt) to a second file
        cache.unlink(missing_ok=True)
        write_private(cache, json.dumps({"sha256": digest, "cost": cost, "hash": hashed}).encode())
    return hashed


def password_path(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / "nats" / f"{user}.password"


def ensure_passwords(secrets_dir: Path, users: Iterable[str]) -> dict[str, Path]:
    """One password file per user (0600, created once, kept across restarts)."""
    from mgmt.pki import write_private

    paths: dict[str, Path] = {}
    for user in users:
        path = password_path(secrets_dir, user)
        if not path.exists():
            write_private(path, (new_password() + "\n").encode())
            log.info("bus password created", extra=fields(user=user))
        paths[user] = path
    return paths


def render_authorization(
    identities: Sequence[Identity],
    passwords: dict[str, str],
    password_hashes: dict[str, str] | None = None,
) -> str:
    """The `authorization { users: [...] }` block of nats.conf (JSON is NATS config syntax).

    `password_hashes` (user -> bcrypt hash, from cached_password_hash) saves hashing again.
    """
    users = []
    for identity in identities:
        if identity.user not in passwords:
            raise InvalidArgument("bus.password_missing", f"no password for {identity.user!r}")
        hashed = (password_hashes or {}).get(identity.user)
        users.append(
            {
                "user": identity.user,
                "password": hashed or password_hash(passwords[identity.user]),
                "permissions": identity.permissions.render(),
            }
        )
    if len({u["user"] for u in users}) != len(users):
        raise InvalidArgument("bus.user_duplicate", "bus user names must be distinct")
    return "authorization: " + json.dumps({"timeout": 2, "users": users}, indent=2)


# --- TLS: the bus CA ------------------------------------------------------------------


@dataclass(frozen=True)
class BusTLS:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ensure_bus_tls(
    tls_dir: Path, secrets_dir: Path, names: Sequence[str] = ("127.0.0.1", "localhost")
) -> BusTLS:
    """The bus CA and nats-server's certificate, made on first start and kept after."""
    from mgmt.pki import write_private, write_public

    paths = BusTLS(
        ca_cert=tls_dir / "bus-ca.crt",
        server_cert=tls_dir / "nats-server.crt",
        server_key=secrets_dir / "nats-server.key",
    )
    ca_key_path = secrets_dir / "bus-ca.key"
    if paths.ca_cert.exists() and paths.server_cert.exists() and paths.server_key.exists():
        return paths
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    if ca_key_path.exists() and paths.ca_cert.exists():
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = self_signed_ca(ca_key, _name("EdgeKMS bus CA"), SERVER_CERT_VALIDITY)
        write_private(ca_key_path, _pem_key(ca_key))
        write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = leaf_certificate(
        ca_cert,
        ca_key,
        "edgekms-nats",
        server_key.public_key(),
        host_names(names),
        [ExtendedKeyUsageOID.SERVER_AUTH],
        not_after=now + SERVER_CERT_VALIDITY,
    )
    write_private(paths.server_key, _pem_key(server_key))
    write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    log.info("bus TLS ready", extra=fields(ca=str(paths.ca_cert), names=",".join(names)))
    return paths


# --- client side ----------------------------------------------------------------------


def bus_fields_toml(user: str, password_file: Path, ca_file: Path) -> str:
    """The three top-level lines a service config needs to join an authenticated bus."""
    return (
        f"nats_user = {json.dumps(user)}\n"
        f"nats_password_file = {json.dumps(str(password_file))}\n"
        f"nats_ca = {json.dumps(str(ca_file))}\n"
    )


def local_credentials(data_dir: Path, user: str = KMSCTL_USER) -> BusCredentials:
    """The credentials `kmsctl up` made for `user` under data_dir; open bus if it made none."""
    password_file = password_path(data_dir / "secrets", user)
    ca_file = data_dir / "nats" / "tls" / "bus-ca.crt"
    if not password_file.exists():
        return BusCredentials()
    return BusCredentials(user, password_file, ca_file if ca_file.exists() else None)
