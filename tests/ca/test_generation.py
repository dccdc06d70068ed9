"""Rotation numbers: taken from the current intermediate's label, so dropping spent
retired intermediates never hands out a label in use; and the CA's bus grant covers every
name a rotation can record."""

from __future__ import annotations

import pytest

from ca_service.hierarchy import next_generation
from edgekms.errors import FailedPrecondition
from edgekms.subjects import CA_MAX_INTERMEDIATE_GENERATION
from edgekms.v1 import ca_pb2
from mgmt.natsauth import ca_identity


def test_first_rotation_is_generation_two() -> None:
    assert next_generation(ca_pb2.CAState()) == 2
    assert next_generation(ca_pb2.CAState(intermediate_label="ca/intermediate")) == 2


def test_generation_follows_the_current_label_not_the_retired_count() -> None:
    # Generation 3 is current and every retired one was dropped: the next is 4, not 2.
    state = ca_pb2.CAState(intermediate_label="ca/intermediate-3")
    assert not state.retired
    assert next_generation(state) == 4


def test_rotation_stops_at_the_last_generation() -> None:
    state = ca_pb2.CAState(intermediate_label=f"ca/intermediate-{CA_MAX_INTERMEDIATE_GENERATION}")
    with pytest.raises(FailedPrecondition) as err:
        next_generation(state)
    assert err.value.reason == "ca.rotation_limit"


def test_the_ca_may_record_every_generation_and_nothing_else() -> None:
    publish = set(ca_identity("hsm0").permissions.publish)
    for n in range(2, CA_MAX_INTERMEDIATE_GENERATION + 1):
        assert f"$KV.kms_keys.ca/intermediate-{n}" in publish
    assert f"$KV.kms_keys.ca/intermediate-{CA_MAX_INTERMEDIATE_GENERATION + 1}" not in publish
    assert "$KV.kms_keys.>" not in publish
