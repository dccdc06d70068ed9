"""The mini-CA with its keys in the TPM: `kmsctl up --tpm swtpm`, then `kmsctl ca init
--provider tpm0`, and a leaf that openssl verifies up to the TPM-held root."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from mgmt.cli import cli
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = [pytest.mark.tpm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tpm_ca_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    data_dir = tmp_path_factory.mktemp("tpmca") / "data"
    stack = start_stack(data_dir, "--tpm", "swtpm", "--ca-provider", "tpm0")
    yield stack
    assert stop_stack(stack) == 0, stack.log_path.read_text()[-2000:]


def test_ca_in_the_tpm_issues_a_verifiable_certificate(
    tpm_ca_stack: KmsStack, tmp_path: Path
) -> None:
    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(tpm_ca_stack.data_dir)])
        assert result.exit_code == 0, result.output
        return result.stdout

    ca_dir = tmp_path / "ca"
    run(
        "ca", "init", "--provider", "tpm0", "--name", "TPM CA", "--out-dir", str(ca_dir),
        "--disable-root",
    )  # fmt: skip
    shown = run("key", "show", "ca/root")
    assert "provider:    tpm0" in shown and "state:       disabled" in shown
    assert "state:       active" in run("key", "show", "ca/intermediate")
    out, key = tmp_path / "nas.crt", tmp_path / "nas.key"
    run(
        "cert", "issue", "--profile", "https-server", "--generate", "--cn", "nas.home.arpa",
        "--san", "dns:nas.home.arpa", "--out", str(out), "--key-out", str(key),
    )  # fmt: skip
    chain = x509.load_pem_x509_certificates(out.read_bytes())
    assert chain[-1].subject.rfc4514_string() == "CN=TPM CA"
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_dir / "root.crt"), "-untrusted",
         str(ca_dir / "intermediate.crt"), "-purpose", "sslserver", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
