"""The device registry and deny list against the real stack: a denied device is refused
on its very next request, cannot renew or enroll again, and its certificates are
revoked; a whole group is denied batch by batch with progress; allow lets a device
enroll again with a new token."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekms import errors
from mgmt.cli.common import ExitCode
from mgmt.client import KMSClient
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json
from tests.enroll.test_enroll import device_enroll, enrolled, new_token

REFUSED = {"auth.denied", "auth.revoked"}


def test_a_denied_device_loses_access_on_its_next_request(stack: KmsStack, tmp_path: Path) -> None:
    config = enrolled(stack, tmp_path, "meter-1", "--group", "meters")
    with KMSClient.from_config(config, timeout=20) as device:
        assert device.whoami().client == "meter-1"
        denied = run_json(stack, "device", "deny", "meter-1")
        assert denied["devices_denied"] == 1 and denied["certificates_revoked"] >= 1
        with pytest.raises(errors.Unauthenticated) as refused:
            device.whoami()
        assert refused.value.reason in REFUSED
        with pytest.raises(errors.Unauthenticated) as renewal:
            device.renew_client()
        assert renewal.value.reason in REFUSED
    shown = run_json(stack, "device", "show", "meter-1")
    assert shown["status"] == "denied" and shown["denied_by"] == "admin"
    assert "meter-1" in {d["name"] for d in run_json(stack, "device", "list", "--denied")}
    clients = {c["name"]: c for c in run_json(stack, "client", "list", "--all")}
    assert clients["meter-1"]["status"] == "revoked"
    # No new token while denied.
    again = run(stack, "enroll", "token", "create", "meter-1", "--profile", "device")
    assert again.exit_code == ExitCode.FAILED_PRECONDITION, again.output
    assert "enroll.denied" in again.output

    # Allowed again: the old certificate stays revoked; a new token enrolls it anew.
    run_json(stack, "device", "allow", "meter-1")
    with KMSClient.from_config(config, timeout=20) as device, pytest.raises(errors.Unauthenticated):
        device.whoami()
    token, fingerprint, _ = new_token(stack, tmp_path, "meter-1", "--group", "meters")
    result = device_enroll(stack, token, fingerprint, tmp_path / "meter-1-again")
    assert result.exit_code == 0, result.output
    with KMSClient.from_config(tmp_path / "meter-1-again" / "config.toml", timeout=20) as device:
        assert device.whoami().client == "meter-1"


def test_a_token_made_before_the_deny_cannot_enroll(stack: KmsStack, tmp_path: Path) -> None:
    enrolled(stack, tmp_path, "meter-2", "--group", "meters-b")
    run_json(stack, "device", "deny", "--group", "meters-b")
    token, fingerprint, _ = new_token(stack, tmp_path, "meter-3", "--group", "meters-c")
    run_json(stack, "device", "deny", "--group", "meters-c")  # a group with no device yet
    result = device_enroll(stack, token, fingerprint, tmp_path / "meter-3")
    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    assert "enroll.denied" in result.output
    assert not (tmp_path / "meter-3" / "device.key").exists()
    assert "meter-3" not in {c["name"] for c in run_json(stack, "client", "list", "--all")}
    run_json(stack, "device", "allow", "--group", "meters-c")


def test_a_group_is_denied_in_batches(stack: KmsStack, tmp_path: Path) -> None:
    configs = [enrolled(stack, tmp_path, f"fleet-{i}", "--group", "fleet") for i in range(3)]
    bystander = enrolled(stack, tmp_path, "lonely", "--group", "other")
    result = run(stack, "device", "deny", "--group", "fleet", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "denied 3 device(s)" in result.stdout
    assert "more denied of 3" in result.stderr  # progress, batch by batch
    for config in configs:
        with KMSClient.from_config(config, timeout=20) as device:
            with pytest.raises(errors.Unauthenticated) as refused:
                device.whoami()
            assert refused.value.reason in REFUSED
    with KMSClient.from_config(bystander, timeout=20) as device:
        assert device.whoami().client == "lonely"
    listed = run_json(stack, "device", "list", "--group", "fleet", "--denied")
    assert sorted(d["name"] for d in listed) == ["fleet-0", "fleet-1", "fleet-2"]
    paged = run_json(stack, "device", "list", "--limit", "2")
    assert len(paged) == 2
