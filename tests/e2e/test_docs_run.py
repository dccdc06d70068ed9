"""Doc blocks no other test ran, run as written (issue 14, item 9) against real stacks
started by the e2e fixtures: the README's "Certificates for your NAS: OpenVPN and HTTPS"
(every block, in order), the encryption block of "A five-minute tour", `kmsctl status`
with the client config docs/containers.md ("How `make test` runs the stack") and
docs/deploy.md ("Compose") put in `.edgekms-client/`, docs/spiffe.md's "Registration
entries" and "Rotating the trust domain's keys", and docs/deploy.md's "Backup and
restore". Each block comes from the doc text (tests/doccommands.py); only its
placeholders are put in (SERIAL, OLD_SERIAL, the stack's ports and paths under the
test's directory). Each line runs in bash in turn, in the block's directory; a line
must exit 0 unless the doc says it is refused."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.conftest import SLOWDOWN
from tests.doccommands import ROOT, Block, Ran, block, lines, run_lines
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(900)

NAS = "## Certificates for your NAS: OpenVPN and HTTPS"
TOUR = "## A five-minute tour"
STATUS = [
    ("docs/containers.md", "## How `make test` runs the stack"),
    ("docs/deploy.md", "## Compose"),
]
ENTRIES = "## Registration entries"
ROTATE = "## Rotating the trust domain's keys"
BACKUP = "## Backup and restore"


def shell_env(stack: KmsStack) -> dict[str, str]:
    return {**stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}


def serial_of(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def output(ran: list[Ran], start: str) -> str:
    return next(r.out for r in ran if r.line.startswith(start))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    started = start_stack(tmp_path_factory.mktemp("docsrun") / "data")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def nas(stack: KmsStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's NAS section, all its blocks in order, in one directory: the CA it
    makes is the one the SPIFFE test below builds on."""
    work = tmp_path_factory.mktemp("nas")
    env = shell_env(stack)

    def nas_block(index: int) -> Block:
        return block("README.md", NAS, index)

    # 1. The stack is the fixture's: the `kmsctl up` line as written, started for us.
    first = lines(nas_block(0).text)
    assert first[0].split("#")[0].strip() == "kmsctl up --data-dir ~/.local/share/edgekms &"
    ran = run_lines(first[1:], work, env)
    assert "Home CA" in output(ran, "kmsctl ca init")
    assert "ca/root" in output(ran, "kmsctl key show ca/root")
    root = x509.load_pem_x509_certificate((work / "ca" / "root.crt").read_bytes())
    assert root.subject.rfc4514_string() == "CN=Home CA"
    assert len(x509.load_pem_x509_certificates((work / "ca" / "chain.pem").read_bytes())) == 2

    # 2. OpenVPN: server, laptop, the phone's PKCS#12, the CRL.
    ran = run_lines(lines(nas_block(1).text), work, env)
    assert leaf(work / "server.crt").subject.rfc4514_string() == "CN=vpn.home.arpa"
    assert (work / "laptop.key").stat().st_mode & 0o077 == 0
    assert "CN = phone" in output(ran, "openssl pkcs12") or "CN=phone" in output(
        ran, "openssl pkcs12"
    )
    assert (work / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL-----")

    # A CSR of a key already there.
    run_lines(lines(nas_block(2).text), work, env)
    key = serialization.load_pem_private_key((work / "server.key").read_bytes(), None)
    assert leaf(work / "server.crt").public_key() == key.public_key()

    # The laptop's one-file OpenVPN profile: SERIAL is the laptop's certificate.
    export = nas_block(4).text.replace("SERIAL", serial_of(leaf(work / "laptop.crt")))
    run_lines(lines(export), work, env)
    profile = (work / "laptop.ovpn").read_text()
    assert (work / "laptop.ovpn").stat().st_mode & 0o777 == 0o600
    assert "remote vpn.home.arpa 1194" in profile and "<tls-crypt>" in profile
    assert (work / "ta.key").exists()

    # 3. HTTPS for nginx: openssl verifies it as a server certificate.
    ran = run_lines(lines(nas_block(5).text), work, env)
    assert "nas.crt: OK" in output(ran, "openssl verify")

    # 4. Day to day: SERIAL is the NAS's certificate (renewed, then shown).
    nas_serial = serial_of(leaf(work / "nas.crt"))
    ran = run_lines(lines(nas_block(7).text.replace("SERIAL", nas_serial)), work, env)
    assert "nas.home.arpa" in output(ran, "kmsctl cert list --match nas.home.arpa")
    renewed = leaf(work / "nas.crt")
    assert serial_of(renewed) != nas_serial
    assert "superseded" in output(ran, "kmsctl cert show")
    # Nothing expired a year ago in a CA made a minute ago.
    assert "0 record(s) expired before 365 day(s) ago" in output(ran, "kmsctl ca prune")

    # 5. The phone is lost: SERIAL is its certificate, the CA's HTTP is the stack's.
    password = (work / "pw.txt").read_text().splitlines()[0].encode()
    bundle = pkcs12.load_pkcs12((work / "phone.p12").read_bytes(), password)
    assert bundle.cert is not None
    phone_serial = serial_of(bundle.cert.certificate)
    lost = (
        nas_block(8)
        .text.replace("SERIAL", phone_serial)
        .replace("http://127.0.0.1:8180", stack.ca_url)
    )
    ran = run_lines(lines(lost), work, env, refused=("-crl_check -CAfile trust-crl.pem",))
    refusal = next(r for r in ran if "-crl_check" in r.line)
    assert "certificate revoked" in refusal.out + refusal.err
    crl = x509.load_pem_x509_crl((work / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(phone_serial, 16)) is not None
    assert x509.load_der_x509_crl((work / "ca.crl").read_bytes()) == crl
    issuing = x509.load_der_x509_certificate((work / "issuing-ca.crt").read_bytes())
    assert issuing.subject.rfc4514_string() == "CN=Home CA Issuing CA"

    # 6. The next intermediate, the old one revoked: OLD_SERIAL is the current one's.
    old = x509.load_pem_x509_certificate((work / "ca" / "intermediate.crt").read_bytes())
    ran = run_lines(lines(nas_block(9).text.replace("OLD_SERIAL", serial_of(old))), work, env)
    chain = x509.load_pem_x509_certificates((work / "ca" / "chain.pem").read_bytes())
    assert old in chain and len(chain) == 3  # both intermediates and the root
    with stack.client() as kms:
        assert kms.get_public_key("ca/intermediate-2").der
    shown = subprocess.run(
        ["kmsctl", "key", "show", "ca/root", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60 * SLOWDOWN, check=True,
    )  # fmt: skip
    assert json.loads(shown.stdout)["state"] == "disabled"
    return work


def test_readme_nas_certificates_run_as_written(nas: Path) -> None:
    """The fixture ran and checked every block; here what they left, once more."""
    assert leaf(nas / "nas.crt").subject.rfc4514_string() == "CN=nas.home.arpa"


def test_readme_tour_encryption_block_runs_as_written(stack: KmsStack, tmp_path: Path) -> None:
    # The tour's first block made hello.txt (its `echo` line); this block uses it.
    tour = lines(block("README.md", TOUR, 0).text)
    run_lines([line for line in tour if line.startswith("echo ")], tmp_path, shell_env(stack))
    ran = run_lines(lines(block("README.md", TOUR, 1).text), tmp_path, shell_env(stack))
    assert output(ran, "kmsctl key decrypt") == "disk passphrase"
    assert (tmp_path / "pass.ekms").stat().st_size > 0
    encrypted = json.loads(output(ran, "kmsctl key encrypt nas/disks --in"))
    assert encrypted["version"] == 2, encrypted  # after the rotation


@pytest.mark.parametrize(("doc", "heading"), STATUS)
def test_status_with_the_client_config_in_the_working_dir(
    stack: KmsStack, tmp_path: Path, doc: str, heading: str
) -> None:
    """`kmsctl status --config .edgekms-client/config.toml`: the client config the
    compose stack's init writes there, here the fixture stack's."""
    shutil.copytree(stack.client_config.parent, tmp_path / ".edgekms-client")
    status = [line for line in lines(block(doc, heading).text) if line.startswith("kmsctl ")]
    assert len(status) == 1
    env = {k: v for k, v in shell_env(stack).items() if k != "EDGEKMS_DATA_DIR"}
    ran = run_lines(status, tmp_path, env)
    assert "hsm0" in ran[0].out and "broker" in ran[0].out


def test_spiffe_doc_entry_and_rotation_run_as_written(
    stack: KmsStack, nas: Path, tmp_path: Path
) -> None:
    env = shell_env(stack)
    # Setup, as README.md's SPIFFE section has it: the NAS section left ca/root disabled,
    # and `spiffe init` certifies its signing CA with the root.
    setup = ["kmsctl key enable ca/root", "kmsctl spiffe init --trust-domain home.arpa"]
    run_lines(setup, tmp_path, env)
    ran = run_lines(lines(block("docs/spiffe.md", ENTRIES).text), tmp_path, env)
    assert "spiffe://home.arpa/backup" in ran[0].out
    ran = run_lines(lines(block("docs/spiffe.md", ROTATE).text), tmp_path, env)
    assert "generation 2 in use" in ran[0].out
    assert re.search(r"retired jwt key ca/spiffe-jwt\S*: trusted until", ran[0].out), ran[0].out
    listed = subprocess.run(
        ["kmsctl", "spiffe", "bundle", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60 * SLOWDOWN, check=True,
    )  # fmt: skip
    # The old JWT key stays in the bundle for the overlap, beside the new one.
    assert len(json.loads(listed.stdout)["jwks"]["keys"]) == 2


def test_deploy_backup_and_restore_run_as_written(tmp_path: Path) -> None:
    """The stack is stopped first, as the doc says; its paths are the test's."""
    source = start_stack(tmp_path / "kms")
    try:
        with source.client(timeout=60) as kms:
            kms.create_key("docs/backed-up", "ec-p256")
            public = kms.get_public_key("docs/backed-up").der
    finally:
        assert stop_stack(source) == 0
    (tmp_path / "usb").mkdir()
    passphrase = tmp_path / "backup.pass"
    passphrase.write_text("a long backup passphrase\n")
    passphrase.chmod(0o600)
    text = (
        block("docs/deploy.md", BACKUP)
        .text.replace("/mnt/usb/", f"{tmp_path}/usb/")
        .replace("/root/backup.pass", str(passphrase))
        .replace("/srv/kms-new", str(tmp_path / "kms-new"))
        .replace("/srv/kms", str(tmp_path / "kms"))
    )
    shell = lines(text)
    up = shell.pop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKMS_")}
    env["PATH"] = f"{ROOT}/.venv/bin:/usr/bin:/bin"
    ran = run_lines(shell, tmp_path, env)
    assert (tmp_path / "usb" / "kms.backup").stat().st_size > 0
    assert "intact" in ran[1].out
    assert f"kmsctl up --data-dir {tmp_path / 'kms-new'}" in ran[2].out
    # The last line, `kmsctl up` on the restored dir, through the fixture's starter (it
    # waits for ready and stops it), its broker on a free port for 127.0.0.1:9443.
    args = shlex.split(up)
    assert args[:4] == ["kmsctl", "up", "--data-dir", str(tmp_path / "kms-new")]
    assert args[4:] == ["--broker-listen", "127.0.0.1:9443"]
    restored = start_stack(tmp_path / "kms-new")
    try:
        with restored.client(timeout=60) as kms:
            assert kms.get_public_key("docs/backed-up").der == public
    finally:
        assert stop_stack(restored) == 0
