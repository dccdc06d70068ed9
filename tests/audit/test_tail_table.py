"""`kmsctl audit tail`'s text table as pure logic: each line names the writer whose
stream it comes from, since sequence numbers restart in every writer's stream."""

from __future__ import annotations

from typing import Any

import pytest

from mgmt.cli.audit import _HEADERS, _row, stream_writer


@pytest.mark.parametrize(
    ("stream", "writer"),
    [
        ("KMS_AUDIT_BROKER", "broker"),
        ("KMS_AUDIT_CA", "ca"),
        ("KMS_AUDIT_CRYPTO-HSM0", "crypto-hsm0"),
        ("KMS_AUDIT", "legacy"),
        ("KMS_AUDIT_", "KMS_AUDIT_"),
        ("OTHER", "OTHER"),
        ("", "-"),
    ],
)
def test_stream_writer(stream: str, writer: str) -> None:
    assert stream_writer(stream) == writer


def entry(action: str) -> dict[str, Any]:
    return {
        "time": "2026-12-02T16:00:00Z",
        "actor": {"client": "admin", "role": "admin"},
        "action": action,
        "target": "",
        "outcome": "ok",
        "writer": "broker",
    }


def test_rows_name_their_stream_so_equal_sequence_numbers_are_told_apart() -> None:
    broker = _row({"stream": "KMS_AUDIT_BROKER", "seq": 7, "index": 0, "entry": entry("Sign")})
    ca = _row({"stream": "KMS_AUDIT_CA", "seq": 7, "index": 2, "entry": entry("IssueCert")})
    junk = _row({"stream": "KMS_AUDIT_CA", "seq": 8, "index": 0, "entry": None, "raw": "x"})
    assert _HEADERS[:2] == ["WRITER", "SEQ"]
    assert all(len(row) == len(_HEADERS) for row in (broker, ca, junk))
    assert broker[:2] == ["broker", "7"] and broker[4] == "Sign" and broker[5] == "-"
    assert ca[:2] == ["ca", "7#2"]
    assert junk[:2] == ["ca", "8"] and junk[-1] == "(not an audit entry)"
