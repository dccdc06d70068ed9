"""The bootstrap ceremony's PKI: the internal CA that every mTLS hop trusts, the
broker's server certificate and the first administrator's client certificate.

The internal CA key is generated inside the token (through the crypto service) and
recorded in the key registry as `edgekms/internal-ca`; only its certificate is on disk.
Leaf keys for TLS are ordinary files (0600): gRPC needs them in memory to terminate TLS.
Client identity is carried as edgekms.identity describes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client as NATS

from edgekms import natsrpc
from edgekms.client_certs import (
    INTERNAL_CA_KEY,
    LEAF_VALIDITY,
    host_names,
    leaf_certificate,
    self_signed_ca,
)
from edgekms.crypto_client import CryptoClient
from edgekms.errors import AlreadyExists
from edgekms.identity import identity_uris
from edgekms.nats_signer import NatsDigestSigner
from edgekms.registry_record import (
    admin_only_policy,
    new_key_record,
    read_key_record,
    record_generated_key,
    registry_kv,
)
from edgekms.remote_key import remote_key
from edgekms.sealed import RecordSeal
from edgekms.subjects import KEY_CLASS_INTERNAL
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2

# Re-exported: the ceremony's callers and many tests take them from here.
from mgmt.outfile import write_private as write_private
from mgmt.outfile import write_public as write_public

BROKER_SERVER_NAME = "edgekms-broker"
# Where a new client config points when no broker address is given (`kmsctl up`'s default).
DEFAULT_BROKER_ADDRESS = "127.0.0.1:8443"
CA_VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class PkiPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "internal-ca.crt"

    @property
    def broker_cert(self) -> Path:
        return self.root / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker.key"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


class InternalCA:
    """Issues the certificates of the mTLS fabric, signing in the token."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self.key = key  # a RemoteKey: signs through the KMS

    def _leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        eku: list[x509.ObjectIdentifier],
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> x509.Certificate:
        # The one template for the internal CA's leaves, shared with the broker.
        return leaf_certificate(
            self.cert, self.key, common_name, public_key, sans, eku, not_after=_now() + validity
        )

    def issue_server(
        self, public_key: ec.EllipticCurvePublicKey, names: list[str]
    ) -> x509.Certificate:
        return self._leaf(
            names[0], public_key, host_names(names), [ExtendedKeyUsageOID.SERVER_AUTH]
        )

    def issue_route(
        self, public_key: ec.EllipticCurvePublicKey, names: list[str]
    ) -> x509.Certificate:
        """A cluster node's route certificate (mgmt.natsserver.ClusterConfig tls_*): a
        route is both dialled and accepted, so serverAuth and clientAuth."""
        return self._leaf(
            names[0],
            public_key,
            host_names(names),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )

    def issue_client(
        self,
        public_key: ec.EllipticCurvePublicKey,
        client: str,
        role: str,
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> x509.Certificate:
        sans: list[x509.GeneralName] = list(identity_uris(client, role))
        return self._leaf(client, public_key, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], validity)


def build_ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeKMS"),
            x509.NameAttribute(NameOID.COMMON_NAME, "EdgeKMS internal CA"),
        ]
    )
    return self_signed_ca(key, name, CA_VALIDITY)


async def internal_ca_key(
    nc: NATS,
    crypto: CryptoClient,
    provider: str,
    generate_timeout: float = 120.0,
    seal: RecordSeal | None = None,
) -> pb.KeyRecord:
    """The internal CA's key record, generating the key in the token on first use.

    The record is created in the registry only after the token made the key, with
    create-if-absent: a second ceremony racing this one loses and the loser's key is
    destroyed, so exactly one internal CA key is ever recorded.
    """
    kv = await registry_kv(nc, seal)
    found = await read_key_record(kv, INTERNAL_CA_KEY)
    if found is not None:
        return found[0]
    key_id = secrets.token_bytes(16)
    generated = await crypto.generate_key(
        provider,
        crypto_pb2.GenerateKeyRequest(
            key_id=key_id, label=INTERNAL_CA_KEY, key_type=pb.KEY_TYPE_EC_P256
        ),
        timeout=generate_timeout,
    )
    record = new_key_record(
        name=INTERNAL_CA_KEY,
        provider=provider,
        key_type=pb.KEY_TYPE_EC_P256,
        key_id=key_id,
        public_key_der=generated.public_key_der,
        created_by="kmsctl-init",
        labels={"purpose": "internal-ca"},
        # Only administrators manage it; nobody signs with it through the broker.
        policy=admin_only_policy(),
    )

    async def destroy() -> None:
        await crypto.destroy_key(provider, crypto_pb2.DestroyKeyRequest(key_id=key_id))

    await record_generated_key(kv, record, destroy)
    return record


def write_client_config(path: Path, **values: str | list[str]) -> None:
    """The client config (format: mgmt.clientconfig); paths are relative to its folder.
    A list (a cluster's `brokers`) is written as a TOML array (JSON's is TOML's)."""
    body = "".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items())
    write_public(path, ("# EdgeKMS client config, written by `kmsctl init`.\n" + body).encode())


