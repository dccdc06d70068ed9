"""`kmsctl enroll --pkcs11` against the real stack (`kmsctl up`) and a real SoftHSM token:
the device key is made in the token (sensitive, not extractable) and never leaves it:
no key file at all in the out-dir, the token signs the CSR and, through edgekms.keytunnel
and libp11's engine, every TLS handshake. The device signs through the broker with
`kmsctl key sign` and renews with `client renew` (same key, then `--rekey`: a new key in
the same token, the old one destroyed). A wrong PIN or a missing token is a typed error
that writes nothing and spends no token."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from mgmt.client import KMSClient
from mgmt.clientconfig import load_client_config
from mgmt.devicekey import uri_attribute
from mgmt.softhsm import init_token
from tests.conftest import SLOWDOWN, TokenInfo
from tests.e2e.conftest import BIN, KmsStack
from tests.enroll.conftest import run_json
from tests.enroll.test_enroll import enroll_address, new_token, token_state
from tests.enroll.test_enroll_tpm import assert_no_clear_private_key


@pytest.fixture
def device_token(softhsm_token: TokenInfo, tmp_path: Path) -> TokenInfo:
    """A token of the device's own, beside the session's in the same SOFTHSM2_CONF (one per
    process). Not the shared token: libp11's engine, which the key tunnel uses, fails to
    enumerate a token's private keys once one is of a type it does not know (the Ed25519
    keys the contract tests leave there): "Unable to enumerate private keys". A device's
    token holds its own key; docs/security.md says so."""
    pin = secrets.token_hex(8)
    token = init_token(
        softhsm_token.conf.parent,
        f"dev-{secrets.token_hex(4)}",
        pin=pin,
        so_pin=secrets.token_hex(8),
    )
    pin_file = tmp_path / "device-pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    return TokenInfo(token, pin, pin_file)


def p11_enroll(
    stack: KmsStack, token: Path, fingerprint: str, out: Path, hsm: TokenInfo, *pin: str
) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "enroll", "--pkcs11", f"pkcs11:token={hsm.label}", "--pkcs11-module", hsm.module,
            *pin, "--server", enroll_address(stack), "--token", str(token),
            "--fingerprint", fingerprint, "--out-dir", str(out), "-o", "json",
        ],
    )  # fmt: skip


_LABELS = """
import json, os, sys
import pkcs11
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
with token.open(user_pin=os.environ["TEST_PIN"]) as session:
    found = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})
    print(json.dumps(sorted(str(o[pkcs11.Attribute.LABEL]) for o in found)))
"""


def labels(hsm: TokenInfo) -> set[str]:
    """Labels of the private keys on the token, read in a process of its own: SoftHSM
    sees only the tokens that existed when this process first loaded it, and the
    device's token is made per test (the PIN travels in the environment, not argv)."""
    done = subprocess.run(
        [sys.executable, "-c", _LABELS, hsm.module, hsm.label],
        env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf), "TEST_PIN": hsm.pin},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(done.stdout))


def kmsctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True, text=True, check=False, timeout=180 * SLOWDOWN, env=os.environ,
    )  # fmt: skip


def certificate(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / "device.crt").read_bytes())


