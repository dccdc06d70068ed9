"""Keys bound to their owners on the bus (issue 11, item 1), against a real nats-server
with the stack's permission tables, a real kms-crypto process and a SoftHSM token.

The attack: an identity other than the rightful one signs with the internal CA's key
(`edgekms/internal-ca`) through kms.crypto.hsm0.Sign, i.e. mints client certificates.
Each identity is tried on every subject it might use; the server refuses the subjects it
may not publish on, the crypto service refuses a key of another class on the ones it may
(PERMISSION_DENIED `key.class_mismatch`), and each such refusal is in the audit stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edgekms.audit import AuditWriter, audit_streams, parse_message
from edgekms.crypto_client import CryptoClient
from edgekms.errors import PermissionDenied
from edgekms.subjects import KEY_CLASS_CA, KEY_CLASS_INTERNAL, KEY_CLASS_USER, crypto_subject
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsauth import bus_fields_toml
from tests.conftest import TokenInfo
from tests.crypto.conftest import CryptoProcess
from tests.natsperm.conftest import Conn, SecureBus, connect, end_ceremony, start_secure_bus

pytestmark = pytest.mark.timeout(120)

P = "hsm0"
ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
DIGEST = hashlib.sha256(b"tbsCertificate of an admin client certificate").digest()


@dataclass
class ClassStack:
    bus: SecureBus
    crypto: CryptoProcess
    keys: dict[str, tuple[bytes, bytes]]  # class -> (key_id, SubjectPublicKeyInfo)


def _crypto_config(directory: Path, bus: SecureBus, token: TokenInfo) -> Path:
    creds = bus.creds("crypto-hsm0")
    assert creds.password_file is not None and creds.ca_file is not None
    path = directory / "crypto-hsm0.toml"
    path.write_text(
        f'provider_id = "{P}"\n'
        f'nats_url = "{bus.url}"\n'
        + bus_fields_toml("crypto-hsm0", creds.password_file, creds.ca_file)
        + "[pkcs11]\n"
        f'module = "{token.module}"\n'
        f'token_label = "{token.label}"\n'
        f'pin_file = "{token.pin_file}"\n'
        "sessions = 2\n"
    )
    return path


async def _make_keys(bus: SecureBus) -> dict[str, tuple[bytes, bytes]]:
    """Each class's key made by its rightful identity, as the stack makes them."""
    makers = {
        KEY_CLASS_INTERNAL: ("kmsctl", "edgekms/internal-ca"),  # the ceremony
        KEY_CLASS_CA: ("ca", "ca/root"),
        KEY_CLASS_USER: ("broker", "nas/https"),
    }
    keys: dict[str, tuple[bytes, bytes]] = {}
    for key_class, (user, label) in makers.items():
        conn = await connect(bus, user)
        try:
            key_id = secrets.token_bytes(16)
            made = await CryptoClient(conn.nc, 30.0, key_class).generate_key(
                P,
                crypto_pb2.GenerateKeyRequest(
                    key_id=key_id, label=label, key_type=pb.KEY_TYPE_EC_P256
                ),
            )
            keys[key_class] = (key_id, made.public_key_der)
        finally:
            await conn.nc.close()
    conn = await connect(bus, "broker")
    try:
        await AuditWriter(conn.nc.jetstream(), "broker").ensure_stream()
    finally:
        await conn.nc.close()
    return keys


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, softhsm_token: TokenInfo
) -> Iterator[ClassStack]:
    root = tmp_path_factory.mktemp("keyclasses")
    bus = start_secure_bus(root / "bus", (P,), ceremony=True)
    crypto = None
    try:
        config = _crypto_config(root, bus, softhsm_token)
        crypto = CryptoProcess(config, softhsm_token, root / "crypto.stderr").start()
        keys = asyncio.run(_make_keys(bus))
        end_ceremony(bus)  # the ceremony is over: the supervisor loses its grant
        yield ClassStack(bus, crypto, keys)
    finally:
        if crypto is not None:
            crypto.stop()
        bus.server.stop()