def point_client_at(path: Path, broker_address: str) -> None:
    """Keep the client config's broker address current when the stack moves ports."""
    values = tomllib.loads(path.read_text())
    if values.get("broker") != broker_address:
        values["broker"] = broker_address
        write_client_config(
            path,
            **{
                k: [str(i) for i in v] if isinstance(v, list) else str(v) for k, v in values.items()
            },
        )


@dataclass(frozen=True)
class CeremonyResult:
    created: bool
    ca_cert: Path
    client_config: Path


async def run_ceremony(
    nats_url: str,
    provider: str,
    pki_dir: Path,
    client_dir: Path,
    broker_address: str | None,
    broker_names: list[str],
    admin_name: str = "admin",
    nats_options: dict[str, Any] | None = None,
    seal: RecordSeal | None = None,
    new_admin: bool = True,
) -> CeremonyResult:
    """Make the internal CA, the broker's server cert and the first admin's client cert.

    Idempotent: files that exist are kept, so a second run changes nothing.
    `nats_options` (mgmt.natsauth.BusCredentials.connect_options) give the ceremony its
    own bus identity on an authenticated bus; `seal` (the ceremony's, edgekms.sealed)
    signs the internal CA's registry record and checks the one found.
    `broker_address` None keeps a config's address as it is (a new one gets
    DEFAULT_BROKER_ADDRESS); `new_admin` False refuses, with AlreadyExists
    `init.already_initialised`, to issue another admin certificate for a CA that exists.
    """
    paths = PkiPaths(pki_dir)
    client_config = client_dir / "config.toml"
    if paths.ca_cert.exists() and paths.broker_cert.exists() and client_config.exists():
        if broker_address is not None:
            point_client_at(client_config, broker_address)
        return CeremonyResult(False, paths.ca_cert, client_config)
    if not new_admin and paths.ca_cert.exists():
        raise AlreadyExists(
            "init.already_initialised",
            f"{paths.ca_cert} exists but {client_config} does not: a new admin certificate is "
            "issued only with --new-admin (revoke a lost one with `kmsctl client revoke`)",
            {"path": str(client_config)},
        )
    broker_address = broker_address or DEFAULT_BROKER_ADDRESS
    # A person waits: a server that answers and refuses our certificate or password is
    # said at once, not after the deadline (another stack's bus, most likely).
    nc = await natsrpc.connect(
        nats_url,
        name="kmsctl-init",
        connect_timeout=5,
        give_up_when_refused=True,
        **(nats_options or {}),
    )
    try:
        # The internal CA's key is of class "internal": made and used on its own subjects,
        # which only the ceremony (and the broker, issuing client certificates) may use.
        crypto = CryptoClient(nc, key_class=KEY_CLASS_INTERNAL)
        kv = await registry_kv(nc, seal)
        existing_ca = await read_key_record(kv, INTERNAL_CA_KEY) is not None
        if existing_ca and not new_admin:
            raise AlreadyExists(
                "init.already_initialised",
                "this bus's registry has an internal CA already: a new admin certificate is "
                "issued only with --new-admin (revoke a lost one with `kmsctl client revoke`)",
                {"path": str(client_config)},
            )
        record = await internal_ca_key(nc, crypto, provider, seal=seal)
        if existing_ca:
            # Another admin for a CA that already has one (a second machine, or a lost
            # client config): the broker gives a name to one live certificate only
            # (broker/clients.py), so this one gets a name of its own; a lost one is
            # revoked with `kmsctl client revoke admin`.
            admin_name = f"{admin_name}-{secrets.token_hex(4)}"
        loop = asyncio.get_running_loop()
        signer = NatsDigestSigner(crypto, loop, record.provider, record.key_id)
        ca_key = remote_key(signer, record.public_key_der)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        if paths.ca_cert.exists():
            ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        else:
            ca_cert = await asyncio.to_thread(build_ca_certificate, ca_key)
            write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        ca = InternalCA(ca_cert, ca_key)
        if not paths.broker_cert.exists():
            broker_key = ec.generate_private_key(ec.SECP256R1())
            cert = await asyncio.to_thread(
                ca.issue_server, broker_key.public_key(), [BROKER_SERVER_NAME, *broker_names]
            )
            write_private(paths.broker_key, _key_pem(broker_key))
            write_public(paths.broker_cert, cert.public_bytes(serialization.Encoding.PEM))
        if not client_config.exists():
            admin_key = ec.generate_private_key(ec.SECP256R1())
            cert = await asyncio.to_thread(
                ca.issue_client, admin_key.public_key(), admin_name, "admin"
            )
            write_private(client_dir / f"{admin_name}.key", _key_pem(admin_key))
            write_public(
                client_dir / f"{admin_name}.crt", cert.public_bytes(serialization.Encoding.PEM)
            )
            write_public(client_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
            write_client_config(
                client_config,
                broker=broker_address,
                server_name=BROKER_SERVER_NAME,
                ca_cert="ca.crt",
                cert=f"{admin_name}.crt",
                key=f"{admin_name}.key",
            )
    finally:
        await nc.close()
    return CeremonyResult(True, paths.ca_cert, client_config)
