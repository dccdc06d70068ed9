"""KMSClient against the real stack: every key type signs in SoftHSM behind the broker,
the signatures verify with cryptography, errors come back typed, and a certificate built
with cryptography's CertificateBuilder is signed inside the token via remote_key()."""

from __future__ import annotations

import datetime
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from edgekms import errors
from edgekms.algorithms import ALGORITHMS, KEY_TYPE_BY_CLI, AlgorithmInfo, pss_padding
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient

pytestmark = pytest.mark.timeout(600)


def _name(stem: str) -> str:
    return f"t/client/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def kms(kms_stack: Any) -> Iterator[KMSClient]:
    client: KMSClient = kms_stack.client()
    with client:
        yield client


def _verify_locally(public_der: bytes, ainfo: AlgorithmInfo, message: bytes, sig: bytes) -> None:
    """Verify over the message, as any relying party would: raises InvalidSignature."""
    public = serialization.load_der_public_key(public_der)
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, message, ec.ECDSA(ainfo.hash()))
    elif isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = pss_padding(ainfo) if ainfo.pss else padding.PKCS1v15()
        public.verify(sig, message, pad, ainfo.hash())
    elif isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, message)
    else:  # pragma: no cover - the stack hands out nothing else
        raise AssertionError(type(public))


# RSA-4096 generation on SoftHSM takes seconds: exercised once, here.
@pytest.mark.parametrize("cli_type", ["ec-p256", "ec-p384", "rsa-2048", "rsa-4096", "ed25519"])
def test_every_key_type_signs_and_verifies(kms: KMSClient, cli_type: str) -> None:
    name = _name(cli_type)
    key = kms.create_key(name, cli_type, labels={"suite": "e2e"})
    info = KEY_TYPE_BY_CLI[cli_type]
    assert key.name == name
    assert key.key_type == info.key_type
    assert key.state == pb.KEY_STATE_ACTIVE
    assert dict(key.labels) == {"suite": "e2e"}
    assert len(bytes.fromhex(key.key_id)) > 0

    public = kms.get_public_key(name)
    loaded = serialization.load_pem_public_key(public.pem.encode())
    assert (
        loaded.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public.der
    )

    message = f"signed by {name}".encode()
    # Default algorithm: the key type's own.
    sig = kms.sign(name, message)
    _verify_locally(public.der, ALGORITHMS[info.default_algorithm], message, sig)
    assert kms.verify(name, message, sig)
    assert not kms.verify(name, message + b"!", sig)

    # Every other scheme of the family (PSS included for RSA), once per family.
    if cli_type in ("ec-p256", "rsa-2048"):
        for ainfo in ALGORITHMS.values():
            if ainfo.family != info.family:
                continue
            sig = kms.sign(name, message, algorithm=ainfo.cli_name)
            _verify_locally(public.der, ainfo, message, sig)
            with pytest.raises(InvalidSignature):
                _verify_locally(public.der, ainfo, message + b"x", sig)


def test_prehashed_digest_signs_the_same_message(kms: KMSClient) -> None:
    name = _name("prehashed")
    kms.create_key(name, pb.KEY_TYPE_EC_P256)
    message = b"prehashed message"
    sig = kms.sign(name, hashlib.sha384(message).digest(), algorithm="ecdsa-sha384", prehashed=True)
    public = kms.get_public_key(name)
    _verify_locally(public.der, ALGORITHMS[pb.SIGNATURE_ALGORITHM_ECDSA_SHA384], message, sig)
    assert kms.verify(name, message, sig, algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA384)


def _self_signed(kms: KMSClient, name: str, hash_: hashes.HashAlgorithm | None, **kw: Any) -> Any:
    signer = kms.remote_key(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(signer, hash_, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("cli_type", ["ec-p256", "rsa-2048", "ed25519"])
def test_certificate_signed_in_the_token(kms: KMSClient, cli_type: str) -> None:
    name = _name(f"ca-{cli_type}")
    kms.create_key(name, cli_type)
    if cli_type == "ed25519":
        cert = _self_signed(kms, name, None)
    elif cli_type == "rsa-2048":
        cert = _self_signed(
            kms,
            name,
            hashes.SHA256(),
            rsa_padding=padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
            ),
        )
    else:
        cert = _self_signed(kms, name, hashes.SHA256())
    cert.verify_directly_issued_by(cert)  # raises if the token's signature is wrong
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == kms.get_public_key(name).der
    )


def test_errors_come_back_typed(kms: KMSClient) -> None:
    missing = _name("missing")
    with pytest.raises(errors.NotFound) as nf:
        kms.get_key(missing)
    assert nf.value.reason == "key.not_found"

    name = _name("errs")
    kms.create_key(name, "ec-p256")
    with pytest.raises(errors.AlreadyExists):
        kms.create_key(name, "ec-p256")
    with pytest.raises(errors.InvalidArgument) as mismatch:
        kms.sign(name, b"m", algorithm="rsa-pkcs1-sha256")
    assert mismatch.value.reason == "sign.algorithm_mismatch"
    with pytest.raises(errors.InvalidArgument) as length:
        kms.sign(name, b"short", algorithm="ecdsa-sha256", prehashed=True)
    assert length.value.reason == "sign.digest_length"
    with pytest.raises(errors.InvalidArgument) as bad_name:
        kms.create_key("Upper/Case", "ec-p256")
    assert bad_name.value.reason == "key.name_invalid"

    nowhere = _name("nowhere")
    with pytest.raises(errors.InvalidArgument) as provider:
        kms.create_key(nowhere, "ec-p256", provider="nosuchprovider")
    assert provider.value.reason == "provider.unknown"
    # Refused creates leave nothing behind.
    with pytest.raises(errors.NotFound):
        kms.get_key(nowhere)
    assert kms.list_keys(nowhere, include_destroyed=True) == []


def test_lifecycle_disable_enable_destroy(kms: KMSClient) -> None:
    name = _name("life")
    kms.create_key(name, "ec-p256")
    assert kms.disable_key(name).state == pb.KEY_STATE_DISABLED
    with pytest.raises(errors.FailedPrecondition) as disabled:
        kms.sign(name, b"m")
    assert disabled.value.reason == "key.disabled"
    assert kms.enable_key(name).state == pb.KEY_STATE_ACTIVE
    assert kms.verify(name, b"m", kms.sign(name, b"m"))

    assert [k.name for k in kms.list_keys(name)] == [name]
    assert kms.destroy_key(name).state == pb.KEY_STATE_DESTROYED
    assert kms.get_key(name).state == pb.KEY_STATE_DESTROYED
    assert kms.list_keys(name) == []
    assert [k.name for k in kms.list_keys(name, include_destroyed=True)] == [name]
    with pytest.raises(errors.FailedPrecondition) as destroyed:
        kms.sign(name, b"m", algorithm="ecdsa-sha256")
    assert destroyed.value.reason == "key.destroyed"


def test_system_service(kms: KMSClient) -> None:
    me = kms.whoami()
    assert me.role == "admin"
    assert me.client
    status = kms.status()
    assert status.ok, status
    assert any(c.name for c in status.components)
