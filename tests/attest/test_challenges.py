"""The broker's one-time challenges (pure logic, a fake clock): single use, a short life,
a ration per source address and a cap on all outstanding; and the EK evidence checks
refusing what is not an EK, an AK, or a trusted EK."""

from __future__ import annotations

import pytest

from broker.attest import ChallengeBook, ManufacturerCAs, check_evidence
from edgekms import errors


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_challenge_is_used_once_and_only_for_its_token() -> None:
    book = ChallengeBook(clock=Clock())
    book.ration("peer:a")
    made = book.issue("t1", b"e" * 32, b"ak")
    with pytest.raises(errors.PermissionDenied) as other:
        book.take(made.id, "t2")
    assert other.value.reason == "attest.challenge_mismatch"
    # Taken out by the wrong use too: nobody gets a second try at it.
    with pytest.raises(errors.FailedPrecondition) as gone:
        book.take(made.id, "t1")
    assert gone.value.reason == "attest.challenge_unknown"
    fresh = book.issue("t1", b"e" * 32, b"ak")
    assert book.take(fresh.id, "t1").nonce == fresh.nonce
    assert len(fresh.nonce) == 32 and fresh.nonce != made.nonce
    assert len(book) == 0


def test_an_expired_challenge_is_refused() -> None:
    clock = Clock()
    book = ChallengeBook(ttl=60.0, clock=clock)
    made = book.issue("t1", b"e" * 32, b"ak")
    clock.now += 60.5
    with pytest.raises(errors.FailedPrecondition) as late:
        book.take(made.id, "t1")
    assert late.value.reason == "attest.challenge_expired"


def test_expired_challenges_are_swept_and_a_flood_is_rationed() -> None:
    clock = Clock()
    book = ChallengeBook(ttl=60.0, per_peer=20, window=60.0, limit=100, clock=clock)
    for _ in range(20):
        book.ration("peer:flood")
        book.issue("t", b"e" * 32, b"ak")
    with pytest.raises(errors.ResourceExhausted) as flood:
        book.ration("peer:flood")
    assert flood.value.reason == "attest.throttled"
    assert int(flood.value.details["retry_after_seconds"]) >= 1
    # Another address is not held back by the flood.
    book.ration("peer:other")
    clock.now += 61
    book.ration("peer:flood")  # the window moved on
    assert len(book) == 0  # the flood's challenges expired and were swept


def test_the_outstanding_challenges_are_capped_across_addresses() -> None:
    book = ChallengeBook(per_peer=5, limit=10, clock=Clock())
    for i in range(10):
        book.ration(f"peer:{i}")
        book.issue("t", b"e" * 32, b"ak")
    with pytest.raises(errors.ResourceExhausted) as full:
        book.ration("peer:new")
    assert full.value.reason == "attest.throttled"


@pytest.mark.parametrize(
    ("ek_public", "ak_public", "reason"),
    [
        (b"", b"", "attest.malformed"),
        (b"\x00\x01\x00\x0b", b"", "attest.malformed"),
        (b"\x00\x08\x00\x0b" + b"\x00" * 10, b"", "attest.unsupported_key"),
        (b"\xff" * 5000, b"", "attest.malformed"),
    ],
    ids=["empty", "truncated", "keyedhash", "oversized"],
)
def test_malformed_ek_areas_are_refused(ek_public: bytes, ak_public: bytes, reason: str) -> None:
    with pytest.raises(errors.KMSError) as bad:
        check_evidence(b"", ek_public, ak_public, b"", ManufacturerCAs([]))
    assert bad.value.reason == reason
