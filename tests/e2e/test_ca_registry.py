"""The mini-CA's keys in the key registry, against a real nats-server and a real
kms-crypto on SoftHSM: init records ca/root and ca/intermediate, `--disable-root`
disables the root there, the CA refuses to sign with a key the registry does not hold
active, and a failed init leaves neither keys nor records behind."""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_service.authority import INTERMEDIATE_LABEL, ROOT_LABEL, CertificateAuthority
from ca_service.signer import KMSKeyBackend
from ca_service.store import CAStore
from edgekms.crypto_client import CryptoClient
from edgekms.errors import AlreadyExists, FailedPrecondition, NotFound
from edgekms.registry_record import RegistryKeys, new_key_record, read_key_record
from edgekms.v1 import ca_pb2, crypto_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.bundle import generate_key, make_csr
from mgmt.natsserver import NatsServer
from tests.ca.conftest import PROVIDER, ca_crypto, ca_nats  # noqa: F401 - fixtures
from tests.crypto.conftest import CryptoProcess

pytestmark = pytest.mark.timeout(300)


@dataclass
class Env:
    nc: Any
    ca: CertificateAuthority
    store: CAStore
    registry: RegistryKeys
    crypto: CryptoClient


@pytest.fixture
async def env(ca_nats: NatsServer, ca_crypto: CryptoProcess) -> AsyncIterator[Env]:  # noqa: F811
    nc = await nats.connect(ca_nats.url, allow_reconnect=False)
    js = nc.jetstream()
    suffix = secrets.token_hex(4)
    store = await CAStore.open(js, f"kms_ca_{suffix}")
    kv = await js.create_key_value(bucket=f"kms_keys_{suffix}", history=5)
    registry = RegistryKeys(kv, "kms-ca", "ca.key_disabled")
    crypto = CryptoClient(nc, default_timeout=30.0)
    ca = CertificateAuthority(
        store, KMSKeyBackend(crypto, asyncio.get_running_loop()), registry=registry
    )
    yield Env(nc, ca, store, registry, crypto)
    await js.delete_key_value(f"kms_ca_{suffix}")
    await js.delete_key_value(f"kms_keys_{suffix}")
    await nc.close()


def _init(disable_root: bool) -> ca_pb2.InitCARequest:
    return ca_pb2.InitCARequest(
        provider=PROVIDER,
        key_type=pb.KEY_TYPE_EC_P256,
        common_name="Registry Test CA",
        disable_root=disable_root,
    )


def _spki(cert_der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(cert_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


async def _state(env: Env, name: str) -> int:
    found = await read_key_record(env.registry.kv, name)
    assert found is not None, name
    return found[0].state


async def _set_state(env: Env, name: str, state: pb.KeyState.ValueType) -> None:
    found = await read_key_record(env.registry.kv, name)
    assert found is not None
    await env.registry.set_state(name, found[1], state)


def _leaf_csr() -> bytes:
    return make_csr(generate_key("ec-p256"), "nas.home.arpa", ["dns:nas.home.arpa"])


async def test_init_records_both_keys_and_disables_the_root(env: Env) -> None:
    response = await env.ca.init(_init(disable_root=True))
    state = await env.store.require_state()
    root = await read_key_record(env.registry.kv, ROOT_LABEL)
    inter = await read_key_record(env.registry.kv, INTERMEDIATE_LABEL)
    assert root is not None and inter is not None
    assert root[0].state == pb.KEY_STATE_DISABLED
    assert inter[0].state == pb.KEY_STATE_ACTIVE
    assert (root[0].provider, root[0].key_id) == (PROVIDER, state.root_key_id)
    assert (inter[0].provider, inter[0].key_id) == (PROVIDER, state.intermediate_key_id)
    assert root[0].public_key_der == _spki(response.root_certificate_der)
    assert inter[0].public_key_der == _spki(response.intermediate_certificate_der)
    assert root[0].key_type == pb.KEY_TYPE_EC_P256 and root[0].created_by == "kms-ca"

    # The root is refused while disabled; leaves still issue (the intermediate signs them).
    with pytest.raises(FailedPrecondition) as refused:
        await env.ca.root_key()
    assert refused.value.reason == "ca.key_disabled"
    issued = await env.ca.issue(
        ca_pb2.IssueCertificateRequest(profile="https-server", csr=_leaf_csr(), requester="t")
    )
    leaf = x509.load_der_x509_certificate(issued.certificate_der)
    leaf.verify_directly_issued_by(
        x509.load_der_x509_certificate(response.intermediate_certificate_der)
    )

    # Enabled again (the next intermediate is due), the root signs inside the token.
    await _set_state(env, ROOT_LABEL, pb.KEY_STATE_ACTIVE)
    root_key = await env.ca.root_key()
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    root_cert = x509.load_der_x509_certificate(response.root_certificate_der)
    subject_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    probe = await asyncio.to_thread(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "next issuing CA")]))
        .issuer_name(root_cert.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign,
        root_key,
        hashes.SHA256(),
    )
    probe.verify_directly_issued_by(root_cert)


