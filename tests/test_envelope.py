"""The ciphertext envelope (edgekms/envelope.py): pure logic, so no real parts."""

from __future__ import annotations

import pytest

from edgekms import envelope
from edgekms.errors import InvalidArgument
from edgekms.v1 import common_pb2 as pb

GOOD = envelope.Envelope(pb.ENCRYPTION_ALGORITHM_AES_256_GCM, "nas/disks", 3, b"n" * 12, b"c" * 20)


def test_round_trip() -> None:
    data = GOOD.encode()
    assert data.startswith(envelope.MAGIC)
    assert envelope.decode(data) == GOOD


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"EKE1",
        b"XXXX" + GOOD.encode()[4:],
        GOOD.encode()[:4] + b"\x09" + GOOD.encode()[5:],  # unknown algorithm
        GOOD.encode()[:5] + b"\x00\x00\x00\x00" + GOOD.encode()[9:],  # version 0
        GOOD.encode()[:9] + b"\x00" + GOOD.encode()[10:],  # empty name
        GOOD.encode()[:9] + b"\xff" + GOOD.encode()[10:],  # name longer than the data
        GOOD.encode()[:9] + b"\x02\xc3\xa9" + GOOD.encode()[12:],  # name not ASCII
        GOOD.encode()[:20],  # cut inside the nonce
        GOOD.encode() + bytes(envelope.MAX_ENVELOPE),
    ],
)
def test_anything_else_is_malformed(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as refused:
        envelope.decode(data)
    assert refused.value.reason == envelope.MALFORMED


def test_bound_aad_separates_name_version_and_aad() -> None:
    seen = {
        envelope.bound_aad(name, version, aad)
        for name, version, aad in [
            ("a", 1, b"b"),
            ("ab", 1, b""),
            ("a", 2, b"b"),
            ("a", 1, b""),
            ("b", 1, b"b"),
        ]
    }
    assert len(seen) == 5


def test_oaep_label_fits_a_tpm() -> None:
    label = envelope.oaep_label(envelope.bound_aad("k", 1, b"x" * 8192))
    assert len(label) <= 64 and label.endswith(b"\x00") and b"\x00" not in label[:-1]
