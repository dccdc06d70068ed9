"""`kmsctl enroll --tpm` against the real stack (`kmsctl up`) and a real swtpm: the
device key is made in the TPM and never leaves it (no PEM private key in the out-dir;
the TPM signs the CSR and, through edgekms.keytunnel and tpm2-openssl, every TLS
handshake). The device then signs through the broker with `kmsctl key sign`, renews its
certificate with `client renew` (same key, then `--rekey`: a new key in the same TPM)
and with `kmsctl agent --once`. The swtpm is behind tpm2-abrmd, as a device's TPM is
behind the kernel's resource manager (/dev/tpmrm0). An absent TPM, or a TPM that did not
make the key, is a typed error that writes nothing and spends no token."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms import errors
from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from mgmt.client import KMSClient
from mgmt.devicekey import tpm_public_key
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack
from tests.enroll.conftest import run, run_json
from tests.enroll.test_enroll import enroll_address, new_token, token_state
from tests.logevents import has_event
from tests.tpm.swtpm_fixtures import ManagedTpmFactory, ResourceManagedTpm
from tests.tpm.swtpm_fixtures import managed_tpm_factory as managed_tpm_factory  # fixture

# Private-key PEM labels a clear key would carry (PKCS#8, SEC1, PKCS#1, encrypted).
CLEAR_KEY_LABELS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
)


def tpm_enroll(stack: KmsStack, token: Path, fingerprint: str, out: Path, tcti: str) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "enroll", "--tpm", "--tpm-tcti", tcti, "--server", enroll_address(stack),
            "--token", str(token), "--fingerprint", fingerprint, "--out-dir", str(out),
            "-o", "json",
        ],
    )  # fmt: skip


def assert_no_clear_private_key(out: Path) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(label in data for label in CLEAR_KEY_LABELS), path
            try:
                serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                continue
            pytest.fail(f"{path} holds a usable private key")


def kmsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True, text=True, check=False, timeout=180 * SLOWDOWN,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def certificate(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / "device.crt").read_bytes())


def test_a_device_enrolls_with_its_tpm_signs_and_renews(
    stack: KmsStack, managed_tpm_factory: ManagedTpmFactory, tmp_path: Path
) -> None:
    tpm: ResourceManagedTpm = managed_tpm_factory()
    run_json(stack, "key", "create", "devices/tpm-dev/app", "--type", "ec-p256")
    token, fingerprint, token_id = new_token(stack, tmp_path, "tpm-dev")
    out = tmp_path / "dev"
    result = tpm_enroll(stack, token, fingerprint, out, tpm.tcti)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "tpm-dev"
    assert token_state(stack, token_id) == "used"
    # The key is the TPM-wrapped blob (0600 all the same), and nothing in the clear.
    blob = out / "device.tss2.pem"
    assert blob.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    assert not (out / "device.key").exists()
    assert_no_clear_private_key(out)
    assert certificate(out).public_key() == tpm_public_key(blob.read_bytes())
    config = out / "config.toml"
    text = config.read_text()
    assert 'key_store = "tpm"' in text and tpm.tcti in text

    # A client of the KMS with that key: mutual TLS through the TPM, no extra flags.
    with KMSClient.from_config(config, timeout=30) as device:
        me = device.whoami()
        assert (me.client, me.role) == ("tpm-dev", "signer")
    data = tmp_path / "reading.txt"
    data.write_bytes(b"reading 42")
    signed = kmsctl(
        "key", "sign", "devices/tpm-dev/app", "--in", str(data), "--out",
        str(tmp_path / "reading.sig"), "--config", str(config),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stdout + signed.stderr
    with stack.client() as admin:
        public = serialization.load_der_public_key(admin.get_public_key("devices/tpm-dev/app").der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify((tmp_path / "reading.sig").read_bytes(), b"reading 42", ec.ECDSA(hashes.SHA256()))

    # client renew: same key, a new certificate; the old one is superseded.
    first = certificate(out)
    renewed = kmsctl("client", "renew", "--config", str(config), "-o", "json")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    second = certificate(out)
    assert second.serial_number != first.serial_number
    assert second.public_key() == first.public_key()

    # --rekey: a new key made in the same TPM; the blob replaced, still nothing clear.
    old_blob = blob.read_bytes()
    rekeyed = kmsctl(
        "client", "renew", "--rekey", "--days", "1", "--config", str(config), "-o", "json"
    )
    assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
    third = certificate(out)
    assert blob.read_bytes() != old_blob
    assert third.public_key() == tpm_public_key(blob.read_bytes()) != first.public_key()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    assert_no_clear_private_key(out)

    # The agent renews the identity by itself, through the TPM: a one-day certificate
    # with renew_at = 0.001 is due 86 s after its notBefore; --once until it is.
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'client_config = "{config}"\nstate_file = "{tmp_path / "state.json"}"\n'
        "min_interval_seconds = 1\n[identity]\nrenew_at = 0.001\n"
    )
    deadline = time.monotonic() + 300 * SLOWDOWN
    while True:
        once = kmsctl("agent", "--config", str(agent), "--once")
        assert once.returncode == 0, once.stdout + once.stderr
        if certificate(out).serial_number != third.serial_number:
            break
        assert time.monotonic() < deadline, "the agent never renewed the identity"
        time.sleep(5)
    assert has_event(once.stderr, "agent_cert_renewed", item="identity"), once.stderr
    fourth = certificate(out)
    assert fourth.serial_number != third.serial_number
    assert fourth.public_key() == third.public_key()
    with KMSClient.from_config(config, timeout=30) as device:
        assert device.whoami().client == "tpm-dev"
    listed = {c["name"]: c for c in run_json(stack, "client", "list")}
    assert listed["tpm-dev"]["serial"] == format(fourth.serial_number, "x")


def test_an_absent_tpm_writes_nothing_and_spends_no_token(stack: KmsStack, tmp_path: Path) -> None:
    token, fingerprint, token_id = new_token(stack, tmp_path, "tpm-absent")
    out = tmp_path / "dev"
    absent = f"swtpm:path={tmp_path / 'no-tpm' / 'swtpm.sock'}"
    result = tpm_enroll(stack, token, fingerprint, out, absent)
    assert result.exit_code == ExitCode.FAILED_PRECONDITION, result.output
    assert "device_key.tpm_unavailable" in result.output
    assert not out.exists() or not any(out.iterdir())
    assert token_state(stack, token_id) == "active"


def test_a_tpm_that_did_not_make_the_key_cannot_use_it(
    stack: KmsStack, managed_tpm_factory: ManagedTpmFactory, tmp_path: Path
) -> None:
    """The blob is useless anywhere but in its TPM: pointed at another TPM, the client
    gets a typed error (the tunnel cannot load the key), not a TLS failure later."""
    tpm, other = managed_tpm_factory(), managed_tpm_factory()
    token, fingerprint, _ = new_token(stack, tmp_path, "tpm-moved")
    out = tmp_path / "dev"
    result = tpm_enroll(stack, token, fingerprint, out, tpm.tcti)
    assert result.exit_code == 0, result.output
    config = out / "config.toml"
    config.write_text(config.read_text().replace(tpm.tcti, other.tcti))
    with pytest.raises(errors.FailedPrecondition) as refused:
        KMSClient.from_config(config, timeout=30)
    assert refused.value.reason == "device_key.tpm_unavailable"
    shown = run(stack, "key", "list", config=config)
    assert shown.exit_code == ExitCode.FAILED_PRECONDITION, shown.output
