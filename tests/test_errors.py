"""Typed errors map one to one onto gRPC statuses and survive the round trip."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from edgekms import errors

CLASSES = [
    errors.InvalidArgument,
    errors.NotFound,
    errors.AlreadyExists,
    errors.FailedPrecondition,
    errors.PermissionDenied,
    errors.Unauthenticated,
    errors.Unavailable,
    errors.DeadlineExceeded,
    errors.ResourceExhausted,
    errors.Internal,
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_status_and_round_trips(cls: type[errors.KMSError]) -> None:
    err = cls("area.reason", "what happened", {"k": "v"})
    assert err.grpc_status == getattr(grpc.StatusCode, cls.grpc_name)
    back = errors.from_grpc(err.grpc_status, "ignored", err.to_proto().SerializeToString())
    assert (type(back), back.reason, back.message, back.details) == (
        cls,
        "area.reason",
        "what happened",
        {"k": "v"},
    )
    bare = errors.from_grpc(err.grpc_status, "details", None)
    assert type(bare) is cls


def test_statuses_are_distinct() -> None:
    assert len({cls.grpc_name for cls in CLASSES}) == len(CLASSES)


def test_crypto_service_does_not_load_grpc() -> None:
    """The crypto service never speaks gRPC; importing it must not pull grpc in (~20 MB)."""
    code = (
        "import sys, crypto_service.__main__, crypto_service.service;print('grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
