"""The life of a TPM challenge on a real stack whose challenges live only a few seconds
(`kmsctl up --attest-challenge-ttl`), with a real swtpm per device: an attested Enroll or
an Unlock answered after the challenge's lifetime is refused (typed, audited) and
releases or enrolls nothing; `kmsctl unlock fetch` whose challenge expired while its TPM
was busy asks for a fresh one and unlocks; a broker killed between BeginAttestation and
Enroll takes its challenges with it (the device enrolls again with the same token); and
a flood of BeginUnlock from one address is throttled (last: it spends the address's
ration for a minute)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekms import errors
from edgekms.v1 import enroll_pb2
from mgmt.attested_enroll import enrollment_stub
from mgmt.tpmdevice import DeviceTpm
from mgmt.unlock import Target, fetch
from tests.attest.conftest import DeviceFactory, Manufacturer
from tests.attest.test_attested_enroll import _begin, _finish, device_enroll, new_token
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.enroll.conftest import run, run_json
from tests.unlock.conftest import LuksFactory, opens
from tests.unlock.test_unlock import add_secret, attested, call, fingerprint_of

# Long enough for a whole `enroll --attest` or `unlock fetch` on a loaded machine, short
# enough to wait out twice.
TTL = 15.0 * SLOWDOWN


@pytest.fixture(scope="module")
def short_stack(
    tmp_path_factory: pytest.TempPathFactory, trusted_maker: Manufacturer
) -> Iterator[KmsStack]:
    """A stack of this module's own: its challenges live TTL seconds, and the flood at
    the end spends only its ration."""
    started = start_stack(
        tmp_path_factory.mktemp("short-ttl") / "data",
        "--ek-ca",
        str(trusted_maker.bundle),
        "--attest-challenge-ttl",
        str(TTL),
    )
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def short_key(short_stack: KmsStack) -> str:
    made = run(short_stack, "key", "create", "unlock", "--type", "aes-256")
    assert made.exit_code == 0, made.output
    return "unlock"


def audit_entries(stack: KmsStack) -> list[dict[str, Any]]:
    tail = run(stack, "audit", "tail", "-n", "500", "-o", "json")
    assert tail.exit_code == 0, tail.output
    lines = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
    return [line["entry"] for line in lines if line.get("entry")]


def audited(stack: KmsStack, action: str, text: str) -> int:
    """How many audit entries of `action` mention `text` (a reason, a device)."""
    return sum(
        1
        for entry in audit_entries(stack)
        if entry.get("action") == action and text in json.dumps(entry)
    )


def wait_past_expiry(answered_at: float) -> None:
    """Until a challenge the broker gave before `answered_at` (monotonic) has expired:
    its life is a known TTL, so this waits out a time, not a condition."""
    time.sleep(max(0.0, answered_at + TTL + 1.0 - time.monotonic()))


def test_an_attested_enroll_after_its_challenge_expired_enrolls_nothing(
    short_stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token_file, fingerprint = new_token(short_stack, tmp_path, "late-1", "--attest")
    token = token_file.read_text().strip()
    with DeviceTpm(tpm.tcti) as device:
        _, challenge = _begin(short_stack, fingerprint, token, device)
        answered_at = time.monotonic()
        nonce = device.activate(challenge.credential_blob, challenge.encrypted_secret)
        key = device.create_key()
        certify = device.certify(key, nonce)
        wait_past_expiry(answered_at)
        with pytest.raises(errors.FailedPrecondition) as late:
            _finish(short_stack, fingerprint, token, challenge.challenge_id, nonce, key, certify)
    assert late.value.reason == "attest.challenge_expired"
    assert "late-1" not in {d["name"] for d in run_json(short_stack, "device", "list")}
    assert audited(short_stack, "Enroll", "attest.challenge_expired") == 1
    # The token was not spent: the same TPM, answering in time, enrolls with it.
    done = device_enroll(short_stack, tpm, token_file, fingerprint, tmp_path / "out")
    assert done.exit_code == 0, done.output
    assert run_json(short_stack, "device", "show", "late-1")["ek_sha256"]


def test_an_unlock_after_its_challenge_expired_releases_nothing(
    short_stack: KmsStack, short_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    out = attested(short_stack, tpm, tmp_path, "late-2")
    add_secret(short_stack, tpm, "late-2", tmp_path)
    server, fingerprint = fingerprint_of(out)
    before = audited(short_stack, "Unlock", "attest.challenge_expired")
    with enrollment_stub(server, fingerprint) as stub:
        challenge = call(
            stub.BeginUnlock, enroll_pb2.BeginUnlockRequest(device="late-2", volume="data")
        )
        answered_at = time.monotonic()
        with DeviceTpm(tpm.tcti) as device:
            quote, signature = device.quote(list(challenge.pcrs), challenge.nonce)
        late = enroll_pb2.UnlockRequest(
            challenge_id=challenge.challenge_id,
            device="late-2",
            volume="data",
            quote=quote,
            signature=signature,
        )
        wait_past_expiry(answered_at)
        with pytest.raises(errors.FailedPrecondition) as expired:
            call(stub.Unlock, late)
        assert expired.value.reason == "attest.challenge_expired"
        # Refused once, gone for good: the same answer again finds no challenge.
        with pytest.raises(errors.FailedPrecondition) as again:
            call(stub.Unlock, late)
        assert again.value.reason == "attest.challenge_unknown"
    assert audited(short_stack, "Unlock", "attest.challenge_expired") == before + 1


def test_a_fetch_held_up_past_its_challenge_asks_again_and_unlocks(
    short_stack: KmsStack,
    short_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    """`unlock fetch` whose TPM is held up (swtpm stopped) past its challenge's life: the
    answer is refused as expired, and fetch asks for a fresh challenge and unlocks."""
    tpm = device_tpm()
    out = attested(short_stack, tpm, tmp_path, "late-3")
    secret = add_secret(short_stack, tpm, "late-3", tmp_path)
    image = luks_volume(secret)
    server, fingerprint = fingerprint_of(out)
    before = audited(short_stack, "Unlock", "attest.challenge_expired")
    assert tpm.process is not None
    begun = audited(short_stack, "BeginUnlock", "late-3")
    target = Target(server, fingerprint, "late-3")
    outcome: list[object] = []

    def device_boots() -> None:
        try:
            outcome.append(fetch(target, "data", tpm.tcti, timeout=60 * SLOWDOWN))
        except BaseException as exc:
            outcome.append(exc)

    os.kill(tpm.process.pid, signal.SIGSTOP)
    thread = threading.Thread(target=device_boots)
    try:
        thread.start()
        deadline = time.monotonic() + 60 * SLOWDOWN
        while audited(short_stack, "BeginUnlock", "late-3") == begun:
            assert time.monotonic() < deadline, "fetch never asked for a challenge"
            time.sleep(0.2)
        wait_past_expiry(time.monotonic())
    finally:
        os.kill(tpm.process.pid, signal.SIGCONT)
    thread.join(120 * SLOWDOWN)
    assert not thread.is_alive()
    assert len(outcome) == 1 and outcome[0] == secret.read_bytes(), outcome
    assert isinstance(outcome[0], bytes) and opens(image, outcome[0])
    assert audited(short_stack, "Unlock", "attest.challenge_expired") == before + 1


def test_a_broker_restart_ends_open_challenges_and_the_device_enrolls_again(
    short_stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token_file, fingerprint = new_token(short_stack, tmp_path, "reboot-1", "--attest")
    token = token_file.read_text().strip()
    broker_pid = int(dict(short_stack.state()["children"])["broker"])  # type: ignore[call-overload]
    with DeviceTpm(tpm.tcti) as device:
        _, challenge = _begin(short_stack, fingerprint, token, device)
        nonce = device.activate(challenge.credential_blob, challenge.encrypted_secret)
        key = device.create_key()
        certify = device.certify(key, nonce)
    os.kill(broker_pid, signal.SIGKILL)
    # kmsctl up restarts the broker with an empty challenge book: the answer, right as it
    # is, finds nothing to answer.
    deadline = time.monotonic() + 120 * SLOWDOWN
    while True:
        try:
            _finish(short_stack, fingerprint, token, challenge.challenge_id, nonce, key, certify)
            pytest.fail("a challenge outlived its broker")
        except errors.FailedPrecondition as err:
            assert err.reason == "attest.challenge_unknown"
            break
        except (errors.Unavailable, errors.DeadlineExceeded):
            assert time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.5)
    assert "reboot-1" not in {d["name"] for d in run_json(short_stack, "device", "list")}
    # Nothing was spent: the device runs `kmsctl enroll --attest` again and is enrolled.
    done = device_enroll(short_stack, tpm, token_file, fingerprint, tmp_path / "out")
    assert done.exit_code == 0, done.output


def test_z_a_begin_unlock_flood_is_throttled_and_audited(
    short_stack: KmsStack, short_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    out = attested(short_stack, tpm, tmp_path, "flood-2")
    add_secret(short_stack, tpm, "flood-2", tmp_path)
    server, fingerprint = fingerprint_of(out)
    answered, refused = 0, None
    with enrollment_stub(server, fingerprint) as stub:
        for _ in range(40):
            try:
                call(
                    stub.BeginUnlock, enroll_pb2.BeginUnlockRequest(device="flood-2", volume="data")
                )
                answered += 1
            except errors.ResourceExhausted as err:
                refused = err
                break
    assert refused is not None and refused.reason == "attest.throttled"
    assert int(refused.details["retry_after_seconds"]) >= 1
    assert 0 < answered <= 20
    assert audited(short_stack, "BeginUnlock", "attest.throttled") >= 1
