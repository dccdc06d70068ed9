"""An attested device uses the key its AK certified: `kmsctl enroll --attest` against the
real stack (`kmsctl up --ek-ca`) with a swtpm whose EK certificate the test manufacturer
signed, behind tpm2-abrmd (as a device's TPM is behind /dev/tpmrm0). The out-dir's
config.toml (`key_store = "tpm"`) then makes the device a client of the KMS with mutual
TLS through the TPM (edgekms.keytunnel and tpm2-openssl load device.tss2.pem): whoami,
`kmsctl key sign`, `kmsctl client renew` (same key, the certified one), and `kmsctl
unlock fetch` still works from the same directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms import tpmcred
from mgmt.cli import cli
from mgmt.client import KMSClient
from mgmt.devicekey import tpm_public_key
from mgmt.tpmdevice import DeviceTpm
from tests.attest.conftest import ManagedDeviceFactory
from tests.attest.test_attested_enroll import enroll_address, new_token, refusal
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack
from tests.enroll.conftest import run, run_json

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def kmsctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True, text=True, check=False, timeout=180 * SLOWDOWN, env=dict(os.environ),
    )  # fmt: skip


def attest_enroll(stack: KmsStack, tcti: str, token: Path, fingerprint: str, out: Path) -> str:
    """`kmsctl enroll --attest` as the device runs it; its combined output."""
    done = kmsctl(
        "enroll", "--attest", "--tpm-tcti", tcti, "--server", enroll_address(stack),
        "--token", str(token), "--fingerprint", fingerprint, "--out-dir", str(out), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def certificate(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / "device.crt").read_bytes())


def test_an_attested_device_signs_renews_and_unlocks_with_its_certified_key(
    stack: KmsStack, managed_device_tpm: ManagedDeviceFactory, tmp_path: Path
) -> None:
    tpm = managed_device_tpm()
    run_json(stack, "key", "create", "devices/gw-tls/app", "--type", "ec-p256")
    run_json(stack, "key", "create", "unlock", "--type", "aes-256")
    token, fingerprint = new_token(stack, tmp_path, "gw-tls", "--attest")
    out = tmp_path / "dev"
    done = json.loads(attest_enroll(stack, tpm.tcti, token, fingerprint, out))
    config = Path(done["config"])
    assert config == out / "config.toml"
    text = config.read_text()
    assert 'key_store = "tpm"' in text and tpm.tcti in text

    # The certificate is for the key the AK certified, and that key is the TSS2 PEM the
    # config names: the key recorded at enrollment is the one TLS uses.
    blob = (out / "device.tss2.pem").read_bytes()
    assert blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    first = certificate(out)
    assert first.public_key() == tpm_public_key(blob)
    shown = run_json(stack, "device", "show", "gw-tls")
    assert shown["ek_sha256"] == done["ek_sha256"]

    # A client of the KMS with that key: mutual TLS through the TPM.
    with KMSClient.from_config(config, timeout=30 * SLOWDOWN) as device:
        me = device.whoami()
        assert (me.client, me.role) == ("gw-tls", "signer")
    data = tmp_path / "reading.txt"
    data.write_bytes(b"reading 7")
    sig = tmp_path / "reading.sig"
    signed = kmsctl(
        "key", "sign", "devices/gw-tls/app", "--in", str(data), "--out", str(sig),
        "--config", str(config),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stdout + signed.stderr
    with stack.client() as admin:
        public = serialization.load_der_public_key(admin.get_public_key("devices/gw-tls/app").der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig.read_bytes(), b"reading 7", ec.ECDSA(hashes.SHA256()))

    # client renew: a new certificate for the same, certified key.
    renewed = kmsctl("client", "renew", "--config", str(config), "-o", "json")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    second = certificate(out)
    assert second.serial_number != first.serial_number
    assert second.public_key().public_bytes(*SPKI) == first.public_key().public_bytes(*SPKI)
    with KMSClient.from_config(config, timeout=30 * SLOWDOWN) as device:
        assert device.whoami().client == "gw-tls"
    # A new key would be one no AK certified: refused, the certificate kept.
    rekeyed = kmsctl("client", "renew", "--rekey", "--config", str(config), "-o", "json")
    assert rekeyed.returncode == 6, rekeyed.stdout + rekeyed.stderr
    assert "renew.rekey_attested" in rekeyed.stderr
    assert certificate(out).serial_number == second.serial_number
    with KMSClient.from_config(config, timeout=30 * SLOWDOWN) as device:
        assert device.whoami().client == "gw-tls"

    # Remote unlock from the same directory (device.json) and the same TPM.
    with DeviceTpm(tpm.tcti) as device_tpm:
        digest = device_tpm.pcr_digest([0, 7]).hex()
        ek = device_tpm.evidence().ek_public
    assert tpmcred.ek_identity(tpmcred.parse_public(ek).public_key_der).hex() == done["ek_sha256"]
    secret = tmp_path / "data.key"
    added = run(
        stack, "unlock", "add", "gw-tls", "--volume", "data", "--pcrs", "0,7",
        "--pcr-digest", digest, "--generate", "--secret-out", str(secret),
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    got = CliRunner().invoke(
        cli, ["unlock", "fetch", "--volume", "data", "--device-dir", str(out), "--tcti", tpm.tcti]
    )
    assert got.exit_code == 0, got.output
    assert got.stdout_bytes == secret.read_bytes()


def test_an_attested_enrollment_never_overwrites_a_client_config(
    stack: KmsStack, managed_device_tpm: ManagedDeviceFactory, tmp_path: Path
) -> None:
    """A config.toml already in the out-dir (a device enrolled before, by any method) is
    refused before the TPM or the token is touched: the token stays redeemable."""
    tpm = managed_device_tpm()
    token, fingerprint = new_token(stack, tmp_path, "gw-keep", "--attest")
    out = tmp_path / "dev"
    out.mkdir()
    before = '# an earlier enrollment\nbroker = "127.0.0.1:1"\n'
    (out / "config.toml").write_text(before)
    refused = CliRunner().invoke(
        cli,
        [
            "enroll", "--attest", "--tpm-tcti", tpm.tcti, "--server", enroll_address(stack),
            "--token", str(token), "--fingerprint", fingerprint, "--out-dir", str(out),
        ],
    )  # fmt: skip
    assert "enroll.exists" in refusal(refused)
    assert refused.exit_code == 3  # INVALID_ARGUMENT
    assert (out / "config.toml").read_text() == before
    assert not (out / "device.tss2.pem").exists() and not (out / "device.crt").exists()
    # Nothing was spent: the same token enrolls into a fresh directory.
    attest_enroll(stack, tpm.tcti, token, fingerprint, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "config.toml").is_file()