def test_a_device_enrolls_with_a_pkcs11_token_signs_and_renews(
    stack: KmsStack, device_token: TokenInfo, tmp_path: Path
) -> None:
    hsm = device_token
    run_json(stack, "key", "create", "devices/p11-dev/app", "--type", "ec-p256")
    token, fingerprint, token_id = new_token(stack, tmp_path, "p11-dev")
    out = tmp_path / "dev"
    before = labels(hsm)
    # A kmsctl of its own: the device's token was made after this process loaded SoftHSM.
    result = kmsctl(
        "enroll", "--pkcs11", f"pkcs11:token={hsm.label}", "--pkcs11-module", hsm.module,
        "--pkcs11-pin-file", str(hsm.pin_file), "--server", enroll_address(stack),
        "--token", str(token), "--fingerprint", fingerprint, "--out-dir", str(out), "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "p11-dev"
    assert token_state(stack, token_id) == "used"
    # The key is on the token; the out-dir holds no key file and no private key.
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "config.toml", "device.crt"]
    assert_no_clear_private_key(out)
    config = out / "config.toml"
    parsed = load_client_config(config)
    assert parsed.key_store == "pkcs11" and parsed.pin_file == hsm.pin_file.resolve()
    assert hsm.pin not in config.read_text()
    first_label = uri_attribute(parsed.key_uri, "object")
    assert labels(hsm) == before | {first_label}

    with KMSClient.from_config(config, timeout=30) as device:
        me = device.whoami()
        assert (me.client, me.role) == ("p11-dev", "signer")
    data = tmp_path / "reading.txt"
    data.write_bytes(b"reading 42")
    signed = kmsctl(
        "key", "sign", "devices/p11-dev/app", "--in", str(data), "--out",
        str(tmp_path / "reading.sig"), "--config", str(config),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stdout + signed.stderr
    with stack.client() as admin:
        public = serialization.load_der_public_key(admin.get_public_key("devices/p11-dev/app").der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify((tmp_path / "reading.sig").read_bytes(), b"reading 42", ec.ECDSA(hashes.SHA256()))

    # client renew: same key, a new certificate.
    first = certificate(out)
    renewed = kmsctl("client", "renew", "--config", str(config), "-o", "json")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    second = certificate(out)
    assert second.serial_number != first.serial_number
    assert second.public_key() == first.public_key()

    # --rekey: a new key in the same token, the config points at it, the old one is gone.
    rekeyed = kmsctl("client", "renew", "--rekey", "--config", str(config), "-o", "json")
    assert rekeyed.returncode == 0, rekeyed.stdout + rekeyed.stderr
    third = certificate(out)
    new_label = uri_attribute(load_client_config(config).key_uri, "object")
    assert new_label != first_label
    assert labels(hsm) == before | {new_label}
    assert third.public_key() != first.public_key()
    assert_no_clear_private_key(out)
    with KMSClient.from_config(config, timeout=30) as device:
        assert device.whoami().client == "p11-dev"
    listed = {c["name"]: c for c in run_json(stack, "client", "list")}
    assert listed["p11-dev"]["serial"] == format(third.serial_number, "x")


def test_a_wrong_pin_writes_nothing_and_spends_no_token(
    stack: KmsStack, softhsm_token: TokenInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process (CliRunner), where SoftHSM sees only the tokens made before it loaded:
    # the shared token, which a wrong PIN leaves untouched.
    token, fingerprint, token_id = new_token(stack, tmp_path, "p11-wrong-pin")
    monkeypatch.setenv("EDGEKMS_PKCS11_PIN", "0" + softhsm_token.pin)
    before = labels(softhsm_token)
    out = tmp_path / "dev"
    result = p11_enroll(stack, token, fingerprint, out, softhsm_token)
    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    assert "device_key.pin_incorrect" in result.output
    assert not out.exists() or not any(out.iterdir())
    assert token_state(stack, token_id) == "active"
    assert labels(softhsm_token) == before


def test_a_missing_token_writes_nothing_and_spends_no_token(
    stack: KmsStack, device_token: TokenInfo, tmp_path: Path
) -> None:
    token, fingerprint, token_id = new_token(stack, tmp_path, "p11-no-token")
    absent = TokenInfo(device_token.token, device_token.pin, device_token.pin_file)
    out = tmp_path / "dev"
    result = CliRunner().invoke(
        cli,
        [
            "enroll", "--pkcs11", "no-such-token", "--pkcs11-module", absent.module,
            "--pkcs11-pin-file", str(absent.pin_file), "--server", enroll_address(stack),
            "--token", str(token), "--fingerprint", fingerprint, "--out-dir", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == ExitCode.FAILED_PRECONDITION, result.output
    assert "device_key.token_missing" in result.output
    assert not out.exists() or not any(out.iterdir())
    assert token_state(stack, token_id) == "active"


def test_a_pin_in_the_uri_is_refused_before_anything_happens(tmp_path: Path) -> None:
    """A PIN on the command line shows in `ps`: `pin-value` in the URI is a usage error."""
    token = tmp_path / "t.token"
    token.write_text("ekt1.x.y\n")
    result = CliRunner().invoke(
        cli,
        [
            "enroll", "--pkcs11", "pkcs11:token=dev;pin-value=1234", "--pkcs11-module",
            "/nonexistent.so", "--server", "127.0.0.1:1", "--token", str(token),
            "--fingerprint", "0" * 64, "--out-dir", str(tmp_path / "dev"),
        ],
    )  # fmt: skip
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "pin-value" in result.output
    assert not (tmp_path / "dev").exists()
