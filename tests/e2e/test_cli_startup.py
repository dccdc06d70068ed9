"""What the real `kmsctl` console script imports for the commands a person waits for
(issue 14, item 6, p50 ≤ 200 ms; docs/performance.md, "kmsctl start-up"), against the
real stack, traced by Python's own import-time report: `--help` nothing but click and
the command table, `key list` and `key sign` grpc and the generated stubs, and neither
cryptography, the key tunnel, nats nor another command's modules. Each added import of
that kind costs every run of the command; this is where it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(600)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
# What none of the three may load: ~0.1 s each or more on this machine when quiet.
HEAVY = {"cryptography", "nats", "aiohttp", "asn1crypto", "pkcs11", "tpm2_pytss", "uvloop"}
OUR_HEAVY = {"edgekms.keytunnel", "edgekms.remote_key", "edgekms.identity", "mgmt.stack"}


def _traced(data_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run kmsctl with PYTHONPROFILEIMPORTTIME (-X importtime): every module it imports
    is a line on stderr."""
    env = {**os.environ, "EDGEKMS_DATA_DIR": str(data_dir), "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(
        [KMSCTL, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))
    return done, modules


def _packages(modules: set[str]) -> set[str]:
    return {m.partition(".")[0] for m in modules}


def test_help_imports_click_and_the_command_table_only(kms_stack: Any) -> None:
    done, modules = _traced(kms_stack.data_dir, "--help")
    assert done.returncode == 0, done.stderr
    assert "key " in done.stdout and "completion" in done.stdout
    assert {"click", "mgmt.cli"} <= modules
    assert not _packages(modules) & (HEAVY | {"grpc", "google", "edgekms"})
    assert not {m for m in modules if m.startswith("mgmt.cli.")} - {"mgmt.cli.common"}


def test_key_list_and_sign_import_grpc_and_stubs_only(kms_stack: Any, tmp_path: Path) -> None:
    name = f"t/startup/{uuid.uuid4().hex[:8]}"
    data, sig, pub = tmp_path / "data.txt", tmp_path / "data.sig", tmp_path / "pub.pem"
    data.write_bytes(b"signed by a lean kmsctl\n")
    env = {**os.environ, "EDGEKMS_DATA_DIR": str(kms_stack.data_dir)}
    for args in (["key", "create", name, "--type", "ec-p384"], ["key", "pubkey", name]):
        made = subprocess.run(
            [KMSCTL, *args, *(["--out", str(pub)] if "pubkey" in args else [])],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert made.returncode == 0, made.stderr

    listed, list_modules = _traced(kms_stack.data_dir, "key", "list", "--prefix", "t/startup/")
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout
    # sha384, not the default: hashlib's digest must be the one openssl checks.
    signed, sign_modules = _traced(
        kms_stack.data_dir, "key", "sign", name, "-a", "ecdsa-sha384",
        "--in", str(data), "--out", str(sig),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    verified = subprocess.run(
        ["openssl", "dgst", "-sha384", "-verify", str(pub), "-signature", str(sig), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr

    for modules in (list_modules, sign_modules):
        assert {"grpc", "edgekms.v1.keys_pb2", "edgekms.v1.keys_pb2_grpc"} <= modules
        assert not _packages(modules) & HEAVY, _packages(modules) & HEAVY
        assert not modules & OUR_HEAVY, modules & OUR_HEAVY
        commands = {m for m in modules if m.startswith("mgmt.cli.")}
        assert commands <= {
            "mgmt.cli.common",
            "mgmt.cli.keys",
            "mgmt.cli.policy",
            "mgmt.cli.client_access",
            "mgmt.cli.output",
            "mgmt.cli.completion",
        }, commands


def test_cert_issue_imports_neither_the_ceremony_nor_nats(kms_stack: Any, tmp_path: Path) -> None:
    """`cert issue` took about a second a run (200 took 203 s; the issue): it imported
    the ceremony (mgmt.pki) and through it nats-py and aiohttp to write one file, and
    cryptography's x509 to turn DER into PEM. With a CSR it now loads what `key sign`
    does; with --generate, cryptography to make the key, still no nats. The PEM it
    writes is byte for byte what cryptography writes (mgmt.bundle.pem_bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from mgmt.bundle import pem_bundle

    env = {**os.environ, "EDGEKMS_DATA_DIR": str(kms_stack.data_dir)}
    ca = subprocess.run(
        [KMSCTL, "ca", "init", "--name", "Startup CA"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert ca.returncode in (0, 5), ca.stderr  # 5: another test made the CA already
    key, csr = tmp_path / "leaf.key", tmp_path / "leaf.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-subj", "/CN=lean.home.arpa",
         "-addext", "subjectAltName=DNS:lean.home.arpa", "-out", str(csr)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    out = tmp_path / "leaf.crt"
    issued, modules = _traced(
        kms_stack.data_dir, "cert", "issue", "--profile", "https-server",
        "--csr", str(csr), "--out", str(out),
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert not _packages(modules) & HEAVY, _packages(modules) & HEAVY
    assert not modules & (OUR_HEAVY | {"mgmt.pki", "mgmt.bundle"})
    chain = x509.load_pem_x509_certificates(out.read_bytes())
    assert len(chain) >= 2
    assert chain[0].subject.rfc4514_string() == "CN=lean.home.arpa"
    ders = [c.public_bytes(Encoding.DER) for c in chain]
    assert out.read_bytes() == pem_bundle(ders[0], ders[1:])

    generated, gen_modules = _traced(
        kms_stack.data_dir, "cert", "issue", "--profile", "https-server", "--generate",
        "--cn", "gen.home.arpa", "--san", "dns:gen.home.arpa",
        "--out", str(tmp_path / "gen.crt"), "--key-out", str(tmp_path / "gen.key"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert not _packages(gen_modules) & {"nats", "aiohttp"}
    assert "mgmt.pki" not in gen_modules
    assert (tmp_path / "gen.key").stat().st_mode & 0o777 == 0o600
