"""RSA-OAEP padding (RFC 8017 section 7.1, SHA-256 and MGF1-SHA-256) around raw RSA.

Why here and not in the token: SoftHSM 2.6 implements CKM_RSA_PKCS_OAEP with SHA-1 only
(any other hashAlg is CKR_ARGUMENTS_BAD), and we want SHA-256 with a label. So the token
does the private-key operation (CKM_RSA_X_509, the key never leaves it) and this module
does the padding. Decoding reports every failure the same way, after the same work, so
that a caller cannot tell which check failed (Manger's attack needs that distinction).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

HASH_LEN = 32


class OaepError(Exception):
    """The block is not a valid OAEP encoding for this label (deliberately unspecific)."""


def _mgf1(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def max_message(modulus_bytes: int) -> int:
    return modulus_bytes - 2 * HASH_LEN - 2


def encode(message: bytes, label: bytes, modulus_bytes: int) -> bytes:
    """EME-OAEP encoding: the k-byte block that raw RSA then encrypts."""
    k = modulus_bytes
    if len(message) > max_message(k):
        raise ValueError(f"message too long for a {k * 8}-bit RSA-OAEP block")
    l_hash = hashlib.sha256(label).digest()
    ps = bytes(k - len(message) - 2 * HASH_LEN - 2)
    db = l_hash + ps + b"\x01" + message
    seed = secrets.token_bytes(HASH_LEN)
    masked_db = _xor(db, _mgf1(seed, k - HASH_LEN - 1))
    masked_seed = _xor(seed, _mgf1(masked_db, HASH_LEN))
    return b"\x00" + masked_seed + masked_db


def decode(block: bytes, label: bytes, modulus_bytes: int) -> bytes:
    """EME-OAEP decoding of the raw RSA result; OaepError for anything invalid."""
    k = modulus_bytes
    if len(block) != k or k < 2 * HASH_LEN + 2:
        raise OaepError()
    l_hash = hashlib.sha256(label).digest()
    y = block[0]
    masked_seed = block[1 : 1 + HASH_LEN]
    masked_db = block[1 + HASH_LEN :]
    seed = _xor(masked_seed, _mgf1(masked_db, HASH_LEN))
    db = _xor(masked_db, _mgf1(seed, k - HASH_LEN - 1))
    good = hmac.compare_digest(db[:HASH_LEN], l_hash) & (y == 0)
    # Find the 0x01 separator without branching on where it is.
    index = 0
    looking = 1
    bad_padding = 0
    for pos in range(HASH_LEN, len(db)):
        byte = db[pos]
        is_one = int(byte == 1)
        is_zero = int(byte == 0)
        index |= pos * (looking & is_one)
        bad_padding |= looking & (1 - is_one) & (1 - is_zero)
        looking &= 1 - is_one
    if not good or looking or bad_padding:
        raise OaepError()
    return db[index + 1 :]
