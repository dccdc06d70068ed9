"""kmsctl's output conventions: exit codes per error class, one-line errors, json shape."""

from __future__ import annotations

import json

import pytest

from edgekms import errors
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import keys_pb2
from mgmt.cli.common import ExitCode
from mgmt.cli.output import (
    error_line,
    exit_code_for,
    key_details,
    key_table,
    key_to_dict,
    progress,
    state_name,
    table,
)


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidArgument, ExitCode.INVALID_ARGUMENT),
        (errors.NotFound, ExitCode.NOT_FOUND),
        (errors.AlreadyExists, ExitCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, ExitCode.FAILED_PRECONDITION),
        (errors.PermissionDenied, ExitCode.PERMISSION_DENIED),
        (errors.Unauthenticated, ExitCode.PERMISSION_DENIED),
        (errors.Unavailable, ExitCode.UNAVAILABLE),
        (errors.DeadlineExceeded, ExitCode.UNAVAILABLE),
        (errors.ResourceExhausted, ExitCode.UNAVAILABLE),
        (errors.Internal, ExitCode.INTERNAL),
        (errors.KMSError, ExitCode.INTERNAL),
    ],
)
def test_exit_code_per_error_class(cls: type[errors.KMSError], code: ExitCode) -> None:
    assert exit_code_for(cls("x.y", "m")) == code


def test_subclass_maps_like_its_parent() -> None:
    class Mine(errors.NotFound):
        pass

    assert exit_code_for(Mine("a.b", "m")) == ExitCode.NOT_FOUND


def test_error_line_is_one_line() -> None:
    err = errors.NotFound("key.not_found", "no key\n  named web")
    assert error_line(err) == "kmsctl: key.not_found: no key named web"


def _key() -> keys_pb2.Key:
    return keys_pb2.Key(
        name="nas/https",
        provider="hsm0",
        key_type=pb.KEY_TYPE_EC_P384,
        state=pb.KEY_STATE_DISABLED,
        key_id="0a0b",
        created_at="2025-01-01T00:00:00Z",
        updated_at="2025-01-02T00:00:00Z",
        created_by="admin",
        labels={"z": "1", "a": "2"},
        policy=pb.KeyPolicy(
            rules=[
                pb.PolicyRule(
                    roles=["signer"],
                    operations=[pb.KEY_OPERATION_SIGN],
                    algorithms=[pb.SIGNATURE_ALGORITHM_ECDSA_SHA384],
                )
            ]
        ),
    )


def test_key_json_has_stable_names() -> None:
    d = key_to_dict(_key())
    assert json.loads(json.dumps(d)) == {
        "name": "nas/https",
        "provider": "hsm0",
        "type": "ec-p384",
        "state": "disabled",
        "key_id": "0a0b",
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-02T00:00:00Z",
        "created_by": "admin",
        "labels": {"a": "2", "z": "1"},
        "policy": [
            {
                "roles": ["signer"],
                "clients": [],
                "operations": ["sign"],
                "algorithms": ["ecdsa-sha384"],
            }
        ],
        "options": {"pcr_indexes": [], "require_auth": False},
        "usage": "sign",
        "version": 1,
    }
    assert list(d["labels"]) == ["a", "z"]


def test_state_names() -> None:
    assert state_name(pb.KEY_STATE_ACTIVE) == "active"
    assert state_name(pb.KEY_STATE_DESTROYED) == "destroyed"


def test_table_pads_columns() -> None:
    out = table(["A", "BB"], [["long", "x"], ["s", "y"]])
    assert out.splitlines() == ["A     BB", "long  x", "s     y"]


def test_key_table_and_details() -> None:
    lines = key_table([_key()]).splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "PROVIDER", "STATE", "CREATED"]
    assert lines[1].split() == ["nas/https", "ec-p384", "hsm0", "disabled", "2025-01-01T00:00:00Z"]
    details = key_details(_key())
    assert "state:       disabled" in details
    assert "  a=2" in details
    assert "role:signer may sign (algorithms: ecdsa-sha384)" in details


def test_progress_without_tty_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("generating rsa-4096 key k"):
        pass
    captured = capsys.readouterr()
    assert captured.err == "generating rsa-4096 key k ...\n"
    assert captured.out == ""


def test_a_policy_with_an_operation_kmsctl_does_not_know_prints() -> None:
    """`kmsctl key list -o json` crashed for every user once one key's policy named
    operation 99 (stored before the broker checked policies at CreateKey)."""
    key = keys_pb2.Key(
        name="k",
        state=77,  # type: ignore[arg-type]
        policy=pb.KeyPolicy(
            rules=[
                pb.PolicyRule(
                    roles=["signer"],
                    operations=[pb.KeyOperation.ValueType(99), pb.KEY_OPERATION_SIGN],
                )
            ]
        ),
    )
    shown = key_to_dict(key)
    assert shown["policy"][0]["operations"] == ["unknown-99", "sign"]
    assert shown["state"] == "unknown-77"
    json.dumps(shown)
