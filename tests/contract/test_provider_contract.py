"""The Provider contract: what every token provider does, checked on the real token.

Runs once per entry of PROVIDER_FACTORIES (tests/contract/conftest.py). Signatures are
checked with cryptography directly, not with EdgeKMS's own verify code.
"""

from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from crypto_service.providers.base import KeyCreateOptions, Provider, legacy_key_class
from edgekms.algorithms import ALGORITHMS, KEY_TYPES, KeyType, SignatureAlgorithm
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KMSError,
    NotFound,
)
from edgekms.subjects import KEY_CLASS_USER, KEY_CLASSES
from edgekms.v1 import common_pb2 as pb
from tests.contract.conftest import KeyCache, require_key_type

SIGN_CASES = [
    pytest.param(kt, alg, id=f"{KEY_TYPES[kt].cli_name}-{a.cli_name}")
    for kt in KEY_TYPES
    for alg, a in ALGORITHMS.items()
    if a.family == KEY_TYPES[kt].family
]


def _data_for(algorithm: SignatureAlgorithm, message: bytes) -> bytes:
    info = ALGORITHMS[algorithm]
    return hashlib.new(info.hash_name, message).digest() if info.hash_name else message


def _verify_independently(
    public_der: bytes, algorithm: SignatureAlgorithm, message: bytes, signature: bytes
) -> None:
    """Raises InvalidSignature unless `signature` is right: cryptography's own check."""
    info = ALGORITHMS[algorithm]
    key = serialization.load_der_public_key(public_der)
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, message, ec.ECDSA(info.hash()))
    elif isinstance(key, rsa.RSAPublicKey):
        h = info.hash()
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=info.digest_size)
            if info.pss
            else padding.PKCS1v15()
        )
        key.verify(signature, message, pad, h)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, message)
    else:
        raise AssertionError(f"unexpected public key {type(key)}")


def test_key_types_are_known_and_include_p256(provider: Provider) -> None:
    types = provider.key_types()
    assert types <= set(KEY_TYPES)
    assert pb.KEY_TYPE_EC_P256 in types


@pytest.mark.parametrize("key_type", list(KEY_TYPES), ids=[k.cli_name for k in KEY_TYPES.values()])
def test_generate_gives_public_key_and_listing(
    provider: Provider, key_cache: KeyCache, key_type: KeyType
) -> None:
    require_key_type(provider, key_type)
    key_id, der = key_cache.get(key_type)
    if KEY_TYPES[key_type].family == "aes":
        # Symmetric: nothing public (tests/contract/test_encryption_contract.py uses it).
        assert der == b""
        assert provider.public_key(key_id) == (b"", key_type)
        assert key_type in {k.key_type for k in provider.list_keys() if k.key_id == key_id}
        return
    public = serialization.load_der_public_key(der)
    expected = {
        "ec": ec.EllipticCurvePublicKey,
        "rsa": rsa.RSAPublicKey,
        "ed25519": ed25519.Ed25519PublicKey,
    }[KEY_TYPES[key_type].family]
    assert isinstance(public, expected)
    if isinstance(public, rsa.RSAPublicKey):
        assert public.key_size == KEY_TYPES[key_type].bits
    if isinstance(public, ec.EllipticCurvePublicKey):
        assert public.curve.key_size == KEY_TYPES[key_type].bits
    assert provider.public_key(key_id) == (der, key_type)
    listed = {k.key_id: k for k in provider.list_keys()}
    assert key_id in listed
    assert listed[key_id].key_type == key_type
    assert listed[key_id].label == f"contract-{key_type}"


@pytest.mark.parametrize(("key_type", "algorithm"), SIGN_CASES)
def test_sign_verifies_with_cryptography(
    provider: Provider, key_cache: KeyCache, key_type: KeyType, algorithm: SignatureAlgorithm
) -> None:
    require_key_type(provider, key_type)
    key_id, der = key_cache.get(key_type)
    message = b"contract message " + secrets.token_bytes(16)
    signature = provider.sign(key_id, algorithm, _data_for(algorithm, message))
    _verify_independently(der, algorithm, message, signature)
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        _verify_independently(der, algorithm, message + b"!", signature)


def test_concurrent_signs_all_verify(provider: Provider, key_cache: KeyCache) -> None:
    key_id, der = key_cache.get(pb.KEY_TYPE_EC_P256)
    alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
    messages = [f"m{i}".encode() for i in range(24)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        sigs = list(pool.map(lambda m: provider.sign(key_id, alg, _data_for(alg, m)), messages))
    for message, sig in zip(messages, sigs, strict=True):
        _verify_independently(der, alg, message, sig)


def test_destroy_removes_key(provider: Provider) -> None:
    key_id = secrets.token_bytes(16)
    provider.generate(key_id, "contract-destroy", pb.KEY_TYPE_EC_P256, KeyCreateOptions())
    digest = hashlib.sha256(b"x").digest()
    provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)  # warm any caches
    provider.destroy(key_id)
    with pytest.raises(NotFound) as info:
        provider.public_key(key_id)
    assert info.value.reason == "key.not_found"
    with pytest.raises(NotFound):
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    with pytest.raises(NotFound):
        provider.destroy(key_id)
    assert key_id not in {k.key_id for k in provider.list_keys()}
    # The key_id is free again once destroyed.
    provider.generate(key_id, "contract-destroy", pb.KEY_TYPE_EC_P256, KeyCreateOptions())
    provider.destroy(key_id)


@pytest.mark.parametrize("operation", ["public_key", "sign", "destroy"])
def test_unknown_key_is_not_found(provider: Provider, operation: str) -> None:
    key_id = secrets.token_bytes(16)
    with pytest.raises(NotFound) as info:
        if operation == "public_key":
            provider.public_key(key_id)
        elif operation == "sign":
            provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, bytes(32))
        else:
            provider.destroy(key_id)
    assert info.value.reason == "key.not_found"


