"""`kmsctl backup` and `kmsctl restore` against the real stack (`kmsctl up --tpm swtpm`:
nats-server with JetStream, SoftHSM, swtpm): a backup of a stopped stack restored into a
new data dir comes up on other ports with the same keys, CA and audit chain; TPM keys
come back only on the TPM that made them; and every bad input is refused with its typed
error and exit code, writing nothing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mgmt.cli.common import ExitCode
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.logevents import has_event

pytestmark = pytest.mark.tpm

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
MESSAGE = b"signed before the backup"


def kmsctl(
    *args: str, data_dir: Path | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEKMS_BACKUP_PASSPHRASE"}
    if data_dir is not None:
        env["EDGEKMS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [KMSCTL, *args],
        capture_output=True,
        text=stdin is None,
        input=stdin,
        env=env,
        timeout=300,
        check=False,
    )


def tree(path: Path) -> dict[str, int]:
    """Every file under `path` with its size: what "nothing changed" is checked against."""
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@dataclass
class Source:
    """A stopped stack with keys on both providers, a CA and a certificate, backed up."""

    data_dir: Path
    work: Path
    backup: Path
    passphrase: Path
    hsm_pub: bytes
    tpm_pub: bytes
    signature: bytes
    serials: set[str]
    crl_number: int
    audit_entries: int
    refused_while_running: subprocess.CompletedProcess[str]
    backup_run: subprocess.CompletedProcess[str]


def _audit_entries(data_dir: Path) -> int:
    done = kmsctl("audit", "verify", "-o", "json", data_dir=data_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(json.loads(done.stdout)["entries"])


def _serials(data_dir: Path) -> set[str]:
    done = kmsctl("cert", "list", "-o", "json", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    items = listed["certificates"] if isinstance(listed, dict) else listed
    return {str(c["serial"]) for c in items}


def _revoke(data_dir: Path, serial: str) -> int:
    """Revoke `serial`; the CRL number that revocation gets."""
    done = kmsctl("cert", "revoke", serial, "-o", "json", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["crl_number"])


def _issue(data_dir: Path, work: Path, cn: str) -> str:
    done = kmsctl(
        "cert", "issue", "--profile", "https-server", "--generate", "--cn", cn,
        "--san", f"dns:{cn}", "--out", str(work / f"{cn}.crt"),
        "--key-out", str(work / f"{cn}.key"), "-o", "json",
        data_dir=data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["serial"])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    work = tmp_path_factory.mktemp("backup")
    data_dir = work / "data"
    stack = start_stack(data_dir, "--tpm", "swtpm")
    try:
        with stack.client(timeout=60) as client:
            client.create_key("app/hsm", "ec-p256")
            client.create_key("app/tpm", "ec-p256", provider="tpm0")
            signature = client.sign("app/hsm", MESSAGE)
            hsm_pub = client.get_public_key("app/hsm").pem.encode()
            tpm_pub = client.get_public_key("app/tpm").pem.encode()
        done = kmsctl("ca", "init", data_dir=data_dir)
        assert done.returncode == 0, done.stderr
        _issue(data_dir, work, "before.home.arpa")
        crl_number = _revoke(data_dir, _issue(data_dir, work, "revoked.home.arpa"))
        serials = _serials(data_dir)
        audit_entries = _audit_entries(data_dir)
        passphrase = work / "pass.txt"
        passphrase.write_text("correct horse battery staple\n")
        backup = work / "kms.backup"
        refused = kmsctl(
            "backup", "--out", str(backup), "--passphrase-file", str(passphrase),
            data_dir=data_dir,
        )  # fmt: skip
    finally:
        assert stop_stack(stack) == 0
    run = kmsctl(
        "backup", "--out", str(backup), "--passphrase-file", str(passphrase), "-o", "json",
        data_dir=data_dir,
    )  # fmt: skip
    yield Source(
        data_dir, work, backup, passphrase, hsm_pub, tpm_pub, signature, serials,
        crl_number, audit_entries, refused, run,
    )  # fmt: skip


def _up(data_dir: Path) -> KmsStack:
    return start_stack(data_dir, "--tpm", "swtpm")


def test_backup_of_a_stopped_stack_holds_every_stream_and_the_tpm_blobs(source: Source) -> None:
    assert source.backup_run.returncode == 0, source.backup_run.stderr
    summary = json.loads(source.backup_run.stdout)
    assert {"kms_keys", "kms_ca", "kms_clients"} <= set(summary["buckets"])
    assert {"KMS_AUDIT_BROKER", "KMS_AUDIT_CA", "KMS_AUDIT_CRYPTO-HSM0"} <= set(
        summary["audit_streams"]
    )
    assert summary["tpm_keys"] == {"tpm0": 1}
    assert summary["size"] == source.backup.stat().st_size
    log = (source.data_dir / "logs" / "backup.log").read_text()
    assert has_event(log, "backup written", out=source.backup, size=summary["size"])
    assert source.backup.stat().st_mode & 0o777 == 0o600
    # --check verifies the whole file and writes nothing.
    before = set(source.work.iterdir())
    checked = kmsctl(
        "restore", str(source.backup), "--check", "--passphrase-file", str(source.passphrase),
        "-o", "json", "--data-dir", str(source.work / "never-made"),
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["verified"] is True
    assert set(source.work.iterdir()) == before
    # Encrypted: no PEM, no PIN, no file name of the data dir shows through.
    blob = source.backup.read_bytes()
    pin = (source.data_dir / "secrets" / "hsm0.pin").read_bytes().strip()
    assert pin not in blob and b"BEGIN" not in blob and b"secrets/" not in blob


def test_restore_into_a_new_dir_brings_up_the_same_keys_ca_and_audit_chain(
    source: Source, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    done = kmsctl(
        "restore", str(source.backup), "--data-dir", str(target),
        "--passphrase-file", str(source.passphrase),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "restoring:" in done.stderr  # progress
    # The command says that TPM keys come back only on their own TPM.
    assert "tpm0: 1 key(s)" in done.stderr and "only on the TPM" in done.stderr
    log = (target / "logs" / "backup.log").read_text()
    assert has_event(log, "restored", file=source.backup, source=source.data_dir)
    stack = _up(target)  # a fresh swtpm: another TPM; other ports than the source's
    try:
        with stack.client(timeout=60) as client:
            assert {k.name for k in client.list_keys()} >= {"app/hsm", "app/tpm", "ca/root"}
            assert client.get_public_key("app/hsm").pem.encode() == source.hsm_pub
            fresh = client.sign("app/hsm", b"signed after the restore")
            assert client.verify("app/hsm", MESSAGE, source.signature)
        old_key = serialization.load_pem_public_key(source.hsm_pub)
        assert isinstance(old_key, ec.EllipticCurvePublicKey)
        old_key.verify(fresh, b"signed after the restore", ec.ECDSA(hashes.SHA256()))
        # The TPM key is listed but refuses: its blob is wrapped by the other TPM.
        msg = tmp_path / "msg"
        msg.write_bytes(MESSAGE)
        refused = kmsctl("key", "sign", "app/tpm", "--in", str(msg), "--out",
                         str(tmp_path / "sig"), data_dir=target)  # fmt: skip
        assert refused.returncode == ExitCode.FAILED_PRECONDITION
        assert "tpm.blob_rejected" in refused.stderr
        # The CA goes on: old certificates known, a new serial none of them has.
        new_serial = _issue(target, tmp_path, "after.home.arpa")
        assert new_serial not in source.serials
        assert _serials(target) == source.serials | {new_serial}
        # CRL numbers go on from the backup's: a relying party never sees one go back.
        assert _revoke(target, new_serial) > source.crl_number
        # The audit chain verifies across the restore and has grown from the backup's.
        assert _audit_entries(target) > source.audit_entries
    finally:
        assert stop_stack(stack) == 0


def test_restore_over_its_own_data_dir_keeps_its_tpm_and_the_tpm_key_signs(
    source: Source, tmp_path: Path
) -> None:
    """The same TPM (the data dir's swtpm, kept by --force) loads the restored blob. A
    running stack is never replaced."""
    stack = _up(source.data_dir)
    try:
        running = kmsctl(
            "restore", str(source.backup), "--data-dir", str(source.data_dir), "--force",
            "--passphrase-file", str(source.passphrase),
        )  # fmt: skip
        assert running.returncode == ExitCode.FAILED_PRECONDITION, running.stderr
        assert "restore.stack_running" in running.stderr
        with stack.client(timeout=60) as client:
            client.create_key("app/after-backup", "ec-p256")
    finally:
        assert stop_stack(stack) == 0
    done = kmsctl(
        "restore", str(source.backup), "--data-dir", str(source.data_dir), "--force",
        "--passphrase-file", str(source.passphrase), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replaced"] is True
    stack = _up(source.data_dir)
    try:
        with stack.client(timeout=60) as client:
            names = {k.name for k in client.list_keys()}
            assert "app/after-backup" not in names  # back to the backup's state
            signature = client.sign("app/tpm", MESSAGE)
        tpm_key = serialization.load_pem_public_key(source.tpm_pub)
        assert isinstance(tpm_key, ec.EllipticCurvePublicKey)
        tpm_key.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    finally:
        assert stop_stack(stack) == 0


def test_a_key_file_or_the_environment_instead_of_a_passphrase_file(
    source: Source, tmp_path: Path
) -> None:
    key = tmp_path / "backup.key"
    key.write_text(os.urandom(32).hex() + "\n")
    out = tmp_path / "with-key.backup"
    made = kmsctl("backup", "--out", str(out), "--key-file", str(key), data_dir=source.data_dir)
    assert made.returncode == 0, made.stderr
    checked = kmsctl("restore", str(out), "--check", "--key-file", str(key))
    assert checked.returncode == 0, checked.stderr
    env = {**os.environ, "EDGEKMS_BACKUP_PASSPHRASE": "from the environment"}
    out = tmp_path / "with-env.backup"
    argv = [KMSCTL, "backup", "--out", str(out), "--data-dir", str(source.data_dir)]
    made = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    argv = [KMSCTL, "restore", str(out), "--check"]
    checked = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    # The environment's passphrase, not the file's, opens it.
    wrong = kmsctl("restore", str(out), "--check", "--passphrase-file", str(source.passphrase))
    assert wrong.returncode == ExitCode.PERMISSION_DENIED


# -- bad input ----------------------------------------------------------------------


def test_backup_while_the_stack_runs_is_refused_naming_its_pid(source: Source) -> None:
    done = source.refused_while_running
    assert done.returncode == ExitCode.FAILED_PRECONDITION
    assert done.stderr.startswith("kmsctl: backup.stack_running:")
    assert "pid " in done.stderr
    # The refused run wrote nothing: the file there now is the later, successful one.
    assert source.backup_run.returncode == 0


def _variant(source: Source, tmp_path: Path, how: str) -> Path:
    blob = bytearray(source.backup.read_bytes())
    path = tmp_path / f"{how}.backup"
    if how == "truncated":
        del blob[len(blob) // 2 :]
    elif how == "tampered":
        blob[len(blob) // 2] ^= 0x40
    elif how == "newer_version":
        blob[8:10] = struct.pack(">H", 99)
    elif how == "not_a_backup":
        blob = bytearray(b"just some file\n")
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize(
    ("how", "secret", "code", "reason"),
    [
        pytest.param("wrong_passphrase", "wrong", ExitCode.PERMISSION_DENIED,
                     "backup.wrong_key", id="wrong_passphrase"),
        pytest.param("key_file_for_a_passphrase_backup", "key", ExitCode.PERMISSION_DENIED,
                     "backup.wrong_key", id="key_file_for_a_passphrase_backup"),
        pytest.param("truncated", "right", ExitCode.INVALID_ARGUMENT,
                     "backup.truncated", id="truncated"),
        pytest.param("tampered", "right", ExitCode.INVALID_ARGUMENT,
                     "backup.corrupt", id="tampered"),
        pytest.param("newer_version", "right", ExitCode.FAILED_PRECONDITION,
                     "backup.version_unsupported", id="newer_version"),
        pytest.param("not_a_backup", "right", ExitCode.INVALID_ARGUMENT,
                     "backup.not_a_backup", id="not_a_backup"),
        pytest.param("empty_passphrase", "empty", ExitCode.INVALID_ARGUMENT,
                     "backup.passphrase_empty", id="empty_passphrase"),
        pytest.param("no_passphrase_and_no_terminal", "none", ExitCode.INVALID_ARGUMENT,
                     "backup.passphrase_missing", id="no_passphrase_and_no_terminal"),
    ],
)  # fmt: skip
def test_a_bad_backup_or_secret_restores_nothing(
    source: Source, tmp_path: Path, how: str, secret: str, code: int, reason: str
) -> None:
    path = _variant(source, tmp_path, how)
    if how in ("wrong_passphrase", "key_file_for_a_passphrase_backup", "empty_passphrase",
               "no_passphrase_and_no_terminal"):  # fmt: skip
        path = source.backup
    args = {
        "right": ["--passphrase-file", str(source.passphrase)],
        "wrong": ["--passphrase-file", str(tmp_path / "wrong")],
        "empty": ["--passphrase-file", str(tmp_path / "empty")],
        "key": ["--key-file", str(tmp_path / "key")],
        "none": [],
    }[secret]
    (tmp_path / "wrong").write_text("not the passphrase\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "key").write_bytes(os.urandom(32))
    target = tmp_path / "restored"
    before = set(tmp_path.iterdir())
    done = kmsctl("restore", str(path), "--data-dir", str(target), *args, stdin=b"")
    err = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
    assert done.returncode == code, err
    assert f"kmsctl: {reason}:" in err
    # Nothing written: no data dir, no staging dir beside it.
    assert not target.exists()
    assert set(tmp_path.iterdir()) == before


def test_restore_over_a_data_dir_that_is_not_empty_is_refused_without_force(
    source: Source, tmp_path: Path
) -> None:
    target = tmp_path / "existing"
    (target / "secrets").mkdir(parents=True)
    (target / "secrets" / "keep").write_text("mine")
    done = kmsctl(
        "restore", str(source.backup), "--data-dir", str(target),
        "--passphrase-file", str(source.passphrase),
    )  # fmt: skip
    assert done.returncode == ExitCode.ALREADY_EXISTS, done.stderr
    assert "kmsctl: restore.data_dir_exists:" in done.stderr
    assert tree(target) == {"secrets/keep": 4}


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        pytest.param(
            "out_dir_missing", ExitCode.NOT_FOUND, "backup.out_dir_missing", id="out_dir_missing"
        ),
        pytest.param(
            "out_dir_not_writable",
            ExitCode.FAILED_PRECONDITION,
            "backup.out_unwritable",
            id="out_dir_not_writable",
        ),
        pytest.param("out_exists", ExitCode.ALREADY_EXISTS, "backup.out_exists", id="out_exists"),
        pytest.param(
            "not_a_data_dir", ExitCode.NOT_FOUND, "backup.no_data_dir", id="not_a_data_dir"
        ),
        pytest.param(
            "empty_passphrase",
            ExitCode.INVALID_ARGUMENT,
            "backup.passphrase_empty",
            id="empty_passphrase",
        ),
    ],
)
def test_a_bad_backup_request_writes_nothing(
    source: Source, tmp_path: Path, case: str, code: int, reason: str
) -> None:
    out = tmp_path / "new.backup"
    data_dir = source.data_dir
    passphrase = source.passphrase
    if case == "out_dir_missing":
        out = tmp_path / "no" / "such" / "dir" / "new.backup"
    elif case == "out_dir_not_writable":
        out = Path("/proc/edgekms-test.backup")  # not writable, not even by root
    elif case == "out_exists":
        out.write_text("an older backup")
    elif case == "not_a_data_dir":
        data_dir = tmp_path / "plain"
        data_dir.mkdir()
    else:
        passphrase = tmp_path / "empty"
        passphrase.write_text("")
    state_before = tree(source.data_dir)
    before = set(tmp_path.iterdir())
    done = kmsctl(
        "backup", "--out", str(out), "--passphrase-file", str(passphrase), data_dir=data_dir
    )
    assert done.returncode == code, done.stderr
    assert f"kmsctl: {reason}:" in done.stderr
    assert set(tmp_path.iterdir()) == before
    assert tree(source.data_dir) == state_before
    if case == "out_exists":
        assert out.read_text() == "an older backup"
    if case == "not_a_data_dir":
        assert not any(data_dir.iterdir())  # no lock file, no run/ made
