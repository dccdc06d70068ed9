"""The crypto service over NATS as a real kms-crypto process on a real SoftHSM token:
every key type signs, cryptography and the openssl command agree, keys are made
non-extractable, and bad input gets typed errors."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
from pathlib import Path

import nats.aio.client
import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from edgekms.algorithms import ALGORITHMS, KEY_TYPES, KeyType, SignatureAlgorithm
from edgekms.crypto_client import CryptoClient
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    from_bytes,
)
from edgekms.subjects import crypto_subject
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from tests.conftest import TokenInfo
from tests.crypto.conftest import CryptoProcess

P = "hsm0"


async def _generate(
    client: CryptoClient, key_type: KeyType, label: str = "svc"
) -> crypto_pb2.GenerateKeyResponse:
    req = crypto_pb2.GenerateKeyRequest(
        key_id=secrets.token_bytes(16), label=label, key_type=key_type
    )
    resp = await client.generate_key(P, req, timeout=60)
    assert resp.key_id == req.key_id
    return resp


def _data(algorithm: SignatureAlgorithm, message: bytes) -> bytes:
    info = ALGORITHMS[algorithm]
    return hashlib.new(info.hash_name, message).digest() if info.hash_name else message


def _check_with_cryptography(
    der: bytes, algorithm: SignatureAlgorithm, message: bytes, sig: bytes
) -> None:
    info = ALGORITHMS[algorithm]
    key = serialization.load_der_public_key(der)
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, message, ec.ECDSA(info.hash()))
    elif isinstance(key, rsa.RSAPublicKey):
        h = info.hash()
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(h), info.digest_size) if info.pss else padding.PKCS1v15()
        )
        key.verify(sig, message, pad, h)
    else:
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(sig, message)


SIGNING_TYPES = [k for k, info in KEY_TYPES.items() if info.family != "aes"]


@pytest.mark.parametrize(
    "key_type", SIGNING_TYPES, ids=[KEY_TYPES[k].cli_name for k in SIGNING_TYPES]
)
async def test_every_key_type_signs_and_verifies(
    hsm0: CryptoProcess, client: CryptoClient, key_type: KeyType
) -> None:
    made = await _generate(client, key_type)
    public = await client.get_public_key(P, crypto_pb2.GetPublicKeyRequest(key_id=made.key_id))
    assert public.public_key_der == made.public_key_der
    assert public.key_type == key_type
    family = KEY_TYPES[key_type].family
    for algorithm, info in ALGORITHMS.items():
        if info.family != family:
            continue
        message = f"service {info.cli_name}".encode()
        data = _data(algorithm, message)
        signed = await client.sign(
            P, crypto_pb2.SignRequest(key_id=made.key_id, algorithm=algorithm, data=data)
        )
        _check_with_cryptography(made.public_key_der, algorithm, message, signed.signature)
        good = await client.verify(
            P,
            crypto_pb2.VerifyRequest(
                key_id=made.key_id, algorithm=algorithm, data=data, signature=signed.signature
            ),
        )
        assert good.valid, info.cli_name
        bad = await client.verify(
            P,
            crypto_pb2.VerifyRequest(
                key_id=made.key_id,
                algorithm=algorithm,
                data=_data(algorithm, message + b"?"),
                signature=signed.signature,
            ),
        )
        assert not bad.valid, info.cli_name
    listed = await client.list_keys(P)
    assert (made.key_id, key_type) in {(k.key_id, k.key_type) for k in listed.keys}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


OPENSSL_CASES = [
    (pb.KEY_TYPE_EC_P256, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256),
    (pb.KEY_TYPE_EC_P384, pb.SIGNATURE_ALGORITHM_ECDSA_SHA384),
    (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256),
    (pb.KEY_TYPE_RSA_3072, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512),
    (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256),
    (pb.KEY_TYPE_ED25519, pb.SIGNATURE_ALGORITHM_ED25519),
]


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    OPENSSL_CASES,
    ids=[ALGORITHMS[a].cli_name + "-" + KEY_TYPES[k].cli_name for k, a in OPENSSL_CASES],
)
async def test_openssl_verifies_signatures(
    hsm0: CryptoProcess,
    client: CryptoClient,
    tmp_path: Path,
    key_type: KeyType,
    algorithm: SignatureAlgorithm,
) -> None:
    made = await _generate(client, key_type)
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        serialization.load_der_public_key(made.public_key_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    payload = tmp_path / "file"
    payload.write_bytes(b"signed by EdgeKMS " + secrets.token_bytes(64))
    info = ALGORITHMS[algorithm]
    data = _data(algorithm, payload.read_bytes())
    sig = tmp_path / "sig"
    signed = await client.sign(
        P, crypto_pb2.SignRequest(key_id=made.key_id, algorithm=algorithm, data=data)
    )
    sig.write_bytes(signed.signature)
    if info.hash_name is None:
        argv = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin"]
        argv += ["-in", str(payload), "-sigfile", str(sig)]
    else:
        argv = ["openssl", "dgst", f"-{info.hash_name}", "-verify", str(pub)]
        if info.pss:
            argv += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
        argv += ["-signature", str(sig), str(payload)]
    ok = await asyncio.to_thread(_run, argv)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verified OK" in ok.stdout or "Signature Verified Successfully" in ok.stdout
    payload.write_bytes(payload.read_bytes() + b"tampered")
    tampered = await asyncio.to_thread(_run, argv)
    assert tampered.returncode != 0


async def test_private_key_never_leaves_the_token(
    hsm0: CryptoProcess, client: CryptoClient, softhsm_token: TokenInfo
) -> None:
    made = await _generate(client, pb.KEY_TYPE_EC_P256, label="attr-check")
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label)
    try:
        session = token.open(user_pin=softhsm_token.pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # a provider in this process holds the login
        session = token.open()
    try:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=made.key_id)
        A = pkcs11.Attribute
        assert private[A.SENSITIVE] is True
        assert private[A.EXTRACTABLE] is False
        assert private[A.NEVER_EXTRACTABLE] is True
        assert private[A.ALWAYS_SENSITIVE] is True
        assert private[A.TOKEN] is True
        assert private[A.PRIVATE] is True
        assert private[A.SIGN] is True
        assert private[A.LABEL] == "attr-check"
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[A.VALUE]
        public = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, id=made.key_id)
        assert public[A.VERIFY] is True
        assert public[A.TOKEN] is True
    finally:
        session.close()


async def test_unknown_key_is_not_found(hsm0: CryptoProcess, client: CryptoClient) -> None:
    missing = secrets.token_bytes(16)
    with pytest.raises(NotFound) as info:
        await client.sign(
            P,
            crypto_pb2.SignRequest(
                key_id=missing, algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, data=bytes(32)
            ),
        )
    assert info.value.reason == "key.not_found"
    with pytest.raises(NotFound):
        await client.get_public_key(P, crypto_pb2.GetPublicKeyRequest(key_id=missing))
    with pytest.raises(NotFound):
        await client.destroy_key(P, crypto_pb2.DestroyKeyRequest(key_id=missing))


@pytest.mark.parametrize(
    ("algorithm", "length", "reason"),
    [
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, 20, "sign.digest_length"),
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA384, 32, "sign.digest_length"),
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, 0, "sign.data_missing"),
        (pb.SIGNATURE_ALGORITHM_UNSPECIFIED, 32, "sign.algorithm_missing"),
        (pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, 32, "sign.algorithm_mismatch"),
        (55, 32, "sign.algorithm_unknown"),
    ],
)
async def test_bad_sign_requests_are_invalid(
    hsm0: CryptoProcess,
    client: CryptoClient,
    algorithm: int,
    length: int,
    reason: str,
) -> None:
    made = await _generate(client, pb.KEY_TYPE_EC_P256)
    req = crypto_pb2.SignRequest(key_id=made.key_id, data=bytes(length))
    req.algorithm = algorithm  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as info:
        await client.sign(P, req)
    assert info.value.reason == reason


async def test_empty_requests_are_invalid(hsm0: CryptoProcess, client: CryptoClient) -> None:
    with pytest.raises(InvalidArgument) as info:
        await client.sign(P, crypto_pb2.SignRequest())
    assert info.value.reason == "key.id_missing"
    with pytest.raises(InvalidArgument) as info:
        await client.generate_key(P, crypto_pb2.GenerateKeyRequest(key_id=b"x"))
    assert info.value.reason == "key.type_missing"
    with pytest.raises(InvalidArgument) as info:
        await client.generate_key(P, crypto_pb2.GenerateKeyRequest(key_type=pb.KEY_TYPE_EC_P256))
    assert info.value.reason == "key.id_missing"


async def test_malformed_payload_is_invalid(
    hsm0: CryptoProcess, nc: nats.aio.client.Client
) -> None:
    reply = await nc.request(crypto_subject(P, "Sign"), b"\x0a\xff\x01", timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "ERROR_CODE_INVALID_ARGUMENT"
    err = from_bytes(reply.data)
    assert isinstance(err, InvalidArgument)
    assert err.reason == "request.malformed"


async def test_reused_key_id_and_attest(hsm0: CryptoProcess, client: CryptoClient) -> None:
    made = await _generate(client, pb.KEY_TYPE_EC_P256)
    with pytest.raises(AlreadyExists) as info:
        await client.generate_key(
            P,
            crypto_pb2.GenerateKeyRequest(
                key_id=made.key_id, label="again", key_type=pb.KEY_TYPE_ED25519
            ),
        )
    assert info.value.reason == "key.id_exists"
    still = await client.get_public_key(P, crypto_pb2.GetPublicKeyRequest(key_id=made.key_id))
    assert still.public_key_der == made.public_key_der
    with pytest.raises(FailedPrecondition) as attest:
        await client.attest(P, crypto_pb2.AttestRequest(key_id=made.key_id, nonce=b"n"))
    assert attest.value.reason == "attest.unsupported"


async def test_destroy_over_nats(hsm0: CryptoProcess, client: CryptoClient) -> None:
    made = await _generate(client, pb.KEY_TYPE_EC_P256)
    digest = hashlib.sha256(b"d").digest()
    sign = crypto_pb2.SignRequest(
        key_id=made.key_id, algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, data=digest
    )
    await client.sign(P, sign)
    await client.destroy_key(P, crypto_pb2.DestroyKeyRequest(key_id=made.key_id))
    with pytest.raises(NotFound):
        await client.sign(P, sign)
    with pytest.raises(NotFound):
        await client.get_public_key(P, crypto_pb2.GetPublicKeyRequest(key_id=made.key_id))
    listed = await client.list_keys(P)
    assert made.key_id not in {k.key_id for k in listed.keys}


async def test_ping_reports_provider(hsm0: CryptoProcess, client: CryptoClient) -> None:
    answer = await client.ping(P)
    assert answer["name"] == "kms-crypto-hsm0"
    # "workers" lets the broker keep more on the bus for a one-thread provider.
    assert answer["metadata"] == {"provider": "hsm0", "kind": "pkcs11", "workers": "4"}


async def test_encrypt_and_decrypt_over_the_bus(hsm0: CryptoProcess, client: CryptoClient) -> None:
    """kms-crypto's Encrypt/Decrypt subjects: a round trip, then its limits as typed
    errors (the service checks sizes itself: it trusts nobody on the bus)."""
    made = await _generate(client, pb.KEY_TYPE_AES_256)
    assert made.public_key_der == b""
    sealed = await client.encrypt(
        P, crypto_pb2.EncryptRequest(key_id=made.key_id, plaintext=b"bus secret", aad=b"ctx")
    )
    assert sealed.algorithm == pb.ENCRYPTION_ALGORITHM_AES_256_GCM and len(sealed.nonce) == 12
    opened = await client.decrypt(
        P,
        crypto_pb2.DecryptRequest(
            key_id=made.key_id,
            algorithm=sealed.algorithm,
            nonce=sealed.nonce,
            ciphertext=sealed.ciphertext,
            aad=b"ctx",
        ),
    )
    assert opened.plaintext == b"bus secret"
    with pytest.raises(InvalidArgument) as too_large:
        await client.encrypt(
            P, crypto_pb2.EncryptRequest(key_id=made.key_id, plaintext=bytes(64 * 1024 + 1))
        )
    assert too_large.value.reason == "encrypt.plaintext_too_large"
    with pytest.raises(InvalidArgument) as wrong:
        await client.decrypt(
            P,
            crypto_pb2.DecryptRequest(
                key_id=made.key_id,
                algorithm=sealed.algorithm,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
                aad=b"other",
            ),
        )
    assert wrong.value.reason == "decrypt.failed"
