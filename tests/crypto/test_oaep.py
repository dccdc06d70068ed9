"""RSA-OAEP padding (crypto_service/providers/oaep.py) against cryptography's OAEP, with
raw RSA done in Python here: pure logic, so no token is needed."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from crypto_service.providers import oaep

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
N = KEY.public_key().public_numbers().n
E = KEY.public_key().public_numbers().e
D = KEY.private_numbers().d
K = 256


def _raw_decrypt(ciphertext: bytes) -> bytes:
    return pow(int.from_bytes(ciphertext, "big"), D, N).to_bytes(K, "big")


def _raw_encrypt(block: bytes) -> bytes:
    return pow(int.from_bytes(block, "big"), E, N).to_bytes(K, "big")


def _theirs(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


@pytest.mark.parametrize("size", [0, 1, 32, oaep.max_message(K)])
def test_decode_reads_what_cryptography_encrypts(size: int) -> None:
    message = secrets.token_bytes(size)
    ciphertext = KEY.public_key().encrypt(message, _theirs(b"label\x00"))
    assert oaep.decode(_raw_decrypt(ciphertext), b"label\x00", K) == message


@pytest.mark.parametrize("size", [0, 1, 32, oaep.max_message(K)])
def test_cryptography_reads_what_encode_makes(size: int) -> None:
    message = secrets.token_bytes(size)
    block = oaep.encode(message, b"lbl", K)
    assert KEY.decrypt(_raw_encrypt(block), _theirs(b"lbl")) == message


def test_wrong_label_and_damage_are_one_error() -> None:
    block = _raw_decrypt(KEY.public_key().encrypt(b"m", _theirs(b"a")))
    with pytest.raises(oaep.OaepError):
        oaep.decode(block, b"b", K)
    for damaged in (b"\x01" + block[1:], block[:40] + bytes((block[40] ^ 1,)) + block[41:]):
        with pytest.raises(oaep.OaepError):
            oaep.decode(damaged, b"a", K)
    with pytest.raises(oaep.OaepError):
        oaep.decode(block[1:], b"a", K)
    with pytest.raises(oaep.OaepError):
        oaep.decode(bytes(K), b"a", K)


def test_encode_refuses_a_message_over_the_block() -> None:
    with pytest.raises(ValueError):
        oaep.encode(bytes(oaep.max_message(K) + 1), b"", K)
