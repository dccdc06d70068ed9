"""A key policy restricts signers, not the administrator (issue 14, item 7): after the
README's `key policy nas/https --allow backup-job:sign:ecdsa-sha256`, admin still
verifies, reads the public key and manages the key, and only signing is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.conftest import BIN, KmsStack


def _kmsctl(stack: KmsStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args], env=stack.env(), capture_output=True, text=True, timeout=120
    )


def test_a_policy_restricts_signers_not_the_administrator(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    message, signature = tmp_path / "hello.txt", tmp_path / "hello.sig"
    message.write_text("hello from the NAS\n")
    assert (
        _kmsctl(kms_stack, "key", "create", "adminpol/https", "--type", "ec-p256").returncode == 0
    )
    signed = _kmsctl(
        kms_stack, "key", "sign", "adminpol/https", "--in", str(message), "--out", str(signature)
    )
    assert signed.returncode == 0, signed.stderr
    policy = _kmsctl(
        kms_stack, "key", "policy", "adminpol/https", "--allow", "backup-job:sign:ecdsa-sha256"
    )
    assert policy.returncode == 0, policy.stderr

    verify = _kmsctl(
        kms_stack, "key", "verify", "adminpol/https", "--in", str(message), "--sig", str(signature)
    )
    assert verify.returncode == 0, verify.stderr
    pubkey = _kmsctl(kms_stack, "key", "pubkey", "adminpol/https", "--out", str(tmp_path / "k.pem"))
    assert pubkey.returncode == 0, pubkey.stderr
    assert _kmsctl(kms_stack, "key", "disable", "adminpol/https").returncode == 0
    assert _kmsctl(kms_stack, "key", "enable", "adminpol/https").returncode == 0

    # Signing is what the policy gives to backup-job alone, admin included.
    refused = _kmsctl(
        kms_stack, "key", "sign", "adminpol/https", "--in", str(message), "--out", "-"
    )
    assert refused.returncode == 7
    assert "kmsctl: authz.policy_denied:" in refused.stderr
