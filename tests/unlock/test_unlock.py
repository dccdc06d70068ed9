"""Remote unlock through the whole stack with a real swtpm per device and a real LUKS2
volume: the secret released against a fresh quote opens it; a replayed quote, a quote
over another nonce or by another TPM's AK, an extended PCR 7, a denied or unknown device
and a released blob taken to another TPM are refused (typed, audited) and the volume
stays locked; two devices get only their own secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from edgekms import errors
from edgekms.v1 import enroll_pb2
from mgmt.attested_enroll import enrollment_stub
from mgmt.cli import cli
from mgmt.client import error_from_rpc
from mgmt.swtpm import Swtpm
from mgmt.tpmdevice import DeviceTpm
from mgmt.unlock import open_released
from tests.attest.conftest import DeviceFactory
from tests.attest.test_attested_enroll import device_enroll, new_token
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json
from tests.unlock.conftest import LuksFactory, opens

PCRS = "0,7"


def attested(stack: KmsStack, tpm: Swtpm, tmp: Path, name: str) -> Path:
    """An enrolled, TPM-attested device; its out dir (device.json)."""
    token, fingerprint = new_token(stack, tmp, name, "--attest")
    out = tmp / name
    done = device_enroll(stack, tpm, token, fingerprint, out)
    assert done.exit_code == 0, done.output
    return out


def pcr_digest(tpm: Swtpm) -> str:
    done = CliRunner().invoke(cli, ["unlock", "pcrs", "--pcrs", PCRS, "--tcti", tpm.tcti])
    assert done.exit_code == 0, done.output
    return done.stdout.strip()


def add_secret(stack: KmsStack, tpm: Swtpm, name: str, tmp: Path, volume: str = "data") -> Path:
    """`kmsctl unlock add --generate`: the secret file (for the LUKS key slot)."""
    secret = tmp / f"{name}-{volume}.key"
    added = run_json(
        stack,
        "unlock",
        "add",
        name,
        "--volume",
        volume,
        "--pcrs",
        PCRS,
        "--pcr-digest",
        pcr_digest(tpm),
        "--generate",
        "--secret-out",
        str(secret),
    )
    assert added["pcrs"] == [0, 7] and added["generation"] == 1
    assert secret.stat().st_mode & 0o777 == 0o600
    return secret


def fetch(tpm: Swtpm, out: Path, volume: str = "data") -> Result:
    return CliRunner().invoke(
        cli, ["unlock", "fetch", "--volume", volume, "--device-dir", str(out), "--tcti", tpm.tcti]
    )


def call(fn: Any, request: Any) -> Any:
    try:
        return fn(request, timeout=30)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def audited(stack: KmsStack, reason: str) -> bool:
    tail = run(stack, "audit", "tail", "-n", "500", "-o", "json")
    assert tail.exit_code == 0, tail.output
    return reason in tail.stdout


def fingerprint_of(out: Path) -> tuple[str, str]:
    import json

    saved = json.loads((out / "device.json").read_text())
    return saved["enrollment"], saved["fingerprint"]


class Released:
    """An attested device with a secret and a LUKS image, its Unlock request answered
    (quote over a fresh challenge) but not yet sent: what the mid-release crash tests
    send while they stop and kill parts of the stack."""

    def __init__(
        self,
        stack: KmsStack,
        device_tpm: DeviceFactory,
        luks_volume: LuksFactory,
        tmp_path: Path,
        name: str,
    ) -> None:
        self.tpm = device_tpm()
        self.out = attested(stack, self.tpm, tmp_path, name)
        self.image = luks_volume(add_secret(stack, self.tpm, name, tmp_path))
        self.server, self.fingerprint = fingerprint_of(self.out)
        self.children = {
            k: int(v)
            for k, v in dict(stack.state()["children"]).items()  # type: ignore[call-overload]
        }
        with enrollment_stub(self.server, self.fingerprint) as stub:
            challenge = call(
                stub.BeginUnlock, enroll_pb2.BeginUnlockRequest(device=name, volume="data")
            )
        with DeviceTpm(self.tpm.tcti) as device:
            quote, signature = device.quote(list(challenge.pcrs), challenge.nonce)
        self.request = enroll_pb2.UnlockRequest(
            challenge_id=challenge.challenge_id,
            device=name,
            volume="data",
            quote=quote,
            signature=signature,
        )
        self.outcome: list[object] = []

    def send(self) -> None:
        """Send the Unlock once (run in a thread), keeping its answer or error."""
        try:
            with enrollment_stub(self.server, self.fingerprint) as stub:
                self.outcome.append(call(stub.Unlock, self.request))
        except BaseException as exc:
            self.outcome.append(exc)

    def resend(self) -> None:
        """Send the same Unlock again, in this thread: its answer or its error."""
        with enrollment_stub(self.server, self.fingerprint) as stub:
            call(stub.Unlock, self.request)


def test_the_released_secret_opens_the_volume_and_a_changed_pcr_7_gets_nothing(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "nas-1")
    secret = add_secret(stack, tpm, "nas-1", tmp_path)
    image = luks_volume(secret)
    got = fetch(tpm, out)
    assert got.exit_code == 0, got.output
    assert got.stdout_bytes == secret.read_bytes()
    assert opens(image, got.stdout_bytes)
    shown = run_json(stack, "unlock", "show", "nas-1", "--volume", "data")
    assert shown["ek_sha256"] and "ciphertext" not in shown
    # A tampered boot chain: PCR 7 extended. Refused, audited, and nothing to open with.
    with DeviceTpm(tpm.tcti) as device:
        device.extend(7, b"an unsigned bootloader")
    refused = fetch(tpm, out)
    assert refused.exit_code == 6, refused.output
    assert "unlock.pcr_mismatch" in refused.output
    assert refused.stdout_bytes.find(secret.read_bytes()) == -1
    assert not opens(image, b"")
    assert audited(stack, "unlock.pcr_mismatch")


def test_replays_wrong_nonces_foreign_aks_and_stolen_blobs_are_refused(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    mine, thief = device_tpm(), device_tpm()
    out = attested(stack, mine, tmp_path, "robot-7")
    add_secret(stack, mine, "robot-7", tmp_path)
    server, fingerprint = fingerprint_of(out)
    begin = enroll_pb2.BeginUnlockRequest(device="robot-7", volume="data")
    with enrollment_stub(server, fingerprint) as stub:
        first = call(stub.BeginUnlock, begin)
        with DeviceTpm(mine.tcti) as tpm:
            quote, signature = tpm.quote(list(first.pcrs), first.nonce)
        good = enroll_pb2.UnlockRequest(
            challenge_id=first.challenge_id,
            device="robot-7",
            volume="data",
            quote=quote,
            signature=signature,
        )
        released = call(stub.Unlock, good)
        # The captured answer, sent again: its challenge is spent.
        with pytest.raises(errors.FailedPrecondition) as replay:
            call(stub.Unlock, good)
        assert replay.value.reason == "attest.challenge_unknown"
        # The captured quote on a fresh challenge: it answers the old nonce.
        second = call(stub.BeginUnlock, begin)
        stale = enroll_pb2.UnlockRequest()
        stale.CopyFrom(good)
        stale.challenge_id = second.challenge_id
        with pytest.raises(errors.FailedPrecondition) as old:
            call(stub.Unlock, stale)
        assert old.value.reason == "attest.nonce_mismatch"
        # Another TPM quoting the right nonce: not the device's pinned AK.
        third = call(stub.BeginUnlock, begin)
        with DeviceTpm(thief.tcti) as other:
            quote3, signature3 = other.quote(list(third.pcrs), third.nonce)
        with pytest.raises(errors.FailedPrecondition) as foreign:
            call(
                stub.Unlock,
                enroll_pb2.UnlockRequest(
                    challenge_id=third.challenge_id,
                    device="robot-7",
                    volume="data",
                    quote=quote3,
                    signature=signature3,
                ),
            )
        assert foreign.value.reason == "attest.bad_signature"
    # The released blob, taken to another TPM, does not open there; here it does.
    with DeviceTpm(thief.tcti) as other:
        with pytest.raises(errors.FailedPrecondition) as stolen:
            open_released(other, released, first.challenge_id)
        assert stolen.value.reason == "attest.activation_failed"
    with DeviceTpm(mine.tcti) as tpm:
        assert (
            open_released(tpm, released, first.challenge_id)
            == (tmp_path / "robot-7-data.key").read_bytes()
        )
    for reason in ("attest.challenge_unknown", "attest.nonce_mismatch", "attest.bad_signature"):
        assert audited(stack, reason), reason


def test_two_devices_get_only_their_own_secrets(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    tpm_a, tpm_b = device_tpm(), device_tpm()
    out_a = attested(stack, tpm_a, tmp_path, "cab-a")
    out_b = attested(stack, tpm_b, tmp_path, "cab-b")
    secret_a = add_secret(stack, tpm_a, "cab-a", tmp_path)
    secret_b = add_secret(stack, tpm_b, "cab-b", tmp_path)
    assert secret_a.read_bytes() != secret_b.read_bytes()
    image_a = luks_volume(secret_a)
    got_b = fetch(tpm_b, out_b)
    assert got_b.exit_code == 0, got_b.output
    assert got_b.stdout_bytes == secret_b.read_bytes()
    assert not opens(image_a, got_b.stdout_bytes)
    # B claiming to be A: its quote is not A's AK's.
    claim = CliRunner().invoke(
        cli,
        [
            "unlock",
            "fetch",
            "--volume",
            "data",
            "--device-dir",
            str(out_b),
            "--device",
            "cab-a",
            "--tcti",
            tpm_b.tcti,
        ],
    )
    assert claim.exit_code != 0 and "attest.bad_signature" in claim.output
    assert fetch(tpm_a, out_a).stdout_bytes == secret_a.read_bytes()
    listed = run_json(stack, "unlock", "list")
    assert {(s["device"], s["volume"]) for s in listed} >= {("cab-a", "data"), ("cab-b", "data")}
    # The table people read (it once failed on the generation, an int: TypeError).
    text = run(stack, "unlock", "list", "cab-a")
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[1].split() == ["cab-a", "data", PCRS, "1"]


def test_denied_unknown_and_removed_get_nothing(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "kiosk-9")
    add_secret(stack, tpm, "kiosk-9", tmp_path)
    unknown = CliRunner().invoke(
        cli,
        [
            "unlock",
            "fetch",
            "--volume",
            "data",
            "--device-dir",
            str(out),
            "--device",
            "nobody",
            "--tcti",
            tpm.tcti,
        ],
    )
    assert unknown.exit_code == 4 and "unlock.device_unknown" in unknown.output
    missing = fetch(tpm, out, volume="other")
    assert missing.exit_code == 4 and "unlock.not_found" in missing.output
    # An unlock secret for a device that did not attest is refused at add.
    plain = run(
        stack, "unlock", "add", "ghost", "--volume", "data", "--from-file", str(out / "device.json")
    )
    assert plain.exit_code != 0 and "unlock.device_unattested" in plain.output
    assert run(stack, "device", "deny", "kiosk-9").exit_code == 0
    denied = fetch(tpm, out)
    assert denied.exit_code == 7 and "enroll.denied" in denied.output
    assert run(stack, "device", "allow", "kiosk-9").exit_code == 0
    assert fetch(tpm, out).exit_code == 0
    removed = run(stack, "unlock", "remove", "kiosk-9", "--volume", "data")
    assert removed.exit_code == 0, removed.output
    gone = fetch(tpm, out)
    assert gone.exit_code == 4 and "unlock.not_found" in gone.output
    assert audited(stack, "enroll.denied")


def test_rotate_replaces_the_secret_and_keeps_the_policy(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "gw-3")
    old = add_secret(stack, tpm, "gw-3", tmp_path)
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(24).hex().encode())
    rotated = run_json(
        stack, "unlock", "rotate", "gw-3", "--volume", "data", "--from-file", str(new)
    )
    assert rotated["generation"] == 2 and rotated["pcrs"] == [0, 7]
    again = run(stack, "unlock", "add", "gw-3", "--volume", "data", "--from-file", str(new))
    assert again.exit_code == 5 and "unlock.exists" in again.output
    got = fetch(tpm, out)
    assert got.exit_code == 0 and got.stdout_bytes == new.read_bytes() != old.read_bytes()


def test_the_device_finds_the_kms_by_mdns_on_loopback(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    import json

    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "field-2")
    secret = add_secret(stack, tpm, "field-2", tmp_path)
    saved = json.loads((out / "device.json").read_text())
    del saved["enrollment"]  # no address: only mDNS can tell where the KMS is
    (out / "device.json").write_text(json.dumps(saved))
    without = fetch(tpm, out)
    assert without.exit_code == 3 and "unlock.target_unknown" in without.output
    found = CliRunner().invoke(
        cli,
        [
            "unlock",
            "fetch",
            "--volume",
            "data",
            "--device-dir",
            str(out),
            "--tcti",
            tpm.tcti,
            "--mdns",
            "--mdns-interface",
            "127.0.0.1",
        ],
    )
    assert found.exit_code == 0, found.output
    assert found.stdout_bytes == secret.read_bytes()


def test_a_broker_killed_mid_release_releases_nothing_and_the_retry_unlocks(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    import signal
    import threading
    import time

    from tests.conftest import SLOWDOWN

    released = Released(stack, device_tpm, luks_volume, tmp_path, "crashy-1")
    crypto_pid, broker_pid = released.children["crypto-hsm0"], released.children["broker"]
    outcome = released.outcome

    # The Decrypt hangs (crypto service stopped), so the broker is caught mid-release
    # (or before it): then it is killed. Whichever, nothing may come out of it.
    os.kill(crypto_pid, signal.SIGSTOP)
    thread = threading.Thread(target=released.send)
    try:
        thread.start()
        thread.join(2.0)
        os.kill(broker_pid, signal.SIGKILL)
    finally:
        os.kill(crypto_pid, signal.SIGCONT)
    thread.join(60 * SLOWDOWN)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.KMSError), outcome
    # kmsctl up restarts the broker; the old challenge died with it, a new fetch unlocks.
    deadline = time.monotonic() + 120 * SLOWDOWN
    while True:
        try:
            released.resend()
            pytest.fail("a challenge outlived its broker")
        except errors.FailedPrecondition as err:
            assert err.reason == "attest.challenge_unknown"
            break
        except (errors.Unavailable, errors.DeadlineExceeded):
            assert time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.5)
    got = fetch(released.tpm, released.out)
    assert got.exit_code == 0, got.output
    assert opens(released.image, got.stdout_bytes)


def test_the_pcr_values_recorded_at_enrollment_make_the_policy(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "auto-1")
    secret = tmp_path / "auto.key"
    added = run_json(
        stack,
        "unlock",
        "add",
        "auto-1",
        "--volume",
        "data",
        "--pcrs",
        PCRS,
        "--generate",
        "--secret-out",
        str(secret),
    )
    assert added["pcr_digest"] == pcr_digest(tpm)
    got = fetch(tpm, out)
    assert got.exit_code == 0 and got.stdout_bytes == secret.read_bytes()
    # PCR 8 was not quoted at enrollment: its digest must be given.
    unknown = run(
        stack,
        "unlock",
        "add",
        "auto-1",
        "--volume",
        "other",
        "--pcrs",
        "8",
        "--generate",
        "--secret-out",
        str(tmp_path / "other.key"),
    )
    assert unknown.exit_code == 3 and "unlock.pcr_digest_invalid" in unknown.output


def test_fetch_writes_the_secret_0600_or_into_a_pipe_cryptsetup_reads(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    """`unlock fetch --out`: a key file (0600, in a 0700 directory it makes) for
    /etc/crypttab, or a FIFO that `cryptsetup --key-file` is reading: the secret goes
    there and never to stdout."""
    import stat
    import subprocess

    from tests.conftest import SLOWDOWN

    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "pipe-1")
    secret = add_secret(stack, tpm, "pipe-1", tmp_path)
    image = luks_volume(secret)
    key_file = tmp_path / "run" / "edgekms-unlock" / "data.key"
    written = CliRunner().invoke(
        cli,
        [
            "unlock", "fetch", "--volume", "data", "--device-dir", str(out),
            "--tcti", tpm.tcti, "--out", str(key_file),
        ],
    )  # fmt: skip
    assert written.exit_code == 0, written.output
    assert written.stdout_bytes == b""
    assert key_file.read_bytes() == secret.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert opens(image, key_file.read_bytes())
    # A FIFO: cryptsetup waits on it, fetch writes into it, nothing lands on disk.
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo, 0o600)
    reader = subprocess.Popen(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(fifo), str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        piped = CliRunner().invoke(
            cli,
            [
                "unlock", "fetch", "--volume", "data", "--device-dir", str(out),
                "--tcti", tpm.tcti, "--out", str(fifo),
            ],
        )  # fmt: skip
        assert piped.exit_code == 0, piped.output
        assert piped.stdout_bytes == b""
        said, _ = reader.communicate(timeout=120 * SLOWDOWN)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, said
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_secret_outside_its_time_window_is_not_released(
    stack: KmsStack, unlock_key: str, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    """`unlock add --not-before/--not-after` on the real stack: a fetch before the
    window opens or after it closed is refused (typed, audited) after the quote checked
    out, and nothing is released; inside the window the same device unlocks."""
    import datetime

    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "window-1")
    now = datetime.datetime.now(datetime.UTC)
    windows = {
        "early": ("--not-before", (now + datetime.timedelta(days=1)).isoformat()),
        "late": ("--not-after", (now - datetime.timedelta(days=1)).isoformat()),
        "open": ("--not-after", (now + datetime.timedelta(days=1)).isoformat()),
    }
    for volume, (option, when) in windows.items():
        added = run_json(
            stack, "unlock", "add", "window-1", "--volume", volume, "--pcrs", PCRS,
            option, when, "--generate", "--secret-out", str(tmp_path / f"{volume}.key"),
        )  # fmt: skip
        assert added["generation"] == 1, added
    for volume in ("early", "late"):
        refused = fetch(tpm, out, volume=volume)
        assert refused.exit_code == 7, refused.output
        assert "unlock.outside_window" in refused.output
        assert refused.stdout_bytes.find((tmp_path / f"{volume}.key").read_bytes()) == -1
    assert audited(stack, "unlock.outside_window")
    inside = fetch(tpm, out, volume="open")
    assert inside.exit_code == 0, inside.output
    assert inside.stdout_bytes == (tmp_path / "open.key").read_bytes()


def test_a_crypto_service_killed_mid_release_releases_nothing_and_the_retry_unlocks(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    """The other half of "the KMS killed mid-release": the key holder, not the broker.
    The crypto service is stopped, an Unlock that passed every check waits on its
    Decrypt, and the crypto service is killed: the device gets an error and nothing else,
    its challenge is spent, and once `kmsctl up` has restarted the crypto service the
    device's next fetch unlocks the volume."""
    import signal
    import threading
    import time

    from tests.conftest import SLOWDOWN

    released = Released(stack, device_tpm, luks_volume, tmp_path, "crashy-2")
    crypto_pid = released.children["crypto-hsm0"]
    outcome = released.outcome

    # Whether the Decrypt reached the stopped service before the kill or not, nothing
    # may come back but an error.
    os.kill(crypto_pid, signal.SIGSTOP)
    thread = threading.Thread(target=released.send)
    try:
        thread.start()
        thread.join(2.0)
    finally:
        os.kill(crypto_pid, signal.SIGKILL)
    thread.join(60 * SLOWDOWN)
    assert not thread.is_alive()
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], errors.DeadlineExceeded | errors.Unavailable), outcome
    assert outcome[0].reason in ("provider.deadline", "provider.unavailable"), outcome
    assert audited(stack, outcome[0].reason)
    with pytest.raises(errors.FailedPrecondition) as spent:
        released.resend()
    assert spent.value.reason == "attest.challenge_unknown"
    # The crypto service is back when a KMS Encrypt under the same key works again (that
    # spends no unlock challenge of this address's ration).
    deadline = time.monotonic() + 120 * SLOWDOWN
    while True:
        try:
            with stack.client() as client:
                client.encrypt(unlock_key, b"are you back")
            break
        except errors.KMSError:
            assert time.monotonic() < deadline, "the crypto service did not come back"
            time.sleep(0.5)
    got = fetch(released.tpm, released.out)
    assert got.exit_code == 0, got.output
    assert opens(released.image, got.stdout_bytes)


