"""The one small protocol every key provider implements (PKCS#11 token, TPM 2.0).

A provider is synchronous and blocking: token calls block, so the service runs them on
worker threads (a bounded pool for PKCS#11 sessions, a single queue for a TPM). The
service validates requests with edgekms.algorithms before calling a provider; providers
raise edgekms.errors types and never return half-made keys: if generation fails midway
they remove what they created before raising.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from edgekms.algorithms import EncryptionAlgorithm, KeyType, KeyUsage, SignatureAlgorithm
from edgekms.subjects import KEY_CLASS_CA, KEY_CLASS_INTERNAL, KEY_CLASS_USER, KEY_CLASSES
from edgekms.v1 import common_pb2 as pb


@dataclass(frozen=True)
class GeneratedKey:
    key_id: bytes
    public_key_der: bytes  # SubjectPublicKeyInfo


@dataclass(frozen=True)
class StoredKey:
    key_id: bytes
    label: str
    key_type: KeyType


@dataclass(frozen=True)
class KeyCreateOptions:
    """Provider-specific options; a provider that cannot honour one refuses the create."""

    pcr_indexes: tuple[int, ...] = ()
    require_auth: bool = False
    # The key's class (edgekms.subjects.KEY_CLASSES), stored with the key by the provider
    # and read back by the crypto service on every use: the class of the subject the
    # GenerateKey came in on, never a field of the request.
    key_class: str = KEY_CLASS_USER
    # KEY_USAGE_ENCRYPT_DECRYPT makes an RSA key that decrypts (RSA-OAEP) and cannot sign;
    # UNSPECIFIED is the type's default (edgekms.algorithms.key_usage).
    usage: KeyUsage = pb.KEY_USAGE_UNSPECIFIED


@dataclass(frozen=True)
class Sealed:
    """What `Provider.encrypt` returns: the algorithm it used, its nonce, the ciphertext."""

    algorithm: EncryptionAlgorithm
    nonce: bytes
    ciphertext: bytes


def legacy_key_class(label: str) -> str:
    """The class of a key made before classes were stored (no class in its record).

    Migration by name, documented in docs/security.md: `edgekms/...` was only ever made by
    the ceremony, `ca/...` by the CA service; everything else was a broker's user key.
    """
    if label.startswith("edgekms/"):
        return KEY_CLASS_INTERNAL
    if label.startswith("ca/"):
        return KEY_CLASS_CA
    return KEY_CLASS_USER


def check_key_class(key_class: str) -> str:
    if key_class not in KEY_CLASSES:
        raise ValueError(f"unknown key class {key_class!r}")
    return key_class


@dataclass(frozen=True)
class Attestation:
    format: str
    attestation: bytes
    signature: bytes
    signature_algorithm: SignatureAlgorithm
    attestation_key_der: bytes
    key_public_area: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    """What a crypto service needs from a token.

    Errors: NotFound for an unknown key_id, AlreadyExists for a reused key_id,
    FailedPrecondition for a key type the token lacks, Unavailable when the token is
    unreachable, InvalidArgument for requests the token rejects as malformed.
    """

    kind: str  # "pkcs11", "tpm2"

    def key_types(self) -> frozenset[KeyType]:
        """Key types this token can generate."""
        ...

    def generate(
        self, key_id: bytes, label: str, key_type: KeyType, options: KeyCreateOptions
    ) -> GeneratedKey: ...

    def public_key(self, key_id: bytes) -> tuple[bytes, KeyType]:
        """SubjectPublicKeyInfo DER and the key's type."""
        ...

    def sign(self, key_id: bytes, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        """Sign a digest (or an Ed25519 message); ECDSA results are DER-encoded."""
        ...

    def key_class(self, key_id: bytes) -> str:
        """The class stored with the key at generation (legacy_key_class for older keys);
        NotFound for an unknown key_id."""
        ...

    def destroy(self, key_id: bytes) -> None: ...

    def list_keys(self) -> list[StoredKey]: ...

    def attest(self, key_id: bytes, nonce: bytes) -> Attestation:
        """Hardware evidence for the key; FailedPrecondition where the token has none."""
        ...

    def encrypt(self, key_id: bytes, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt under an AES-256 key (AEAD over `aad`) or an encrypt-usage RSA key
        (RSA-OAEP SHA-256, label edgekms.envelope.oaep_label(aad)); the provider picks the
        nonce. InvalidArgument key.usage_mismatch for a key that cannot encrypt."""
        ...

    def decrypt(
        self,
        key_id: bytes,
        algorithm: EncryptionAlgorithm,
        nonce: bytes,
        ciphertext: bytes,
        aad: bytes,
    ) -> bytes:
        """The plaintext; InvalidArgument decrypt.failed when the ciphertext, nonce or AAD
        is not what the key made (one reason for all: no oracle), decrypt.algorithm_mismatch
        when `algorithm` is not this key's."""
        ...

    def close(self) -> None: ...


T = TypeVar("T")


@runtime_checkable
class RunsSerially(Protocol):
    """A provider whose token takes one command at a time, from a thread of its own (the
    TPM). Optional: the crypto service hands such a provider a whole batch of signs in
    one call, so the batch costs one thread hand-off instead of one per signature."""

    def run_serially(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the token's thread; calls to the provider inside it run directly."""
        ...