async def test_disabled_intermediate_stops_issuing_and_revoking(env: Env) -> None:
    await env.ca.init(_init(disable_root=False))
    assert await _state(env, ROOT_LABEL) == pb.KEY_STATE_ACTIVE
    first = await env.ca.issue(
        ca_pb2.IssueCertificateRequest(profile="device", csr=_leaf_csr(), requester="t")
    )
    await _set_state(env, INTERMEDIATE_LABEL, pb.KEY_STATE_DISABLED)
    before = len(await env.store.list_records())
    with pytest.raises(FailedPrecondition) as refused:
        await env.ca.issue(
            ca_pb2.IssueCertificateRequest(profile="device", csr=_leaf_csr(), requester="t")
        )
    assert refused.value.reason == "ca.key_disabled"
    with pytest.raises(FailedPrecondition):
        await env.ca.revoke(ca_pb2.RevokeCertificateRequest(serial=first.record.serial))
    records = await env.store.list_records()
    assert len(records) == before  # nothing stored for the refused issuance
    assert all(r.status == ca_pb2.CERTIFICATE_STATUS_VALID for r in records)  # not revoked

    await _set_state(env, INTERMEDIATE_LABEL, pb.KEY_STATE_ACTIVE)
    revoked = await env.ca.revoke(ca_pb2.RevokeCertificateRequest(serial=first.record.serial))
    assert revoked.record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED


async def test_failed_init_leaves_no_keys_and_no_records(env: Env) -> None:
    # Someone holds ca/intermediate in the registry already: init must fail after making
    # the root and the intermediate keys, and take both (and the root's record) back.
    squatter = new_key_record(
        name=INTERMEDIATE_LABEL,
        provider=PROVIDER,
        key_type=pb.KEY_TYPE_EC_P256,
        key_id=b"\x01" * 16,
        public_key_der=b"",
        created_by="someone",
    )
    await env.registry.kv.create(INTERMEDIATE_LABEL, squatter.SerializeToString())
    generated: list[bytes] = []
    backend = env.ca.keys
    original = backend.generate

    async def remember(provider: str, label: str, key_type: Any) -> tuple[bytes, bytes]:
        key_id, public = await original(provider, label, key_type)
        generated.append(key_id)
        return key_id, public

    backend.generate = remember  # type: ignore[method-assign]
    with pytest.raises(AlreadyExists) as refused:
        await env.ca.init(_init(disable_root=False))
    assert refused.value.reason == "key.exists"
    assert await env.store.get_state() is None
    assert await read_key_record(env.registry.kv, ROOT_LABEL) is None
    squatted = await read_key_record(env.registry.kv, INTERMEDIATE_LABEL)
    assert squatted is not None and squatted[0].created_by == "someone"
    assert len(generated) == 2
    for key_id in generated:  # both keys are gone from the token
        with pytest.raises(NotFound):
            await env.crypto.sign(
                PROVIDER,
                crypto_pb2.SignRequest(
                    key_id=key_id,
                    algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
                    data=b"\x00" * 32,
                ),
            )