def test_the_board_keyscript_feeds_cryptsetup_the_released_secret(
    stack: KmsStack,
    unlock_key: str,
    device_tpm: DeviceFactory,
    luks_volume: LuksFactory,
    tmp_path: Path,
) -> None:
    """The board image's crypttab keyscript, its placeholders filled as the recipe fills
    them, run as cryptsetup runs it (CRYPTTAB_NAME set, its stdout piped into
    `cryptsetup --key-file -`): the volume opens with what it prints."""
    import subprocess

    from tests.conftest import SLOWDOWN
    from tests.e2e.conftest import BIN

    tpm = device_tpm()
    out = attested(stack, tpm, tmp_path, "board-1")
    secret = add_secret(stack, tpm, "board-1", tmp_path)
    image = luks_volume(secret)
    sysconf = tmp_path / "etc"
    sysconf.mkdir()
    (sysconf / "edgekms").symlink_to(out)
    shipped = Path(__file__).resolve().parents[2] / (
        "yocto-layer/recipes-edgekms/edgekms/files/edgekms-unlock-keyscript"
    )
    script = tmp_path / "edgekms-unlock-keyscript"
    script.write_text(
        shipped.read_text().replace("@BINDIR@", str(BIN)).replace("@SYSCONFDIR@", str(sysconf))
    )
    keyscript = subprocess.Popen(
        ["sh", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CRYPTTAB_NAME": "data", "EDGEKMS_UNLOCK_TCTI": tpm.tcti},
    )
    assert keyscript.stdout is not None
    try:
        opened = subprocess.run(
            ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(image)],
            stdin=keyscript.stdout,
            capture_output=True,
            timeout=120 * SLOWDOWN,
        )
        keyscript.stdout.close()
        keyscript.wait(timeout=60 * SLOWDOWN)
    finally:
        if keyscript.poll() is None:
            keyscript.kill()
            keyscript.wait()
    assert keyscript.returncode == 0, keyscript.stderr.read() if keyscript.stderr else ""
    assert opened.returncode == 0, opened.stderr
