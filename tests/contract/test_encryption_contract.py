"""The Provider encryption contract: the same Encrypt/Decrypt cases on every provider
(PROVIDER_FACTORIES: SoftHSM and swtpm), on the real token. RSA-OAEP is checked against
cryptography's own OAEP, in both directions where the private key allows."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from crypto_service.providers.base import KeyCreateOptions, Provider
from edgekms.envelope import bound_aad, oaep_label
from edgekms.errors import InvalidArgument, KMSError, NotFound
from edgekms.v1 import common_pb2 as pb
from tests.contract.conftest import KeyCache, require_key_type

ENCRYPT = KeyCreateOptions(usage=pb.KEY_USAGE_ENCRYPT_DECRYPT)
AAD = bound_aad("contract/enc", 1, b"volume=data")


@pytest.fixture(scope="module")
def rsa_key(provider: Provider) -> Iterator[tuple[bytes, bytes]]:
    """An RSA-2048 key made for encryption: (key_id, SubjectPublicKeyInfo)."""
    require_key_type(provider, pb.KEY_TYPE_RSA_2048)
    key_id = secrets.token_bytes(16)
    made = provider.generate(key_id, "contract/enc-rsa", pb.KEY_TYPE_RSA_2048, ENCRYPT)
    yield made.key_id, made.public_key_der
    provider.destroy(key_id)


def _oaep(aad: bytes) -> padding.OAEP:
    return padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=oaep_label(aad)
    )


def test_aes_round_trip_binds_the_aad(provider: Provider, key_cache: KeyCache) -> None:
    require_key_type(provider, pb.KEY_TYPE_AES_256)
    key_id, _ = key_cache.get(pb.KEY_TYPE_AES_256)
    plaintext = secrets.token_bytes(4096)
    sealed = provider.encrypt(key_id, plaintext, AAD)
    assert sealed.algorithm in (
        pb.ENCRYPTION_ALGORITHM_AES_256_GCM,
        pb.ENCRYPTION_ALGORITHM_TPM_HMAC_AES_256_GCM,
    )
    assert plaintext not in sealed.ciphertext
    assert len(sealed.ciphertext) == len(plaintext) + 16  # the GCM tag
    again = provider.encrypt(key_id, plaintext, AAD)
    assert again.nonce != sealed.nonce and again.ciphertext != sealed.ciphertext
    args = (key_id, sealed.algorithm, sealed.nonce)
    assert provider.decrypt(*args, sealed.ciphertext, AAD) == plaintext


def test_aes_empty_plaintext_round_trips(provider: Provider, key_cache: KeyCache) -> None:
    require_key_type(provider, pb.KEY_TYPE_AES_256)
    key_id, _ = key_cache.get(pb.KEY_TYPE_AES_256)
    sealed = provider.encrypt(key_id, b"", b"")
    assert provider.decrypt(key_id, sealed.algorithm, sealed.nonce, sealed.ciphertext, b"") == b""


AES_TAMPERING: dict[str, Callable[[bytes, bytes, bytes], tuple[bytes, bytes, bytes]]] = {
    "wrong_aad": lambda n, c, a: (n, c, a + b"!"),
    "no_aad": lambda n, c, a: (n, c, b""),
    "flipped_tag_bit": lambda n, c, a: (n, c[:-1] + bytes((c[-1] ^ 1,)), a),
    "flipped_body_bit": lambda n, c, a: (n, bytes((c[0] ^ 0x80,)) + c[1:], a),
    "other_nonce": lambda n, c, a: (bytes(len(n)), c, a),
    "short_nonce": lambda n, c, a: (n[:4], c, a),
    "truncated": lambda n, c, a: (n, c[:10], a),
}


@pytest.mark.parametrize("case", sorted(AES_TAMPERING))
def test_aes_tampering_is_decrypt_failed(
    provider: Provider, key_cache: KeyCache, case: str
) -> None:
    require_key_type(provider, pb.KEY_TYPE_AES_256)
    key_id, _ = key_cache.get(pb.KEY_TYPE_AES_256)
    sealed = provider.encrypt(key_id, b"a secret", AAD)
    nonce, body, aad = AES_TAMPERING[case](sealed.nonce, sealed.ciphertext, AAD)
    with pytest.raises(InvalidArgument) as refused:
        provider.decrypt(key_id, sealed.algorithm, nonce, body, aad)
    assert refused.value.reason == "decrypt.failed"
    # The key is as it was.
    assert provider.decrypt(key_id, sealed.algorithm, sealed.nonce, sealed.ciphertext, AAD)


def test_aes_ciphertext_of_another_key_fails(provider: Provider, key_cache: KeyCache) -> None:
    require_key_type(provider, pb.KEY_TYPE_AES_256)
    key_id, _ = key_cache.get(pb.KEY_TYPE_AES_256)
    other = secrets.token_bytes(16)
    provider.generate(other, "contract/enc-other", pb.KEY_TYPE_AES_256, KeyCreateOptions())
    try:
        sealed = provider.encrypt(other, b"for the other key", AAD)
        with pytest.raises(InvalidArgument) as refused:
            provider.decrypt(key_id, sealed.algorithm, sealed.nonce, sealed.ciphertext, AAD)
        assert refused.value.reason == "decrypt.failed"
    finally:
        provider.destroy(other)
    with pytest.raises(NotFound):
        provider.encrypt(other, b"x", b"")


def test_aes_algorithm_mismatch_is_refused(provider: Provider, key_cache: KeyCache) -> None:
    require_key_type(provider, pb.KEY_TYPE_AES_256)
    key_id, _ = key_cache.get(pb.KEY_TYPE_AES_256)
    sealed = provider.encrypt(key_id, b"x", AAD)
    with pytest.raises(InvalidArgument) as refused:
        provider.decrypt(
            key_id, pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256, sealed.nonce, sealed.ciphertext, AAD
        )
    assert refused.value.reason == "decrypt.algorithm_mismatch"


def test_rsa_oaep_round_trip_and_interop(provider: Provider, rsa_key: tuple[bytes, bytes]) -> None:
    key_id, der = rsa_key
    sealed = provider.encrypt(key_id, b"a data key, 32 bytes long.......", AAD)
    assert sealed.algorithm == pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256
    assert len(sealed.ciphertext) == 256
    assert provider.decrypt(key_id, sealed.algorithm, b"", sealed.ciphertext, AAD) == (
        b"a data key, 32 bytes long......."
    )
    # What cryptography encrypts with the public key, the token decrypts: standard OAEP.
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    theirs = public.encrypt(b"from cryptography", _oaep(AAD))
    assert provider.decrypt(key_id, sealed.algorithm, b"", theirs, AAD) == b"from cryptography"


RSA_TAMPERING: dict[str, Callable[[bytes, bytes], tuple[bytes, bytes]]] = {
    "wrong_aad": lambda c, a: (c, a + b"!"),
    "flipped_bit": lambda c, a: (c[:-1] + bytes((c[-1] ^ 1,)), a),
    "short_block": lambda c, a: (c[:-1], a),
    "all_ones_above_the_modulus": lambda c, a: (b"\xff" * len(c), a),
}


@pytest.mark.parametrize("case", sorted(RSA_TAMPERING))
def test_rsa_tampering_is_decrypt_failed(
    provider: Provider, rsa_key: tuple[bytes, bytes], case: str
) -> None:
    key_id, _ = rsa_key
    sealed = provider.encrypt(key_id, b"secret", AAD)
    body, aad = RSA_TAMPERING[case](sealed.ciphertext, AAD)
    with pytest.raises(InvalidArgument) as refused:
        provider.decrypt(key_id, sealed.algorithm, b"", body, aad)
    assert refused.value.reason == "decrypt.failed"
    assert provider.decrypt(key_id, sealed.algorithm, b"", sealed.ciphertext, AAD) == b"secret"


def test_rsa_plaintext_over_the_block_is_refused(
    provider: Provider, rsa_key: tuple[bytes, bytes]
) -> None:
    key_id, _ = rsa_key
    with pytest.raises(InvalidArgument) as refused:
        provider.encrypt(key_id, bytes(2048 // 8 - 2 * 32 - 1), b"")
    assert refused.value.reason == "encrypt.plaintext_too_large"
    assert provider.encrypt(key_id, bytes(2048 // 8 - 2 * 32 - 2), b"")


def test_signing_key_cannot_encrypt(provider: Provider, key_cache: KeyCache) -> None:
    require_key_type(provider, pb.KEY_TYPE_RSA_2048)
    key_id, _ = key_cache.get(pb.KEY_TYPE_RSA_2048)  # made with the default usage: signing
    with pytest.raises(KMSError) as refused:
        provider.encrypt(key_id, b"x", b"")
    assert refused.value.reason == "key.usage_mismatch"
    with pytest.raises(KMSError) as refused_decrypt:
        provider.decrypt(key_id, pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256, b"", bytes(256), b"")
    assert refused_decrypt.value.reason == "key.usage_mismatch"


def test_unknown_key_is_not_found(provider: Provider) -> None:
    with pytest.raises(NotFound):
        provider.encrypt(secrets.token_bytes(16), b"x", b"")
    with pytest.raises(NotFound):
        provider.decrypt(
            secrets.token_bytes(16), pb.ENCRYPTION_ALGORITHM_AES_256_GCM, bytes(12), bytes(32), b""
        )
