"""What each key type and signature scheme means, in one table every service shares.

The broker validates requests with it before they reach a token, the crypto service
checks them again (it trusts nobody on the bus), and clients use it to hash the right
way. Verification in software lives here too: it needs only the public key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from edgekms.errors import InvalidArgument
from edgekms.v1 import common_pb2 as pb

# cryptography is imported where software hashing or verification happens, not here:
# the tables and request checks are on every service's hot path, and the PKCS#11 crypto
# service otherwise never loads cryptography (~11 MB resident).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

KeyType: TypeAlias = pb.KeyType.ValueType
SignatureAlgorithm: TypeAlias = pb.SignatureAlgorithm.ValueType


@dataclass(frozen=True)
class KeyTypeInfo:
    key_type: KeyType
    cli_name: str  # "ec-p256", as kmsctl spells it
    family: str  # "ec", "rsa", "ed25519"
    bits: int  # curve size or modulus length
    default_algorithm: SignatureAlgorithm


@dataclass(frozen=True)
class AlgorithmInfo:
    algorithm: SignatureAlgorithm
    cli_name: str
    family: str
    hash_name: str | None  # None for pure Ed25519
    digest_size: int  # 0 when the data is a message
    pss: bool = False

    def hash(self) -> hashes.HashAlgorithm:
        if self.hash_name is None:
            raise InvalidArgument("sign.no_hash", f"{self.cli_name} signs the message itself")
        from cryptography.hazmat.primitives import hashes

        hash_types: dict[str, type[hashes.HashAlgorithm]] = {
            "sha256": hashes.SHA256,
            "sha384": hashes.SHA384,
            "sha512": hashes.SHA512,
        }
        return hash_types[self.hash_name]()


KEY_TYPES: dict[KeyType, KeyTypeInfo] = {
    k.key_type: k
    for k in (
        KeyTypeInfo(pb.KEY_TYPE_EC_P256, "ec-p256", "ec", 256, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256),
        KeyTypeInfo(pb.KEY_TYPE_EC_P384, "ec-p384", "ec", 384, pb.SIGNATURE_ALGORITHM_ECDSA_SHA384),
        KeyTypeInfo(
            pb.KEY_TYPE_RSA_2048, "rsa-2048", "rsa", 2048, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
        ),
        KeyTypeInfo(
            pb.KEY_TYPE_RSA_3072, "rsa-3072", "rsa", 3072, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
        ),
        KeyTypeInfo(
            pb.KEY_TYPE_RSA_4096, "rsa-4096", "rsa", 4096, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
        ),
        KeyTypeInfo(pb.KEY_TYPE_ED25519, "ed25519", "ed25519", 255, pb.SIGNATURE_ALGORITHM_ED25519),
        # Symmetric: encrypts and decrypts, never signs (no signature algorithm fits it).
        KeyTypeInfo(pb.KEY_TYPE_AES_256, "aes-256", "aes", 256, pb.SIGNATURE_ALGORITHM_UNSPECIFIED),
    )
}

ALGORITHMS: dict[SignatureAlgorithm, AlgorithmInfo] = {
    a.algorithm: a
    for a in (
        AlgorithmInfo(pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, "ecdsa-sha256", "ec", "sha256", 32),
        AlgorithmInfo(pb.SIGNATURE_ALGORITHM_ECDSA_SHA384, "ecdsa-sha384", "ec", "sha384", 48),
        AlgorithmInfo(pb.SIGNATURE_ALGORITHM_ECDSA_SHA512, "ecdsa-sha512", "ec", "sha512", 64),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, "rsa-pkcs1-sha256", "rsa", "sha256", 32
        ),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384, "rsa-pkcs1-sha384", "rsa", "sha384", 48
        ),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512, "rsa-pkcs1-sha512", "rsa", "sha512", 64
        ),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, "rsa-pss-sha256", "rsa", "sha256", 32, True
        ),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384, "rsa-pss-sha384", "rsa", "sha384", 48, True
        ),
        AlgorithmInfo(
            pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512, "rsa-pss-sha512", "rsa", "sha512", 64, True
        ),
        AlgorithmInfo(pb.SIGNATURE_ALGORITHM_ED25519, "ed25519", "ed25519", None, 0),
    )
}

KEY_TYPE_BY_CLI = {k.cli_name: k for k in KEY_TYPES.values()}
ALGORITHM_BY_CLI = {a.cli_name: a for a in ALGORITHMS.values()}

# Largest message Ed25519 accepts through the KMS: the NATS payload limit minus room.
MAX_MESSAGE_SIZE = 64 * 1024


# Encrypt/Decrypt limits: a plaintext fits one bus message with room to spare; AAD is
# context (a volume name, a device id), not data.
MAX_PLAINTEXT = 64 * 1024
MAX_AAD = 8 * 1024

KeyUsage: TypeAlias = pb.KeyUsage.ValueType
EncryptionAlgorithm: TypeAlias = pb.EncryptionAlgorithm.ValueType


def key_usage(key_type: KeyType, usage: KeyUsage) -> KeyUsage:
    """The usage a key has: what its record says, or the default for its type (records
    made before usages existed are signing keys, AES keys can only encrypt)."""
    if usage != pb.KEY_USAGE_UNSPECIFIED:
        return usage
    if key_type == pb.KEY_TYPE_AES_256:
        return pb.KEY_USAGE_ENCRYPT_DECRYPT
    return pb.KEY_USAGE_SIGN_VERIFY


def check_usage(key_type: KeyType, usage: KeyUsage) -> KeyUsage:
    """Refuse a usage a key type cannot have; return the effective usage."""
    if usage not in pb.KeyUsage.values():
        raise InvalidArgument("key.usage_unknown", f"unknown key usage {usage}")
    effective = key_usage(key_type, usage)
    family = key_type_info(key_type).family
    if effective == pb.KEY_USAGE_ENCRYPT_DECRYPT and family not in ("aes", "rsa"):
        raise InvalidArgument(
            "key.usage_unsupported",
            f"{key_type_info(key_type).cli_name} keys cannot encrypt; use aes-256 or rsa-*",
        )
    if effective == pb.KEY_USAGE_SIGN_VERIFY and family == "aes":
        raise InvalidArgument("key.usage_unsupported", "aes-256 keys cannot sign")
    return effective


def check_encrypt_request(key_type: KeyType, usage: KeyUsage, plaintext: bytes, aad: bytes) -> None:
    """Refuse an Encrypt no token should see: a signing key, an oversized input."""
    if key_usage(key_type, usage) != pb.KEY_USAGE_ENCRYPT_DECRYPT:
        raise InvalidArgument(
            "key.usage_mismatch",
            f"this {key_type_info(key_type).cli_name} key signs; it cannot encrypt or decrypt",
            {"usage": "sign-verify"},
        )
    if len(plaintext) > MAX_PLAINTEXT:
        raise InvalidArgument(
            "encrypt.plaintext_too_large",
            f"plaintexts are limited to {MAX_PLAINTEXT} bytes, got {len(plaintext)}",
            {"max_bytes": str(MAX_PLAINTEXT), "got": str(len(plaintext))},
        )
    check_aad(aad)


def check_aad(aad: bytes) -> None:
    if len(aad) > MAX_AAD:
        raise InvalidArgument(
            "encrypt.aad_too_large",
            f"additional authenticated data is limited to {MAX_AAD} bytes, got {len(aad)}",
            {"max_bytes": str(MAX_AAD)},
        )


def key_type_info(key_type: KeyType) -> KeyTypeInfo:
    try:
        return KEY_TYPES[key_type]
    except KeyError:
        raise InvalidArgument("key.type_unknown", f"unknown key type {key_type}") from None


def algorithm_info(algorithm: SignatureAlgorithm) -> AlgorithmInfo:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise InvalidArgument(
            "sign.algorithm_unknown", f"unknown signature algorithm {algorithm}"
        ) from None


def check_sign_request(
    key_type: KeyType, algorithm: SignatureAlgorithm, data: bytes
) -> AlgorithmInfo:
    """Refuse a request that no token should see: wrong scheme for the key, wrong length."""
    kinfo = key_type_info(key_type)
    if algorithm == pb.SIGNATURE_ALGORITHM_UNSPECIFIED:
        raise InvalidArgument("sign.algorithm_missing", "a signature algorithm is required")
    ainfo = algorithm_info(algorithm)
    if ainfo.family != kinfo.family:
        raise InvalidArgument(
            "sign.algorithm_mismatch",
            f"{ainfo.cli_name} cannot be used with a {kinfo.cli_name} key",
        )
    if not data:
        raise InvalidArgument("sign.data_missing", "nothing to sign: data is empty")
    if ainfo.digest_size and len(data) != ainfo.digest_size:
        raise InvalidArgument(
            "sign.digest_length",
            f"{ainfo.cli_name} needs a {ainfo.digest_size}-byte digest, got {len(data)} bytes",
            {"expected": str(ainfo.digest_size), "got": str(len(data))},
        )
    if not ainfo.digest_size and len(data) > MAX_MESSAGE_SIZE:
        raise InvalidArgument(
            "sign.message_too_large", f"messages are limited to {MAX_MESSAGE_SIZE} bytes"
        )
    return ainfo


def key_type_of_public_key(public_key_der: bytes) -> KeyType:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = serialization.load_der_public_key(public_key_der)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": pb.KEY_TYPE_EC_P256, "secp384r1": pb.KEY_TYPE_EC_P384}.get(
            key.curve.name, pb.KEY_TYPE_UNSPECIFIED
        )
    if isinstance(key, rsa.RSAPublicKey):
        return {
            2048: pb.KEY_TYPE_RSA_2048,
            3072: pb.KEY_TYPE_RSA_3072,
            4096: pb.KEY_TYPE_RSA_4096,
        }.get(key.key_size, pb.KEY_TYPE_UNSPECIFIED)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return pb.KEY_TYPE_ED25519
    return pb.KEY_TYPE_UNSPECIFIED


def pss_padding(ainfo: AlgorithmInfo) -> padding.PSS:
    """PSS as EdgeKMS signs it: MGF1 with the message hash, salt length = digest length."""
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PSS(mgf=padding.MGF1(ainfo.hash()), salt_length=ainfo.digest_size)


def verify_signature(
    public_key_der: bytes, algorithm: SignatureAlgorithm, data: bytes, signature: bytes
) -> bool:
    """Check a signature in software. `data` is the digest (or the Ed25519 message)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    ainfo = algorithm_info(algorithm)
    key = serialization.load_der_public_key(public_key_der)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and ainfo.family == "ec":
            key.verify(signature, data, ec.ECDSA(Prehashed(ainfo.hash())))
        elif isinstance(key, rsa.RSAPublicKey) and ainfo.family == "rsa":
            pad: padding.AsymmetricPadding = pss_padding(ainfo) if ainfo.pss else padding.PKCS1v15()
            key.verify(signature, data, pad, Prehashed(ainfo.hash()))
        elif isinstance(key, ed25519.Ed25519PublicKey) and ainfo.family == "ed25519":
            key.verify(signature, data)
        else:
            raise InvalidArgument(
                "verify.algorithm_mismatch", f"{ainfo.cli_name} does not fit this key"
            )
    except InvalidSignature:
        return False
    return True