def _sign_request(key_id: bytes) -> crypto_pb2.SignRequest:
    return crypto_pb2.SignRequest(key_id=key_id, algorithm=ALG, data=DIGEST)


async def refused_by_server(conn: Conn, subject: str, payload: bytes) -> None:
    """The server drops the publish and says so; no crypto service ever sees it."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await conn.nc.request(subject, payload, timeout=0.5)
    await conn.violation(f'publish to "{subject}"')


async def refused_by_crypto(conn: Conn, key_class: str, key_id: bytes, op: str = "Sign") -> None:
    client = CryptoClient(conn.nc, 30.0, key_class)
    with pytest.raises(PermissionDenied) as info:
        if op == "Sign":
            await client.sign(P, _sign_request(key_id))
        else:
            await client.destroy_key(P, crypto_pb2.DestroyKeyRequest(key_id=key_id))
    assert info.value.reason == "key.class_mismatch"
    assert info.value.details["subject_class"] == key_class


async def audit_entries(bus: SecureBus) -> list[dict[str, Any]]:
    conn = await connect(bus, "broker")
    try:
        js = conn.nc.jetstream(timeout=5)
        entries: list[dict[str, Any]] = []
        for stream in await audit_streams(js):
            info = await js.stream_info(stream)
            if not info.state.messages:
                continue
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq=seq, direct=True)
                entries.extend(parse_message(msg.data or b""))
        return entries
    finally:
        await conn.nc.close()


async def assert_refusal_audited(bus: SecureBus, key_id: bytes, subject_class: str) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = [
            e
            for e in await audit_entries(bus)
            if e["target"] == key_id.hex()
            and e["outcome"] == "key.class_mismatch"
            and e["details"].get("subject_class") == subject_class
        ]
        if found:
            assert found[0]["writer"] == "crypto-hsm0"
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no audit entry for the refusal of {key_id.hex()}")
        await asyncio.sleep(0.1)


def _verifies(public_der: bytes, signature: bytes) -> None:
    key = serialization.load_der_public_key(public_der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))


# --- the attack of item 1, from each identity -------------------------------------------


async def test_ca_identity_cannot_sign_with_the_internal_ca_key(stack: ClassStack) -> None:
    key_id, _ = stack.keys[KEY_CLASS_INTERNAL]
    payload = _sign_request(key_id).SerializeToString()
    conn = await connect(stack.bus, "ca")
    try:
        await refused_by_server(conn, crypto_subject(P, "Sign"), payload)
        await refused_by_server(conn, crypto_subject(P, "Sign", KEY_CLASS_INTERNAL), payload)
        await refused_by_crypto(conn, KEY_CLASS_CA, key_id)
    finally:
        await conn.nc.close()
    await assert_refusal_audited(stack.bus, key_id, KEY_CLASS_CA)


async def test_supervisor_identity_loses_the_key_after_the_ceremony(stack: ClassStack) -> None:
    key_id, _ = stack.keys[KEY_CLASS_INTERNAL]
    payload = _sign_request(key_id).SerializeToString()
    conn = await connect(stack.bus, "kmsctl")
    try:
        for key_class in (KEY_CLASS_INTERNAL, KEY_CLASS_USER, KEY_CLASS_CA):
            await refused_by_server(conn, crypto_subject(P, "Sign", key_class), payload)
    finally:
        await conn.nc.close()


async def test_broker_cannot_use_the_internal_ca_key_as_a_user_key(stack: ClassStack) -> None:
    key_id, _ = stack.keys[KEY_CLASS_INTERNAL]
    conn = await connect(stack.bus, "broker")
    try:
        await refused_by_crypto(conn, KEY_CLASS_USER, key_id)
        # Batched: the item gets the refusal, as a Sign would.
        batch = await CryptoClient(conn.nc, 30.0).sign_batch(
            P, crypto_pb2.SignBatchRequest(requests=[_sign_request(key_id)])
        )
        assert batch.results[0].error.reason == "key.class_mismatch"
        assert not batch.results[0].signature
        # Nor destroy it, nor make or destroy keys of the internal class.
        await refused_by_crypto(conn, KEY_CLASS_USER, key_id, op="DestroyKey")
        await refused_by_server(
            conn,
            crypto_subject(P, "DestroyKey", KEY_CLASS_INTERNAL),
            crypto_pb2.DestroyKeyRequest(key_id=key_id).SerializeToString(),
        )
        await refused_by_server(conn, crypto_subject(P, "GenerateKey", KEY_CLASS_INTERNAL), b"")
        # The key is still there.
        got = await CryptoClient(conn.nc, 30.0).get_public_key(
            P, crypto_pb2.GetPublicKeyRequest(key_id=key_id)
        )
        assert got.public_key_der == stack.keys[KEY_CLASS_INTERNAL][1]
    finally:
        await conn.nc.close()
    await assert_refusal_audited(stack.bus, key_id, KEY_CLASS_USER)


async def test_broker_signs_client_certificates_on_the_internal_subjects(
    stack: ClassStack,
) -> None:
    """The one rightful use after the ceremony: ClientService.AddClient."""
    key_id, public_der = stack.keys[KEY_CLASS_INTERNAL]
    conn = await connect(stack.bus, "broker")
    try:
        signed = await CryptoClient(conn.nc, 30.0, KEY_CLASS_INTERNAL).sign(
            P, _sign_request(key_id)
        )
    finally:
        await conn.nc.close()
    _verifies(public_der, signed.signature)


# --- the other classes --------------------------------------------------------------------


async def test_ca_keys_sign_only_for_the_ca(stack: ClassStack) -> None:
    key_id, public_der = stack.keys[KEY_CLASS_CA]
    broker = await connect(stack.bus, "broker")
    ca = await connect(stack.bus, "ca")
    try:
        await refused_by_crypto(broker, KEY_CLASS_USER, key_id)
        await refused_by_server(
            broker,
            crypto_subject(P, "Sign", KEY_CLASS_CA),
            _sign_request(key_id).SerializeToString(),
        )
        signed = await CryptoClient(ca.nc, 30.0, KEY_CLASS_CA).sign(P, _sign_request(key_id))
        _verifies(public_der, signed.signature)
    finally:
        await broker.nc.close()
        await ca.nc.close()
    await assert_refusal_audited(stack.bus, key_id, KEY_CLASS_USER)


async def test_user_keys_sign_only_for_the_broker(stack: ClassStack) -> None:
    key_id, public_der = stack.keys[KEY_CLASS_USER]
    broker = await connect(stack.bus, "broker")
    ca = await connect(stack.bus, "ca")
    try:
        await refused_by_crypto(ca, KEY_CLASS_CA, key_id)
        await refused_by_crypto(broker, KEY_CLASS_INTERNAL, key_id)
        signed = await CryptoClient(broker.nc, 30.0).sign(P, _sign_request(key_id))
        _verifies(public_der, signed.signature)
    finally:
        await broker.nc.close()
        await ca.nc.close()
    await assert_refusal_audited(stack.bus, key_id, KEY_CLASS_CA)


async def test_a_key_made_before_classes_gets_its_class_from_its_name(
    stack: ClassStack, softhsm_token: TokenInfo
) -> None:
    """Migration: an internal CA key with no stored class (made by an older version) is
    still an internal key, so the broker's user subjects cannot reach it."""
    import pkcs11
    from pkcs11 import Attribute

    key_id = secrets.token_bytes(16)
    lib = pkcs11.lib(softhsm_token.module)
    token = lib.get_token(token_label=softhsm_token.label)

    def make_legacy() -> None:
        with token.open(rw=True, user_pin=softhsm_token.pin) as session:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
                local=True,
            )
            params.generate_keypair(id=key_id, label="edgekms/internal-ca", store=True)

    await asyncio.to_thread(make_legacy)
    conn = await connect(stack.bus, "broker")
    try:
        await refused_by_crypto(conn, KEY_CLASS_USER, key_id)
        signed = await CryptoClient(conn.nc, 30.0, KEY_CLASS_INTERNAL).sign(
            P, _sign_request(key_id)
        )
        assert signed.signature
    finally:
        await conn.nc.close()
