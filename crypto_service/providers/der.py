"""The few DER structures a token's raw output must be wrapped in before it leaves the service.

Tokens hand back bare numbers: ECDSA signatures as r||s, public keys as a point or as
modulus and exponent. Clients expect X9.62 DER signatures and SubjectPublicKeyInfo.
These encodings are fixed and tiny, so they are written out here rather than pulling
cryptography (~11 MB resident) or asn1crypto (~13 MB) into a service that otherwise
needs neither; the tests check every one against cryptography's own output.
"""

from __future__ import annotations

# AlgorithmIdentifier OIDs (DER, with tag) of SubjectPublicKeyInfo.
_EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
_RSA_ENCRYPTION_OID = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
_ED25519_OID = bytes.fromhex("06032b6570")  # 1.3.101.112
_NULL = b"\x05\x00"

# Named curves, as CKA_EC_PARAMS and SubjectPublicKeyInfo carry them: DER OID -> field bytes.
P256_OID = bytes.fromhex("06082a8648ce3d030107")  # secp256r1
P384_OID = bytes.fromhex("06052b81040022")  # secp384r1
CURVE_SIZES = {P256_OID: 32, P384_OID: 48}


def tlv(tag: int, body: bytes) -> bytes:
    """One DER element: tag, definite length (short or long form), contents."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def integer(value: int) -> bytes:
    """A non-negative INTEGER: minimal big-endian, a 0x00 first when the top bit is set."""
    if value < 0:
        raise ValueError("negative INTEGER")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return tlv(0x02, body)


def _bit_string(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)  # no unused bits


def ecdsa_signature(raw: bytes) -> bytes:
    """ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } from a token's r||s."""
    if not raw or len(raw) % 2:
        raise ValueError("ECDSA signature is not r||s of equal halves")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return tlv(0x30, integer(r) + integer(s))


def ec_public_key_info(curve_oid: bytes, point: bytes) -> bytes:
    """SubjectPublicKeyInfo of an uncompressed point (0x04 || x || y) on a named curve."""
    size = CURVE_SIZES.get(curve_oid)
    if size is None:
        raise ValueError("unknown curve")
    if len(point) != 1 + 2 * size or point[0] != 0x04:
        raise ValueError("EC point is not an uncompressed point of this curve")
    algorithm = tlv(0x30, _EC_PUBLIC_KEY_OID + curve_oid)
    return tlv(0x30, algorithm + _bit_string(point))


def rsa_public_key_info(modulus: int, exponent: int) -> bytes:
    """SubjectPublicKeyInfo of an RSA key: rsaEncryption, NULL, RSAPublicKey { n, e }."""
    if modulus <= 0 or exponent <= 0:
        raise ValueError("RSA modulus and exponent must be positive")
    algorithm = tlv(0x30, _RSA_ENCRYPTION_OID + _NULL)
    key = tlv(0x30, integer(modulus) + integer(exponent))
    return tlv(0x30, algorithm + _bit_string(key))


def ed25519_public_key_info(public: bytes) -> bytes:
    """SubjectPublicKeyInfo of an Ed25519 key (RFC 8410: no parameters)."""
    if len(public) != 32:
        raise ValueError("Ed25519 public key is not 32 bytes")
    return tlv(0x30, tlv(0x30, _ED25519_OID) + _bit_string(public))
