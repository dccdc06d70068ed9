"""`kmsctl key` against the real stack: the README tour (create, sign, pubkey, openssl
verify) in a real subprocess, json output, and the exit codes scripts depend on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from tests.tpm.swtpm_fixtures import swtpm_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(600)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


def _name(stem: str) -> str:
    return f"t/cli/{stem}-{uuid.uuid4().hex[:8]}"


def _run(kms_stack: Any, *args: str, input: bytes | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["key", *args, "--data-dir", str(kms_stack.data_dir)], input=input
    )


def _kmsctl(kms_stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEKMS_DATA_DIR": str(kms_stack.data_dir)}
    return subprocess.run(
        [KMSCTL, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _openssl_verify(pub: Path, sig: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_readme_tour_in_a_real_process(kms_stack: Any, tmp_path: Path) -> None:
    name = _name("web")
    data = tmp_path / "release.txt"
    data.write_text("the release\n")
    sig, pub = tmp_path / "release.sig", tmp_path / "web.pem"

    created = _kmsctl(kms_stack, "key", "create", name, "--type", "ec-p256")
    assert created.returncode == 0, created.stderr
    assert name in created.stdout
    signed = _kmsctl(kms_stack, "key", "sign", name, "--in", str(data), "--out", str(sig))
    assert signed.returncode == 0, signed.stderr
    exported = _kmsctl(kms_stack, "key", "pubkey", name, "--out", str(pub))
    assert exported.returncode == 0, exported.stderr
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")

    ok = _openssl_verify(pub, sig, data)
    assert ok.returncode == 0, ok.stderr
    assert "Verified OK" in ok.stdout
    data.write_text("tampered\n")
    assert _openssl_verify(pub, sig, data).returncode != 0

    missing = _kmsctl(kms_stack, "key", "show", _name("absent"))
    assert missing.returncode == ExitCode.NOT_FOUND
    assert missing.stderr.startswith("kmsctl: key.not_found: ")


@pytest.mark.parametrize("cli_type", ["rsa-2048", "ec-p384", "ed25519"])
def test_sign_verify_other_types(kms_stack: Any, tmp_path: Path, cli_type: str) -> None:
    name = _name(cli_type)
    created = _run(kms_stack, "create", name, "--type", cli_type)
    assert created.exit_code == 0, created.output
    if cli_type.startswith("rsa"):
        assert f"generating {cli_type} key {name}" in created.stderr  # progress, one line
    data = tmp_path / "in.bin"
    data.write_bytes(os.urandom(3000))
    sig, pub = tmp_path / "sig", tmp_path / "pub.pem"
    assert _run(kms_stack, "sign", name, "--in", str(data), "--out", str(sig)).exit_code == 0
    assert _run(kms_stack, "pubkey", name, "--out", str(pub)).exit_code == 0
    verified = _run(kms_stack, "verify", name, "--in", str(data), "--sig", str(sig))
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.strip() == "valid"
    if cli_type == "ed25519":
        cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin"]
        cmd += ["-in", str(data), "-sigfile", str(sig)]
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    else:
        ok = _openssl_verify(pub, sig, data)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_json_output_and_stdin(kms_stack: Any, tmp_path: Path) -> None:
    name = _name("json")
    created = _run(
        kms_stack, "create", name, "--type", "ec-p256", "--label", "env=test", "-o", "json"
    )
    assert created.exit_code == 0, created.output
    record = json.loads(created.stdout)
    assert record["name"] == name
    assert record["type"] == "ec-p256"
    assert record["state"] == "active"
    assert record["labels"] == {"env": "test"}
    assert bytes.fromhex(record["key_id"])
    assert record["created_at"]

    shown = json.loads(_run(kms_stack, "show", name, "-o", "json").stdout)
    assert shown["key_id"] == record["key_id"]
    listed = json.loads(_run(kms_stack, "list", "--prefix", name, "-o", "json").stdout)
    assert [k["name"] for k in listed] == [name]

    pub = json.loads(_run(kms_stack, "pubkey", name, "-o", "json").stdout)
    assert pub["type"] == "ec-p256"
    assert pub["pem"].startswith("-----BEGIN PUBLIC KEY-----")

    sig = tmp_path / "sig"
    signed = _run(
        kms_stack, "sign", name, "--in", "-", "--out", str(sig), "-o", "json", input=b"from stdin"
    )
    assert signed.exit_code == 0, signed.output
    out = json.loads(signed.stdout)
    assert out["algorithm"] == "ecdsa-sha256"
    assert sig.read_bytes() and out["signature"]
    src = tmp_path / "src"
    src.write_bytes(b"from stdin")
    verified = _run(kms_stack, "verify", name, "--in", str(src), "--sig", str(sig), "-o", "json")
    assert json.loads(verified.stdout) == {"name": name, "algorithm": "ecdsa-sha256", "valid": True}


def test_exit_codes(kms_stack: Any, tmp_path: Path) -> None:
    name = _name("codes")
    assert _run(kms_stack, "create", name, "--type", "ec-p256").exit_code == 0
    data, sig = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(b"payload")
    assert _run(kms_stack, "sign", name, "--in", str(data), "--out", str(sig)).exit_code == 0

    # A signature that does not verify: exit 1, not an error.
    data.write_bytes(b"payload, changed")
    bad = _run(kms_stack, "verify", name, "--in", str(data), "--sig", str(sig))
    assert bad.exit_code == ExitCode.FAILURE
    assert bad.stdout.strip() == "invalid"

    missing = _run(kms_stack, "show", _name("absent"))
    assert missing.exit_code == ExitCode.NOT_FOUND
    assert missing.stderr.startswith("kmsctl: key.not_found: ")

    invalid = _run(kms_stack, "create", "Bad Name", "--type", "ec-p256")
    assert invalid.exit_code == ExitCode.INVALID_ARGUMENT
    assert invalid.stderr.startswith("kmsctl: key.name_invalid: ")

    mismatch = _run(
        kms_stack,
        "sign",
        name,
        "--in",
        str(data),
        "--out",
        str(tmp_path / "s2"),
        "--algorithm",
        "rsa-pss-sha256",
    )
    assert mismatch.exit_code == ExitCode.INVALID_ARGUMENT
    assert "sign.algorithm_mismatch" in mismatch.stderr
    assert not (tmp_path / "s2").exists()

    exists = _run(kms_stack, "create", name, "--type", "ec-p256")
    assert exists.exit_code == ExitCode.ALREADY_EXISTS


def test_lifecycle_through_the_cli(kms_stack: Any, tmp_path: Path) -> None:
    name = _name("life")
    data = tmp_path / "d"
    data.write_bytes(b"d")
    assert _run(kms_stack, "create", name, "--type", "ec-p256").exit_code == 0
    disabled = _run(kms_stack, "disable", name)
    assert disabled.exit_code == 0
    assert disabled.stdout.strip() == f"{name}: disabled"
    refused = _run(kms_stack, "sign", name, "--in", str(data), "--out", str(tmp_path / "s"))
    assert refused.exit_code == ExitCode.FAILED_PRECONDITION
    assert refused.stderr.startswith("kmsctl: key.disabled: ")
    assert _run(kms_stack, "enable", name).stdout.strip() == f"{name}: active"

    # No terminal and no --yes: nothing happens.
    assert _run(kms_stack, "destroy", name).exit_code == ExitCode.USAGE
    assert json.loads(_run(kms_stack, "show", name, "-o", "json").stdout)["state"] == "active"
    destroyed = _run(kms_stack, "destroy", name, "--yes", "-o", "json")
    assert destroyed.exit_code == 0, destroyed.output
    assert json.loads(destroyed.stdout)["state"] == "destroyed"
    listed = _run(kms_stack, "list", "--prefix", name)
    assert name not in listed.stdout
    assert name in _run(kms_stack, "list", "--prefix", name, "--all").stdout


def _destroy_on_a_terminal(kms_stack: Any, name: str, answer: bytes) -> tuple[int, bytes]:
    """Run `kmsctl key destroy NAME` with a pseudo-terminal as stdin and answer the prompt."""
    import pty
    import select

    main_fd, child_fd = pty.openpty()
    try:
        process = subprocess.Popen(
            [KMSCTL, "key", "destroy", name],
            stdin=child_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "EDGEKMS_DATA_DIR": str(kms_stack.data_dir)},
        )
        assert process.stderr is not None
        prompt = b""
        while b"[y/N]" not in prompt:  # click prompts on stderr (err=True)
            ready, _, _ = select.select([process.stderr], [], [], 30)
            assert ready, f"no prompt; got {prompt!r}"
            chunk = os.read(process.stderr.fileno(), 1024)
            assert chunk, f"kmsctl exited before prompting: {prompt!r}"
            prompt += chunk
        os.write(main_fd, answer)
        out, err = process.communicate(timeout=60)
        return process.returncode, out + err
    finally:
        os.close(main_fd)
        os.close(child_fd)


def test_destroy_asks_on_a_terminal(kms_stack: Any) -> None:
    name = _name("confirm")
    assert _run(kms_stack, "create", name, "--type", "ec-p256").exit_code == 0
    code, output = _destroy_on_a_terminal(kms_stack, name, b"n\n")
    assert code == 1, output  # click.Abort
    assert json.loads(_run(kms_stack, "show", name, "-o", "json").stdout)["state"] == "active"
    code, output = _destroy_on_a_terminal(kms_stack, name, b"y\n")
    assert code == 0, output
    assert f"{name}: destroyed".encode() in output


def _tpm_broker(parts: Any, swtpm: Any) -> None:
    """Add a TPM crypto service (tpm0) beside hsm0 and restart the broker knowing both."""
    import asyncio

    import nats

    from edgekms.crypto_client import CryptoClient
    from edgekms.errors import KMSError
    from mgmt.natsserver import wait_for_port

    conf = parts.root / "crypto-tpm.toml"
    conf.write_text(
        f'provider_id = "tpm0"\nnats_url = "{parts.nats.url}"\n[tpm2]\n'
        f'tcti = "{swtpm.tcti}"\nstate_dir = "{parts.root / "tpm-state"}"\n'
    )
    parts._spawn(
        "crypto-tpm",
        [str(Path(KMSCTL).parent / "kms-crypto"), "--config", str(conf)],
        dict(os.environ),
    )

    async def wait_tpm() -> None:
        nc = await nats.connect(parts.nats.url)
        try:
            for _ in range(300):
                try:
                    await CryptoClient(nc).ping("tpm0", timeout=0.5)
                    return
                except KMSError:
                    assert parts.processes["crypto-tpm"].poll() is None, "kms-crypto tpm0 died"
                    await asyncio.sleep(0.1)
            raise AssertionError("tpm0 never answered")
        finally:
            await nc.close()

    asyncio.run(wait_tpm())
    parts.stop("broker")
    pki = parts.root / "pki"
    broker_conf = parts.root / "broker-tpm.toml"
    broker_conf.write_text(
        f'listen = "127.0.0.1:{parts.broker_port}"\nnats_url = "{parts.nats.url}"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0", "tpm0"]\nsign_timeout = 10.0\n[tls]\n'
        f'cert = "{pki / "broker.crt"}"\nkey = "{pki / "broker.key"}"\n'
        f'client_ca = "{pki / "internal-ca.crt"}"\n'
    )
    parts._spawn(
        "broker",
        [str(Path(KMSCTL).parent / "kms-broker"), "--config", str(broker_conf)],
        dict(os.environ),
    )
    wait_for_port("127.0.0.1", parts.broker_port, 30, parts.processes["broker"])


@pytest.mark.tpm
def test_attest_a_tpm_key(parts: Any, swtpm_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    _tpm_broker(parts, swtpm_factory())

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["key", *args, "--data-dir", str(parts.root)])

    created = run("create", "device/id", "--type", "ec-p256", "--provider", "tpm0")
    assert created.exit_code == 0, created.output
    ak = tmp_path / "ak.pem"
    first = run("attest", "device/id", "--save-ak", str(ak), "-o", "json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["verified"] is True
    assert report["ak_pinned"] is False
    assert "not pinned" in first.stderr
    assert ak.read_text() == report["ak_pem"]

    pinned = run("attest", "device/id", "--ak", str(ak), "-o", "json")
    assert pinned.exit_code == 0, pinned.output
    second = json.loads(pinned.stdout)
    assert second["ak_pinned"] is True
    assert second["nonce"] != report["nonce"]  # fresh every time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    wrong = run("attest", "device/id", "--ak", str(other))
    assert wrong.exit_code == ExitCode.FAILED_PRECONDITION
    assert wrong.stderr.startswith("kmsctl: attest.ak_mismatch: ")

    assert run("create", "soft/id", "--type", "ec-p256").exit_code == 0
    unsupported = run("attest", "soft/id")
    assert unsupported.exit_code == ExitCode.FAILED_PRECONDITION
    assert unsupported.stderr.startswith("kmsctl: attest.unsupported: ")