def test_reused_key_id_is_refused_and_original_survives(
    provider: Provider, key_cache: KeyCache
) -> None:
    key_id, der = key_cache.get(pb.KEY_TYPE_EC_P256)
    before = len(provider.list_keys())
    with pytest.raises(AlreadyExists) as info:
        provider.generate(key_id, "again", pb.KEY_TYPE_EC_P384, KeyCreateOptions())
    assert info.value.reason == "key.id_exists"
    assert provider.public_key(key_id) == (der, pb.KEY_TYPE_EC_P256)
    assert len(provider.list_keys()) == before


@pytest.mark.parametrize("bad_type", [pb.KEY_TYPE_UNSPECIFIED, 99])
def test_unknown_key_type_is_invalid_and_leaves_nothing(provider: Provider, bad_type: int) -> None:
    key_id = secrets.token_bytes(16)
    with pytest.raises(KMSError) as info:
        provider.generate(key_id, "bad", pb.KeyType.ValueType(bad_type), KeyCreateOptions())
    assert isinstance(info.value, InvalidArgument | FailedPrecondition)
    with pytest.raises(NotFound):
        provider.public_key(key_id)


@pytest.mark.parametrize("key_type", list(KEY_TYPES), ids=[k.cli_name for k in KEY_TYPES.values()])
def test_key_type_the_provider_lacks_is_failed_precondition(
    provider: Provider, key_type: KeyType
) -> None:
    if key_type in provider.key_types():
        pytest.skip(f"provider {provider.kind!r} supports {KEY_TYPES[key_type].cli_name}")
    key_id = secrets.token_bytes(16)
    with pytest.raises(FailedPrecondition) as info:
        provider.generate(key_id, "lacking", key_type, KeyCreateOptions())
    assert info.value.reason == "provider.key_type_unsupported"
    with pytest.raises(NotFound):
        provider.public_key(key_id)


@pytest.mark.parametrize(
    ("key_type", "algorithm", "length"),
    [
        (pb.KEY_TYPE_EC_P256, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, 31),
        (pb.KEY_TYPE_EC_P256, pb.SIGNATURE_ALGORITHM_ECDSA_SHA384, 32),
        (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, 48),
        (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512, 0),
    ],
)
def test_wrong_digest_length_is_invalid(
    provider: Provider,
    key_cache: KeyCache,
    key_type: KeyType,
    algorithm: SignatureAlgorithm,
    length: int,
) -> None:
    require_key_type(provider, key_type)
    key_id, _ = key_cache.get(key_type)
    with pytest.raises(InvalidArgument) as info:
        provider.sign(key_id, algorithm, bytes(length))
    assert info.value.reason in ("sign.digest_length", "sign.data_missing")


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    [
        (pb.KEY_TYPE_EC_P256, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256),
        (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256),
        (pb.KEY_TYPE_RSA_2048, pb.SIGNATURE_ALGORITHM_ED25519),
        (pb.KEY_TYPE_ED25519, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256),
    ],
)
def test_wrong_algorithm_family_is_invalid(
    provider: Provider, key_cache: KeyCache, key_type: KeyType, algorithm: SignatureAlgorithm
) -> None:
    require_key_type(provider, key_type)
    key_id, _ = key_cache.get(key_type)
    with pytest.raises(InvalidArgument) as info:
        provider.sign(key_id, algorithm, bytes(32))
    assert info.value.reason == "sign.algorithm_mismatch"


def test_unknown_algorithm_is_invalid(provider: Provider, key_cache: KeyCache) -> None:
    key_id, _ = key_cache.get(pb.KEY_TYPE_EC_P256)
    with pytest.raises(InvalidArgument) as info:
        provider.sign(key_id, pb.SignatureAlgorithm.ValueType(77), bytes(32))
    assert info.value.reason == "sign.algorithm_unknown"


def test_attest_gives_evidence_or_says_unsupported(provider: Provider, key_cache: KeyCache) -> None:
    key_id, _ = key_cache.get(pb.KEY_TYPE_EC_P256)
    nonce = secrets.token_bytes(16)
    try:
        evidence = provider.attest(key_id, nonce)
    except FailedPrecondition as exc:
        assert exc.reason == "attest.unsupported"
        return
    assert evidence.format == provider.kind
    assert evidence.attestation and evidence.signature and evidence.attestation_key_der


# --- key classes: stored with the key, read back by the crypto service -----------------


@pytest.mark.parametrize("key_class", KEY_CLASSES)
def test_key_class_is_stored_with_the_key(provider: Provider, key_class: str) -> None:
    key_id = secrets.token_bytes(16)
    provider.generate(
        key_id,
        f"contract-class-{key_class}",
        pb.KEY_TYPE_EC_P256,
        KeyCreateOptions(key_class=key_class),
    )
    try:
        assert provider.key_class(key_id) == key_class
    finally:
        provider.destroy(key_id)
    with pytest.raises(NotFound):
        provider.key_class(key_id)


def test_key_class_defaults_to_user(provider: Provider, key_cache: KeyCache) -> None:
    key_id, _ = key_cache.get(pb.KEY_TYPE_EC_P256)
    assert provider.key_class(key_id) == KEY_CLASS_USER


@pytest.mark.parametrize(
    ("label", "expected"),
    [("edgekms/internal-ca", "internal"), ("ca/root", "ca"), ("nas/https", "user")],
)
def test_legacy_class_comes_from_the_name(label: str, expected: str) -> None:
    """Keys made before classes were stored get theirs from their name (the migration)."""
    assert legacy_key_class(label) == expected
