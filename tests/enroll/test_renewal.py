"""Renewal by the certificate itself against a real stack: a client renews its own
certificate over mutual TLS with it (same key and --rekey), the old one is refused from
then on, a retry of the same renewal gets the same certificate, and a revoked client
cannot renew; a mini-CA certificate is renewed by its holder with `cert renew --self`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from edgekms import errors
from mgmt.cli.common import ExitCode
from mgmt.client import KMSClient
from mgmt.clientconfig import load_client_config
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json


def add_client(stack: KmsStack, tmp: Path, name: str, role: str = "signer") -> Path:
    out = tmp / name
    run_json(stack, "client", "add", name, "--role", role, "--out-dir", str(out))
    return out / "config.toml"


def client_with(config: Path, cert_pem: bytes, key_pem: bytes) -> KMSClient:
    loaded = load_client_config(config)
    return KMSClient(
        loaded.broker,
        ca_cert=loaded.ca_cert.read_bytes(),
        cert=cert_pem,
        key=key_pem,
        server_name=loaded.server_name,
        timeout=20,
    )


def test_a_client_renews_itself_and_the_old_certificate_is_superseded(
    stack: KmsStack, tmp_path: Path
) -> None:
    config = add_client(stack, tmp_path, "renewer")
    loaded = load_client_config(config)
    old_cert, old_key = loaded.cert.read_bytes(), loaded.key.read_bytes()
    old_serial = x509.load_pem_x509_certificate(old_cert).serial_number

    with client_with(config, old_cert, old_key) as old:
        first = old.renew_client(request_id="renew-1")
        assert first.client.name == "renewer" and first.client.role == "signer"
        new = x509.load_pem_x509_certificate(first.certificate_pem.encode())
        assert new.serial_number != old_serial
        assert new.public_key() == x509.load_pem_x509_certificate(old_cert).public_key()
        # A lost answer: the same request, from the old certificate, gets the same one.
        again = old.renew_client(request_id="renew-1")
        assert again.certificate_pem == first.certificate_pem
        # Anything else from the old certificate is refused.
        with pytest.raises(errors.Unauthenticated) as refused:
            old.whoami()
        assert refused.value.reason == "auth.superseded"
        with pytest.raises(errors.Unauthenticated) as refused:
            old.renew_client(request_id="renew-2")
        assert refused.value.reason == "auth.superseded"
    with client_with(config, first.certificate_pem.encode(), old_key) as renewed:
        assert renewed.whoami().client == "renewer"
    listed = {c["name"]: c for c in run_json(stack, "client", "list")}
    assert listed["renewer"]["serial"] == format(new.serial_number, "x")


def test_client_renew_cli_rekeys_and_replaces_the_files(stack: KmsStack, tmp_path: Path) -> None:
    config = add_client(stack, tmp_path, "rekeyer")
    loaded = load_client_config(config)
    old_key = loaded.key.read_bytes()
    out = run_json(stack, "client", "renew", "--rekey", config=config)
    assert out["rekeyed"] is True and out["name"] == "rekeyer"
    assert loaded.key.read_bytes() != old_key
    assert stat.S_IMODE(loaded.key.stat().st_mode) == 0o600
    with KMSClient.from_config(config, timeout=20) as kms:
        me = kms.whoami()
        assert me.client == "rekeyer"
    # And again with the same key, from the renewed files.
    out = run_json(stack, "client", "renew", config=config)
    assert out["rekeyed"] is False
    with KMSClient.from_config(config, timeout=20) as kms:
        assert kms.whoami().client == "rekeyer"


def test_a_revoked_client_cannot_renew(stack: KmsStack, tmp_path: Path) -> None:
    config = add_client(stack, tmp_path, "gone")
    before = load_client_config(config).cert.read_bytes()
    run_json(stack, "client", "revoke", "gone")
    result = run(stack, "client", "renew", config=config)
    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    assert "auth.revoked" in result.output
    assert load_client_config(config).cert.read_bytes() == before
    listed = {c["name"]: c for c in run_json(stack, "client", "list", "--all")}
    assert listed["gone"]["status"] == "revoked"


def test_cert_renew_self_by_a_signer_holding_the_key(
    stack: KmsStack, ca_dir: Path, tmp_path: Path
) -> None:
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    issued = run_json(
        stack,
        "cert", "issue", "--profile", "https-server", "--generate", "--cn", "web.home.arpa",
        "--san", "dns:web.home.arpa", "--out", str(crt), "--key-out", str(key),
    )  # fmt: skip
    # A signer (no certificate rights) renews it by proving it holds the key.
    signer = add_client(stack, tmp_path, "web-agent")
    renewed = run_json(
        stack, "cert", "renew", "--self", "--cert", str(crt), "--key", str(key), config=signer
    )
    assert renewed["renewed_from"] == issued["serial"]
    assert renewed["requester"] == "admin"  # still the original requester's
    old = run_json(stack, "cert", "show", issued["serial"])
    assert old["status"] == "revoked" and old["revocation_reason"] == "superseded"
    leaf = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    assert int(renewed["serial"], 16) == leaf.serial_number

    # Rekey: a new key file (0600) and a certificate for it; the previous one superseded.
    before_key = key.read_bytes()
    rekeyed = run_json(
        stack, "cert", "renew", "--self", "--cert", str(crt), "--key", str(key), "--rekey",
        config=signer,
    )  # fmt: skip
    assert key.read_bytes() != before_key and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert rekeyed["renewed_from"] == renewed["serial"]
    # The superseded certificate cannot be renewed again.
    stale = tmp_path / "stale.crt"
    run(stack, "cert", "show", renewed["serial"], "--out", str(stale))
    again = run(stack, "cert", "renew", "--self", "--cert", str(stale), "--key", str(key))
    assert again.exit_code == ExitCode.FAILED_PRECONDITION, again.output
    assert "cert.superseded" in again.output
