"""The ciphertext envelope: what Encrypt returns and Decrypt takes, self-describing.

A ciphertext must say which key and which version of it made it, so that a key can be
rotated while older ciphertexts stay decryptable, and which algorithm and nonce, so that
nothing about it has to be remembered elsewhere. Layout (big-endian):

    magic    4 bytes  b"EKE1"
    alg      1 byte   EncryptionAlgorithm
    version  4 bytes  key version (1, 2, ...)
    name     1 byte length + ASCII key name (a registry name: at most 128 characters)
    nonce    1 byte length + the provider's nonce (12 bytes for AES-256-GCM)
    body     the rest: ciphertext || 16-byte tag, or the RSA-OAEP block

The header is not secret, but it is authenticated: the provider is given
`bound_aad(name, version, aad)` as its additional data (GCM AAD; for RSA-OAEP the label
`oaep_label(...)`), so a ciphertext whose name or version was edited, or that is presented
for another key, or with other AAD, fails to decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from edgekms.errors import InvalidArgument
from edgekms.v1 import common_pb2 as pb

MAGIC = b"EKE1"
_FIXED = struct.Struct(">4sBI")
# The largest plaintext (64 KiB), plus header and an RSA-4096 block: anything longer is
# not one of ours.
MAX_ENVELOPE = 64 * 1024 + 1024
MAX_NAME = 128
MAX_NONCE = 64
# Everything Decrypt refuses because the bytes are not an envelope says this reason.
MALFORMED = "decrypt.ciphertext_malformed"


@dataclass(frozen=True)
class Envelope:
    algorithm: pb.EncryptionAlgorithm.ValueType
    key_name: str
    key_version: int
    nonce: bytes
    body: bytes

    def encode(self) -> bytes:
        name = self.key_name.encode("ascii")
        if not 0 < len(name) <= MAX_NAME or len(self.nonce) > MAX_NONCE:
            raise ValueError("envelope name or nonce out of range")
        return (
            _FIXED.pack(MAGIC, self.algorithm, self.key_version)
            + bytes((len(name),))
            + name
            + bytes((len(self.nonce),))
            + self.nonce
            + self.body
        )


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(MALFORMED, f"the ciphertext is not an EdgeKMS envelope: {why}")


def decode(data: bytes) -> Envelope:
    """Parse an envelope; InvalidArgument(decrypt.ciphertext_malformed) for anything else."""
    if len(data) > MAX_ENVELOPE:
        raise _malformed(f"longer than {MAX_ENVELOPE} bytes")
    if len(data) < _FIXED.size + 2:
        raise _malformed("too short")
    magic, algorithm, version = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise _malformed("wrong magic")
    if algorithm not in pb.EncryptionAlgorithm.values() or algorithm == 0:
        raise _malformed(f"unknown algorithm {algorithm}")
    if version == 0:
        raise _malformed("key version 0")
    at = _FIXED.size
    name_len = data[at]
    at += 1
    if not 0 < name_len <= MAX_NAME or len(data) < at + name_len + 1:
        raise _malformed("bad key name length")
    try:
        name = data[at : at + name_len].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed("key name is not ASCII") from None
    at += name_len
    nonce_len = data[at]
    at += 1
    if nonce_len > MAX_NONCE or len(data) < at + nonce_len + 1:
        raise _malformed("bad nonce length")
    nonce = data[at : at + nonce_len]
    body = data[at + nonce_len :]
    return Envelope(algorithm, name, version, nonce, body)  # type: ignore[arg-type]


def bound_aad(key_name: str, key_version: int, aad: bytes) -> bytes:
    """The additional data a provider authenticates: the envelope's identity (length-
    delimited, so no two (name, version, aad) give the same bytes) and the caller's AAD."""
    name = key_name.encode("ascii")
    return MAGIC + struct.pack(">IB", key_version, len(name)) + name + aad


def oaep_label(bound: bytes) -> bytes:
    """The RSA-OAEP label for `bound_aad` bytes: unpadded base64url of its SHA-256 and a
    NUL (44 bytes), because a TPM takes only NUL-terminated labels of at most 64 bytes
    (TPM2B_DATA in TPM2_RSA_Decrypt) and every provider must agree."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(bound).digest()).rstrip(b"=")
    return digest + b"\x00"
