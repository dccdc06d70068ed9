"""`kmsctl ca` and `kmsctl cert` end to end: a real `kmsctl up` stack of its own (the CA
is a singleton per stack), every command through the broker with the admin's client
certificate, results checked with cryptography, openssl and curl. These are the
commands of the README's NAS guide."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.e2e.test_broker import issue_client_cert

pytestmark = pytest.mark.timeout(600)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    data_dir = tmp_path_factory.mktemp("castack") / "data"
    started = start_stack(data_dir)
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cawork")
    (path / "pw.txt").write_text(PASSWORD + "\n")
    return path


@pytest.fixture(scope="module")
def ca_dir(stack: KmsStack, work: Path) -> Path:
    """`kmsctl ca init` once for the module, in a real process as the README shows."""
    done = kmsctl(stack, "ca", "init", "--name", "Home CA", "--out-dir", str(work / "ca"))
    assert done.returncode == 0, done.stderr
    assert "Home CA" in done.stdout
    return work / "ca"


def kmsctl(
    stack: KmsStack, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMSCTL, *args],
        env=stack.env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def run(stack: KmsStack, *args: str, config: Path | None = None) -> Result:
    extra = ["--config", str(config)] if config else []
    return CliRunner().invoke(cli, [*args, "--data-dir", str(stack.data_dir), *extra])


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def load_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


def verify(ca_dir: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return openssl(
        "verify",
        "-CAfile",
        str(ca_dir / "root.crt"),
        "-untrusted",
        str(ca_dir / "intermediate.crt"),
        "-purpose",
        purpose,
        str(cert),
    )


def issue_json(stack: KmsStack, *args: str) -> dict[str, Any]:
    result = run(stack, "cert", "issue", *args, "-o", "json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


# -- the CA itself ---------------------------------------------------------------------


def test_init_makes_a_root_and_an_intermediate_in_the_token(stack: KmsStack, ca_dir: Path) -> None:
    root, inter = load_chain(ca_dir / "root.crt")[0], load_chain(ca_dir / "intermediate.crt")[0]
    assert root.subject.rfc4514_string() == "CN=Home CA"
    inter.verify_directly_issued_by(root)
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert [c.subject for c in load_chain(ca_dir / "chain.pem")] == [inter.subject, root.subject]
    # The keys are in the registry, in hsm0, so `kmsctl key disable ca/root` means something.
    shown = run(stack, "key", "show", "ca/root", "-o", "json")
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert (record["provider"], record["state"], record["type"]) == ("hsm0", "active", "ec-p256")
    with stack.client() as client:
        public = client.get_public_key("ca/intermediate").der
    assert public == inter.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_init_twice_is_already_exists(stack: KmsStack, ca_dir: Path) -> None:
    again = kmsctl(stack, "ca", "init", "--name", "Second CA")
    assert again.returncode == ExitCode.ALREADY_EXISTS, again.stderr
    assert "kmsctl: ca.already_initialized:" in again.stderr
    certs = run(stack, "ca", "certs", "--out-dir", str(ca_dir.parent / "again"))
    assert certs.exit_code == 0, certs.output
    assert (ca_dir.parent / "again" / "root.crt").read_bytes() == (ca_dir / "root.crt").read_bytes()


def test_profiles_are_listed(stack: KmsStack, ca_dir: Path) -> None:
    result = run(stack, "ca", "profiles", "-o", "json")
    assert result.exit_code == 0, result.output
    names = {p["name"] for p in json.loads(result.stdout)}
    assert {"https-server", "vpn-server", "vpn-client", "device"} <= names


# -- issuing ---------------------------------------------------------------------------


def test_https_server_pem_with_dns_and_ip_sans(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    out, key = work / "nas.crt", work / "nas.key"
    done = kmsctl(
        stack,
        "cert", "issue", "--profile", "https-server", "--generate",
        "--cn", "nas.home.arpa", "--san", "dns:nas.home.arpa", "--san", "ip:192.168.1.10",
        "--out", str(out), "--key-out", str(key),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    chain = load_chain(out)
    leaf = chain[0]
    assert [c.subject.rfc4514_string() for c in chain[1:]] == [
        "CN=Home CA Issuing CA",
        "CN=Home CA",
    ]
    assert sans(leaf) == ["nas.home.arpa", "192.168.1.10"]
    assert eku(leaf) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert key.stat().st_mode & 0o077 == 0
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert private.public_key() == leaf.public_key()
    assert verify(ca_dir, out, "sslserver").returncode == 0


@pytest.mark.parametrize(
    ("profile", "extra", "purpose", "usages"),
    [
        ("vpn-server", ["--san", "dns:vpn.home.arpa"], "sslserver", [SERVER_AUTH]),
        ("vpn-client", [], "sslclient", [CLIENT_AUTH]),
        ("device", ["--san", "dns:cam.home.arpa"], "sslclient", [CLIENT_AUTH, SERVER_AUTH]),
    ],
)  # fmt: skip
def test_each_profile_as_pem_and_pkcs12(
    stack: KmsStack,
    ca_dir: Path,
    work: Path,
    profile: str,
    extra: list[str],
    purpose: str,
    usages: list[x509.ObjectIdentifier],
) -> None:
    pem, key = work / f"{profile}.crt", work / f"{profile}.key"
    issue_json(
        stack, "--profile", profile, "--generate", "--cn", f"{profile}-1", *extra,
        "--out", str(pem), "--key-out", str(key),
    )  # fmt: skip
    leaf = load_chain(pem)[0]
    assert all(u in eku(leaf) for u in usages)
    assert verify(ca_dir, pem, purpose).returncode == 0

    p12 = work / f"{profile}.p12"
    record = issue_json(
        stack, "--profile", profile, "--generate", "--cn", f"{profile}-2", *extra,
        "--format", "pkcs12", "--password-file", str(work / "pw.txt"), "--out", str(p12),
    )  # fmt: skip
    assert record["profile"] == profile and record["status"] == "valid"
    bundle = pkcs12.load_pkcs12(p12.read_bytes(), PASSWORD.encode())
    assert bundle.key is not None and bundle.cert is not None
    assert bundle.key.public_key() == bundle.cert.certificate.public_key()
    assert f"{bundle.cert.certificate.serial_number:X}" == record["serial"].lstrip("0")
    assert [c.certificate.subject.rfc4514_string() for c in bundle.additional_certs] == [
        "CN=Home CA Issuing CA",
        "CN=Home CA",
    ]
    info = openssl(
        "pkcs12", "-info", "-nokeys", "-in", str(p12), "-passin", f"file:{work / 'pw.txt'}"
    )
    assert info.returncode == 0, info.stderr
    assert f"CN = {profile}-2" in info.stdout and "AES-256-CBC" in info.stderr + info.stdout


def test_issue_from_an_openssl_csr(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    key, csr, out = work / "srv.key", work / "srv.csr", work / "srv.crt"
    made = openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-subj", "/CN=vpn.home.arpa",
        "-addext", "subjectAltName=DNS:vpn.home.arpa", "-out", str(csr),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = kmsctl(
        stack, "cert", "issue", "--profile", "vpn-server", "--csr", str(csr), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    leaf = load_chain(out)[0]
    assert sans(leaf) == ["vpn.home.arpa"]
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == leaf.public_key()
    assert verify(ca_dir, out, "sslserver").returncode == 0


def test_bad_requests_are_typed_and_write_nothing(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    out = work / "never.crt"
    unknown = run(
        stack, "cert", "issue", "--profile", "no-such", "--generate", "--cn", "x",
        "--out", str(out), "--key-out", str(work / "never.key"),
    )  # fmt: skip
    assert unknown.exit_code == ExitCode.INVALID_ARGUMENT, unknown.output
    assert "profile.unknown" in unknown.output
    no_san = run(
        stack, "cert", "issue", "--profile", "https-server", "--generate", "--cn", "x",
        "--out", str(out), "--key-out", str(work / "never.key"),
    )  # fmt: skip
    assert no_san.exit_code == ExitCode.INVALID_ARGUMENT and "csr.san_required" in no_san.output
    both = run(stack, "cert", "issue", "--profile", "device", "--generate", "--csr", str(out))
    assert both.exit_code == ExitCode.USAGE
    assert not out.exists() and not (work / "never.key").exists()
    bad_serial = run(stack, "cert", "show", "not-hex")
    assert bad_serial.exit_code == ExitCode.INVALID_ARGUMENT
    missing = run(stack, "cert", "show", "ABCDEF")
    assert missing.exit_code == ExitCode.NOT_FOUND, missing.output


# -- the lifecycle ---------------------------------------------------------------------


def test_list_show_revoke_crl_renew(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    phone = work / "phone.p12"
    rec = issue_json(
        stack, "--profile", "vpn-client", "--generate", "--cn", "phone",
        "--format", "pkcs12", "--password-file", str(work / "pw.txt"), "--out", str(phone),
    )  # fmt: skip
    serial = rec["serial"]

    listed = run(stack, "cert", "list", "-o", "json")
    assert listed.exit_code == 0
    assert serial in {r["serial"] for r in json.loads(listed.stdout)}
    assert serial in run(stack, "cert", "list").stdout
    # Every certificate lives longer than 30 days: nothing expires that soon; all within 2 years.
    soon = json.loads(run(stack, "cert", "list", "--expiring", "30d", "-o", "json").stdout)
    assert soon == []
    later = json.loads(run(stack, "cert", "list", "--expiring", "800d", "-o", "json").stdout)
    assert serial in {r["serial"] for r in later}
    assert run(stack, "cert", "list", "--expiring", "soon").exit_code == ExitCode.INVALID_ARGUMENT

    shown = json.loads(run(stack, "cert", "show", serial.lower(), "-o", "json").stdout)
    assert (shown["subject"], shown["requester"], shown["status"]) == ("CN=phone", "admin", "valid")

    # The phone is lost: revoke it, publish the CRL, and openssl refuses the certificate.
    revoked = kmsctl(stack, "cert", "revoke", serial, "--reason", "key-compromise")
    assert revoked.returncode == 0, revoked.stderr
    crl_pem = work / "crl.pem"
    got = kmsctl(stack, "ca", "crl", "--out", str(crl_pem), "--pem")
    assert got.returncode == 0, got.stderr
    crl = x509.load_pem_x509_crl(crl_pem.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    leaf = work / "phone.crt"
    pw = f"file:{work / 'pw.txt'}"
    extracted = openssl(
        "pkcs12", "-in", str(phone), "-passin", pw, "-nokeys", "-clcerts", "-out", str(leaf)
    )
    assert extracted.returncode == 0, extracted.stderr
    assert f"{load_chain(leaf)[0].serial_number:X}" == serial.lstrip("0")
    trust = work / "trust-crl.pem"
    trust.write_bytes((ca_dir / "chain.pem").read_bytes() + crl_pem.read_bytes())
    refused = openssl("verify", "-crl_check", "-CAfile", str(trust), str(leaf))
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    still_good = openssl("verify", "-crl_check", "-CAfile", str(trust), str(work / "nas.crt"))
    assert still_good.returncode == 0, still_good.stdout + still_good.stderr
    der = work / "crl.der"
    assert run(stack, "ca", "crl", "--out", str(der)).exit_code == 0
    assert x509.load_der_x509_crl(der.read_bytes()) == crl

    revoked_list = json.loads(run(stack, "cert", "list", "--revoked", "-o", "json").stdout)
    assert [(r["serial"], r["revocation_reason"]) for r in revoked_list] == [
        (serial, "key-compromise")
    ]
    again = run(stack, "cert", "renew", serial, "--out", str(work / "phone-renewed.crt"))
    assert again.exit_code == ExitCode.FAILED_PRECONDITION and "cert.revoked" in again.output

    # Renewing the NAS certificate: same key and names, a new serial.
    nas_serial = f"{load_chain(work / 'nas.crt')[0].serial_number:X}"
    renewed_pem = work / "nas-renewed.crt"
    renewed = run(stack, "cert", "renew", nas_serial, "--out", str(renewed_pem), "-o", "json")
    assert renewed.exit_code == 0, renewed.output
    new = json.loads(renewed.stdout)
    assert new["serial"] != nas_serial and new["renewed_from"].lstrip("0") == nas_serial
    old_leaf, new_leaf = load_chain(work / "nas.crt")[0], load_chain(renewed_pem)[0]
    assert new_leaf.public_key() == old_leaf.public_key()
    assert sans(new_leaf) == sans(old_leaf)
    assert verify(ca_dir, renewed_pem, "sslserver").returncode == 0


def test_http_serves_the_ca_certificate_and_the_crl(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    base = stack.ca_url or f"http://{stack.state()['ca_http']}"
    ca_crt, crl = work / "http-ca.crt", work / "http.crl"
    for path, target in (("/ca.crt", ca_crt), ("/crl", crl)):
        got = subprocess.run(
            ["curl", "-sSf", "-o", str(target), base + path],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
    assert (
        x509.load_der_x509_certificate(ca_crt.read_bytes())
        == load_chain(ca_dir / "intermediate.crt")[0]
    )
    served = x509.load_der_x509_crl(crl.read_bytes())
    assert served.issuer == load_chain(ca_dir / "intermediate.crt")[0].subject


# -- roles and the registry ------------------------------------------------------------


def test_operator_may_issue_but_not_init(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    cert, key = issue_client_cert(stack, "ops", "operator")
    conf = work / "operator"
    conf.mkdir()
    (conf / "ops.crt").write_bytes(cert)
    (conf / "ops.key").write_bytes(key)
    (conf / "ca.crt").write_bytes((stack.data_dir / "client" / "ca.crt").read_bytes())
    config = conf / "config.toml"
    config.write_text(
        f'broker = "{stack.broker}"\nserver_name = "edgekms-broker"\n'
        'ca_cert = "ca.crt"\ncert = "ops.crt"\nkey = "ops.key"\n'
    )
    out = work / "ops-device.crt"
    issued = run(
        stack, "cert", "issue", "--profile", "device", "--generate", "--cn", "cam",
        "--san", "dns:cam.home.arpa", "--out", str(out), "--key-out", str(work / "ops.key"),
        "-o", "json", config=config,
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    assert json.loads(issued.stdout)["requester"] == "ops"
    denied = run(stack, "ca", "init", "--name", "Rogue CA", config=config)
    assert denied.exit_code == ExitCode.PERMISSION_DENIED, denied.output


def test_disabled_root_in_the_registry_does_not_stop_leaves(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    assert run(stack, "key", "disable", "ca/root").exit_code == 0
    try:
        out = work / "after-root-off.crt"
        issued = run(
            stack, "cert", "issue", "--profile", "https-server", "--generate",
            "--cn", "web.home.arpa", "--san", "dns:web.home.arpa",
            "--out", str(out), "--key-out", str(work / "after-root-off.key"),
        )  # fmt: skip
        assert issued.exit_code == 0, issued.output
        assert verify(ca_dir, out, "sslserver").returncode == 0
        # The intermediate off: the CA refuses to sign anything.
        assert run(stack, "key", "disable", "ca/intermediate").exit_code == 0
        refused = run(
            stack, "cert", "issue", "--profile", "https-server", "--generate",
            "--cn", "web2.home.arpa", "--san", "dns:web2.home.arpa",
            "--out", str(work / "refused.crt"), "--key-out", str(work / "refused.key"),
        )  # fmt: skip
        assert refused.exit_code == ExitCode.FAILED_PRECONDITION, refused.output
        assert "ca.key_disabled" in refused.output
        assert not (work / "refused.crt").exists()
    finally:
        enabled = [run(stack, "key", "enable", name) for name in ("ca/intermediate", "ca/root")]
    assert [r.exit_code for r in enabled] == [0, 0]
    assert json.loads(run(stack, "key", "show", "ca/root", "-o", "json").stdout)["state"] == (
        "active"
    )
