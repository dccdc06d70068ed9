"""Unlock policies (pure logic): what `PutUnlockSecret` refuses before storing, and the
release window checked at every Unlock."""

from __future__ import annotations

import datetime

import pytest

from broker import unlock
from edgekms import errors
from edgekms.v1 import enroll_pb2


def _secret(**fields: object) -> enroll_pb2.UnlockSecret:
    base: dict[str, object] = {"device": "nas-1", "volume": "data", "key_name": "unlock"}
    base.update(fields)
    return enroll_pb2.UnlockSecret(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"pcrs": [0, 24], "pcr_digest": b"d" * 32}, "unlock.pcrs_invalid"),
        ({"pcrs": [7, 7], "pcr_digest": b"d" * 32}, "unlock.pcrs_invalid"),
        ({"pcrs": [0, 7], "pcr_digest": b"short"}, "unlock.pcr_digest_invalid"),
        ({"pcr_digest": b"d" * 32}, "unlock.pcr_digest_invalid"),
        (
            {"not_before": "2030-01-02T00:00:00+00:00", "not_after": "2030-01-01T00:00:00+00:00"},
            "unlock.window_invalid",
        ),
        ({"not_after": "2030-01-01T00:00:00"}, "unlock.window_invalid"),
        ({"not_before": "next tuesday"}, "unlock.window_invalid"),
        ({}, "unlock.ciphertext_invalid"),
    ],
    ids=[
        "pcr_24",
        "pcr_twice",
        "short_digest",
        "digest_without_pcrs",
        "window_reversed",
        "window_naive",
        "window_unparsable",
        "no_ciphertext",
    ],
)
def test_policies_that_cannot_be_met_are_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(errors.InvalidArgument) as bad:
        unlock.check_policy(_secret(**fields))
    assert bad.value.reason == reason


def test_names_are_checked() -> None:
    with pytest.raises(errors.InvalidArgument) as bad:
        unlock.check_names("nas-1", "../etc")
    assert bad.value.reason == "unlock.volume_invalid"
    with pytest.raises(errors.InvalidArgument) as bad_device:
        unlock.check_names("Not A Name", "data")
    assert bad_device.value.reason == "unlock.device_invalid"


def test_the_window_is_enforced_at_release() -> None:
    now = datetime.datetime.now(datetime.UTC)
    past, future = now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1)
    unlock.check_window(_secret(not_before=past.isoformat(), not_after=future.isoformat()))
    with pytest.raises(errors.PermissionDenied) as early:
        unlock.check_window(_secret(not_before=future.isoformat()))
    assert early.value.reason == "unlock.outside_window"
    with pytest.raises(errors.PermissionDenied) as late:
        unlock.check_window(_secret(not_after=past.isoformat()))
    assert late.value.reason == "unlock.outside_window"
