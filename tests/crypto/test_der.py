"""providers/der.py against cryptography: the hand-written DER must be byte-for-byte what
cryptography writes, for every key type and for signatures whose r or s has a high bit
set or leading zeros (the cases a careless INTEGER encoder gets wrong)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from crypto_service.providers import der

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("curve", "oid"), [(ec.SECP256R1(), der.P256_OID), (ec.SECP384R1(), der.P384_OID)]
)
def test_ec_public_key_info_matches_cryptography(curve: ec.EllipticCurve, oid: bytes) -> None:
    for _ in range(5):
        public = ec.generate_private_key(curve).public_key()
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert der.ec_public_key_info(oid, point) == public.public_bytes(*SPKI)


@pytest.mark.parametrize("bits", [2048, 3072])
def test_rsa_public_key_info_matches_cryptography(bits: int) -> None:
    public = rsa.generate_private_key(65537, bits).public_key()
    numbers = public.public_numbers()
    assert der.rsa_public_key_info(numbers.n, numbers.e) == public.public_bytes(*SPKI)
    # A 4096-bit modulus needs a two-byte length (long form) at several levels.
    big = rsa.RSAPublicNumbers(3, (1 << 4095) | 12345).public_key()
    assert der.rsa_public_key_info(big.public_numbers().n, 3) == big.public_bytes(*SPKI)


def test_ed25519_public_key_info_matches_cryptography() -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert der.ed25519_public_key_info(raw) == public.public_bytes(*SPKI)


@pytest.mark.parametrize(
    ("r", "s"),
    [
        (1, 1),
        (0, 0x7F),
        (0x80, 0xFF),  # high bit set: needs a 0x00 before it
        ((1 << 255) + 7, (1 << 247) - 1),  # a 33-byte INTEGER and one with a leading zero byte
        ((1 << 256) - 1, 1 << 200),
    ],
)
def test_ecdsa_signature_matches_cryptography(r: int, s: int) -> None:
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert der.ecdsa_signature(raw) == encode_dss_signature(r, s)


def test_ecdsa_signature_of_a_real_p384_signature_verifies() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    digest = bytes(range(48))
    r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA384()))))
    signature = der.ecdsa_signature(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    key.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA384())))


def test_long_form_lengths() -> None:
    assert der.tlv(0x04, b"x" * 0x7F)[:2] == b"\x04\x7f"
    assert der.tlv(0x04, b"x" * 0x80)[:3] == b"\x04\x81\x80"
    assert der.tlv(0x04, b"x" * 0x100)[:4] == b"\x04\x82\x01\x00"


@pytest.mark.parametrize(
    "call",
    [
        lambda: der.ecdsa_signature(b""),
        lambda: der.ecdsa_signature(b"\x01\x02\x03"),
        lambda: der.ec_public_key_info(der.P256_OID, b"\x04" + b"\x00" * 63),  # short
        lambda: der.ec_public_key_info(der.P256_OID, b"\x02" + b"\x00" * 64),  # not uncompressed
        lambda: der.ec_public_key_info(b"\x06\x01\x00", b"\x04" + b"\x00" * 64),  # unknown curve
        lambda: der.rsa_public_key_info(0, 65537),
        lambda: der.ed25519_public_key_info(b"\x00" * 31),
        lambda: der.integer(-1),
    ],
)
def test_bad_input_is_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()
