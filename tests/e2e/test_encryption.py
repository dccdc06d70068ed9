"""Encrypt, Decrypt, GenerateDataKey and RotateKey through the real stack (`kmsctl up
--tpm swtpm`: a SoftHSM token as hsm0 and a swtpm as tpm0), for every key type that can
encrypt, on both providers; every call lands in the audit log without its plaintext."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekms import envelope, errors
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack

ENCRYPT = pb.KeyOptions(usage=pb.KEY_USAGE_ENCRYPT_DECRYPT)
# (provider, cli key type, options): every key type that can encrypt, on both providers.
CASES = [
    ("hsm0", "aes-256", None),
    ("hsm0", "rsa-2048", ENCRYPT),
    ("hsm0", "rsa-3072", ENCRYPT),
    ("tpm0", "aes-256", None),
    ("tpm0", "rsa-2048", ENCRYPT),
]
EXPECTED_ALGORITHM = {
    ("hsm0", "aes-256"): pb.ENCRYPTION_ALGORITHM_AES_256_GCM,
    ("tpm0", "aes-256"): pb.ENCRYPTION_ALGORITHM_TPM_HMAC_AES_256_GCM,
}


@pytest.fixture(scope="module")
def enc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    stack = start_stack(tmp_path_factory.mktemp("encstack") / "data", "--tpm", "swtpm")
    yield stack
    assert stop_stack(stack) == 0


def _name(provider: str, key_type: str) -> str:
    return f"enc/{provider}-{key_type}"


@pytest.fixture(scope="module")
def keys(enc_stack: KmsStack) -> list[str]:
    names = []
    with enc_stack.client(timeout=60) as client:
        for provider, key_type, options in CASES:
            key = client.create_key(
                _name(provider, key_type), key_type, provider=provider, options=options
            )
            assert key.version == 1
            names.append(key.name)
    return names


@pytest.mark.parametrize(("provider", "key_type", "options"), CASES)
def test_round_trip_with_aad(
    enc_stack: KmsStack, keys: list[str], provider: str, key_type: str, options: object
) -> None:
    name = _name(provider, key_type)
    plaintext = secrets.token_bytes(190 if key_type.startswith("rsa") else 4096)
    with enc_stack.client() as client:
        sealed = client.encrypt(name, plaintext, aad=b"volume=data")
        assert sealed.key_name == name and sealed.key_version == 1
        want = EXPECTED_ALGORITHM.get((provider, key_type), pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256)
        assert sealed.algorithm == want
        parsed = envelope.decode(sealed.ciphertext)
        assert (parsed.key_name, parsed.key_version, parsed.algorithm) == (name, 1, want)
        assert plaintext not in sealed.ciphertext
        assert client.decrypt(sealed.ciphertext, aad=b"volume=data") == plaintext
        assert client.decrypt(sealed.ciphertext, aad=b"volume=data", name=name) == plaintext
        # Two encryptions of one plaintext differ (fresh nonce, salt or OAEP seed).
        again = client.encrypt(name, plaintext, aad=b"volume=data")
        assert again.ciphertext != sealed.ciphertext
        with pytest.raises(errors.KMSError) as wrong_aad:
            client.decrypt(sealed.ciphertext, aad=b"volume=other")
    assert wrong_aad.value.reason == "decrypt.failed"


@pytest.mark.parametrize(("provider", "key_type", "options"), CASES)
def test_data_key_unwraps(
    enc_stack: KmsStack, keys: list[str], provider: str, key_type: str, options: object
) -> None:
    name = _name(provider, key_type)
    with enc_stack.client() as client:
        made = client.generate_data_key(name, aad=b"ctx")
        assert len(made.plaintext) == 32
        assert client.decrypt(made.ciphertext, aad=b"ctx") == made.plaintext
        hidden = client.generate_data_key(name, without_plaintext=True)
        assert hidden.plaintext == b""
        assert len(client.decrypt(hidden.ciphertext)) == 32


@pytest.mark.parametrize("provider", ["hsm0", "tpm0"])
def test_rotation_keeps_old_ciphertexts(enc_stack: KmsStack, provider: str) -> None:
    name = f"enc/rotate-{provider}"
    with enc_stack.client(timeout=60) as client:
        client.create_key(name, "aes-256", provider=provider)
        before = client.encrypt(name, b"written before the rotation", aad=b"a")
        key = client.rotate_key(name)
        assert key.version == 2
        after = client.encrypt(name, b"written after", aad=b"a")
        assert after.key_version == 2 and before.key_version == 1
        assert client.rotate_key(name).version == 3
        assert client.decrypt(before.ciphertext, aad=b"a") == b"written before the rotation"
        assert client.decrypt(after.ciphertext, aad=b"a") == b"written after"
        assert client.get_key(name).version == 3
        # Destroying the key takes every version from the token: nothing decrypts.
        client.destroy_key(name)
        with pytest.raises(errors.KMSError) as gone:
            client.decrypt(before.ciphertext, aad=b"a")
    assert gone.value.reason == "key.destroyed"


def audit_bytes(stack: KmsStack) -> bytes:
    """`kmsctl audit tail -o json`, as an operator reads the log."""
    return subprocess.run(
        [str(BIN / "kmsctl"), "audit", "tail", "-o", "json"],
        env=stack.env(),
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout


def audit_entries(out: bytes) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [line["entry"] for line in lines if line.get("entry")]


def test_every_call_is_audited_without_plaintext(enc_stack: KmsStack, keys: list[str]) -> None:
    name = _name("hsm0", "aes-256")
    secret = b"audit-canary-" + secrets.token_hex(8).encode()
    with enc_stack.client() as client:
        sealed = client.encrypt(name, secret, aad=b"canary-aad")
        client.decrypt(sealed.ciphertext, aad=b"canary-aad")
    out = audit_bytes(enc_stack)
    actions = [(e["action"], e["target"], e["outcome"]) for e in audit_entries(out)]
    assert ("Encrypt", name, "ok") in actions
    assert ("Decrypt", name, "ok") in actions
    assert secret not in out and secret.hex().encode() not in out
    assert b"canary-aad" not in out


def test_signer_role_encrypts_operator_does_not(enc_stack: KmsStack, keys: list[str]) -> None:
    from tests.e2e.test_broker import _client_with, issue_client_cert

    name = _name("hsm0", "aes-256")
    with enc_stack.client() as admin:
        sealed = admin.encrypt(name, b"for the signer")
    cert, key = issue_client_cert(enc_stack, "enc-signer", "signer")
    with _client_with(enc_stack, cert, key) as signer:
        assert signer.decrypt(sealed.ciphertext) == b"for the signer"
    cert, key = issue_client_cert(enc_stack, "enc-operator", "operator")
    operator: KMSClient
    with _client_with(enc_stack, cert, key) as operator, pytest.raises(errors.KMSError) as refused:
        operator.decrypt(sealed.ciphertext)
    assert refused.value.reason == "authz.role_denied"


def _kmsctl(
    stack: KmsStack, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "kmsctl"), "key", *args],
        env=stack.env(),
        input=stdin,
        capture_output=True,
        timeout=180,
        check=False,
    )


def test_kmsctl_encrypt_decrypt_rotate(enc_stack: KmsStack, tmp_path: Path) -> None:
    """The CLI as a script uses it: stdin to a file, file to stdout, -o json with base64,
    a rotation in between, and the exit codes of a refusal."""
    name = "enc/cli-disks"
    made = _kmsctl(enc_stack, "create", name, "--type", "aes-256", "-o", "json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["usage"] == "encrypt"
    sealed_file = tmp_path / "pass.ekms"
    enc = _kmsctl(
        enc_stack, "encrypt", name, "--aad", "volume=data", "--out", str(sealed_file),
        stdin=b"disk passphrase",
    )  # fmt: skip
    assert enc.returncode == 0, enc.stderr
    assert b"disk passphrase" not in sealed_file.read_bytes()
    rotated = _kmsctl(enc_stack, "rotate", name, "-o", "json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["version"] == 2
    dec = _kmsctl(
        enc_stack, "decrypt", "--in", str(sealed_file), "--aad", "volume=data", "--out", "-"
    )
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == b"disk passphrase"
    as_json = _kmsctl(enc_stack, "encrypt", name, "-o", "json", stdin=b"\x00binary\xff")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert (doc["name"], doc["version"], doc["algorithm"]) == (name, 2, "aes-256-gcm")
    b64 = tmp_path / "ct.b64"
    b64.write_text(doc["ciphertext"])
    back = _kmsctl(enc_stack, "decrypt", "--in", str(b64), "--base64", "-o", "json")
    assert back.returncode == 0, back.stderr
    opened = json.loads(back.stdout)
    assert base64.b64decode(opened["plaintext"]) == b"\x00binary\xff"
    assert opened["version"] == 2
    wrong = _kmsctl(enc_stack, "decrypt", "--in", str(sealed_file), "--aad", "volume=other")
    assert wrong.returncode == 3  # INVALID_ARGUMENT
    assert b"decrypt.failed" in wrong.stderr and wrong.stdout == b""
    too_big = _kmsctl(enc_stack, "encrypt", name, stdin=bytes(64 * 1024 + 1))
    assert too_big.returncode == 3 and b"encrypt.plaintext_too_large" in too_big.stderr
