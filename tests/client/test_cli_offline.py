"""kmsctl key commands where no broker is needed to see the answer: usage errors,
config errors, refusals before any call, and a broker that is not there."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgekms.v1 import common_pb2 as pb
from mgmt.cli import cli
from mgmt.cli.client_access import write_output
from mgmt.cli.common import ExitCode
from mgmt.cli.keys import default_algorithm_for, parse_labels
from mgmt.natsserver import free_port


def test_cli_default_algorithms_are_sha256() -> None:
    assert default_algorithm_for(pb.KEY_TYPE_EC_P384).cli_name == "ecdsa-sha256"
    assert default_algorithm_for(pb.KEY_TYPE_RSA_3072).cli_name == "rsa-pkcs1-sha256"
    assert default_algorithm_for(pb.KEY_TYPE_ED25519).cli_name == "ed25519"


def test_labels() -> None:
    assert parse_labels(("a=1", "b=x=y", "c=")) == {"a": "1", "b": "x=y", "c": ""}
    import click

    for bad in (("nokv",), ("=v",), ("a=1", "a=2")):
        with pytest.raises(click.BadParameter):
            parse_labels(bad)


def test_write_output_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sig"
    target.write_bytes(b"old")
    write_output(str(target), b"new signature")
    assert target.read_bytes() == b"new signature"
    assert [p.name for p in tmp_path.iterdir()] == ["sig"]


def test_missing_config_exits_failed_precondition(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["key", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.FAILED_PRECONDITION
    assert result.stderr.startswith("kmsctl: config.missing: ")
    assert "kmsctl init" in result.stderr


def test_unknown_type_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["key", "create", "k", "--type", "ec-p521", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == ExitCode.USAGE


def test_destroy_without_tty_or_yes_refuses_before_dialing(tmp_path: Path) -> None:
    # No config exists: had it tried to dial, the exit code would be FAILED_PRECONDITION.
    result = CliRunner().invoke(cli, ["key", "destroy", "web", "--data-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.USAGE
    assert "kmsctl: destroy.confirmation_required:" in result.stderr


def _self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.crt").write_bytes(pem)
    (directory / "admin.crt").write_bytes(pem)
    (directory / "admin.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "admin.key").chmod(0o600)


def test_no_broker_listening_is_unavailable_not_a_traceback(tmp_path: Path) -> None:
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    _self_signed(client_dir)
    (client_dir / "config.toml").write_text(
        f'broker = "127.0.0.1:{free_port()}"\nserver_name = "edgekms-broker"\n'
        'ca_cert = "ca.crt"\ncert = "admin.crt"\nkey = "admin.key"\n'
    )
    data = tmp_path / "data.txt"
    data.write_bytes(b"x")
    result = CliRunner().invoke(
        cli,
        [
            "key",
            "sign",
            "web",
            "--in",
            str(data),
            "--out",
            str(tmp_path / "sig"),
            "--algorithm",
            "ecdsa-sha256",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert result.stderr.startswith("kmsctl: transport.unavailable: ")
    assert not (tmp_path / "sig").exists()


def test_pinned_ak_file_pem_der_or_typed_error(tmp_path: Path) -> None:
    from edgekms.errors import InvalidArgument
    from mgmt.cli.keys import _load_public_key_der

    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "a.der").write_bytes(der)
    (tmp_path / "a.pem").write_bytes(pem)
    (tmp_path / "junk").write_bytes(b"not a key")
    assert _load_public_key_der(tmp_path / "a.der") == der
    assert _load_public_key_der(tmp_path / "a.pem") == der
    with pytest.raises(InvalidArgument) as junk:
        _load_public_key_der(tmp_path / "junk")
    assert junk.value.reason == "attest.ak_invalid"
    with pytest.raises(InvalidArgument) as missing:
        _load_public_key_der(tmp_path / "absent")
    assert missing.value.reason == "attest.ak_unreadable"
