"""`kmsctl` for the CA's longer life, end to end on a `kmsctl up` stack of its own (these
tests rotate and revoke intermediates, which would disturb test_ca_cli.py's CA):
short-lived certificates, legacy PKCS#12 and .ovpn export checked by openssl and a real
OpenVPN."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from mgmt.natsserver import free_port
from mgmt.pki import write_private
from tests.ca.test_bundles import LISTENING, openvpn, poll_log
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.e2e.test_broker import issue_client_cert
from tests.e2e.test_ca_cli import kmsctl, load_chain, openssl

pytestmark = pytest.mark.timeout(600)
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    data_dir = tmp_path_factory.mktemp("pkistack") / "data"
    started = start_stack(data_dir, "--ca-base-url", "http://ca.home.arpa:8180")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pkiwork")
    (path / "pw.txt").write_text(PASSWORD + "\n")
    return path


@pytest.fixture(scope="module")
def ca_dir(stack: KmsStack, work: Path) -> Path:
    done = kmsctl(
        stack, "ca", "init", "--name", "Home CA", "--out-dir", str(work / "ca"),
        "--permit-dns", "home.arpa", "--permit-ip", "192.168.0.0/16", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name_constraints"] == {
        "permitted_dns": ["home.arpa"],
        "permitted_ip": ["192.168.0.0/16"],
        "excluded_dns": [],
        "excluded_ip": [],
    }
    return work / "ca"


def run(stack: KmsStack, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--data-dir", str(stack.data_dir)])


def ok_json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- name constraints ------------------------------------------------------------------


def test_names_outside_the_constraints_are_refused(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    inter = load_chain(ca_dir / "intermediate.crt")[0]
    assert inter.extensions.get_extension_for_class(x509.NameConstraints).critical
    out = work / "nas.crt"
    made = run(
        stack, "cert", "issue", "--profile", "https-server", "--generate",
        "--cn", "nas.home.arpa", "--san", "dns:nas.home.arpa", "--san", "ip:192.168.1.10",
        "--out", str(out), "--key-out", str(work / "nas.key"),
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    chain = ["-CAfile", str(ca_dir / "root.crt"), "-untrusted", str(ca_dir / "intermediate.crt")]
    assert openssl("verify", *chain, "-purpose", "sslserver", str(out)).returncode == 0
    for cn, san in [("www.google.com", "dns:www.google.com"), ("nas.home.arpa", "ip:10.0.0.1")]:
        refused = run(
            stack, "cert", "issue", "--profile", "https-server", "--generate", "--cn", cn,
            "--san", san, "--out", str(work / "out.crt"), "--key-out", str(work / "out.key"),
        )  # fmt: skip
        assert refused.exit_code == ExitCode.INVALID_ARGUMENT, refused.output
        assert "csr.name_outside_constraints" in refused.output
    assert not (work / "out.crt").exists() and not (work / "out.key").exists()
    bad = run(stack, "ca", "init", "--name", "X", "--permit-ip", "10.0.0.1/8")
    assert bad.exit_code == ExitCode.INVALID_ARGUMENT and "ca.name_constraint_invalid" in bad.output


# -- short-lived certificates ----------------------------------------------------------


def test_ttl_one_hour_and_refusals(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    out, key = work / "short.crt", work / "short.key"
    made = kmsctl(
        stack, "cert", "issue", "--profile", "https-server", "--generate",
        "--cn", "short.home.arpa", "--san", "dns:short.home.arpa", "--ttl", "1h",
        "--out", str(out), "--key-out", str(key), "-o", "json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    leaf = load_chain(out)[0]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 3600
    default = ok_json(
        run(
            stack,
            "cert",
            "issue",
            "--profile",
            "https-server",
            "--generate",
            "--cn",
            "web.home.arpa",
            "--san",
            "dns:web.home.arpa",
            "--out",
            str(work / "web.crt"),
            "--key-out",
            str(work / "web.key"),
            "-o",
            "json",
        )
    )
    web = load_chain(work / "web.crt")[0]
    assert (web.not_valid_after_utc - web.not_valid_before_utc).days == 90, default
    for args, code, reason in [
        (["--ttl", "1m"], ExitCode.INVALID_ARGUMENT, "cert.ttl_invalid"),
        (["--ttl", "soon"], ExitCode.INVALID_ARGUMENT, "cert.ttl_invalid"),
        (["--ttl", "399d"], ExitCode.INVALID_ARGUMENT, "cert.validity_exceeds_profile"),
        (["--ttl", "1h", "--days", "2"], ExitCode.USAGE, "--days or --ttl"),
    ]:
        refused = run(
            stack, "cert", "issue", "--profile", "https-server", "--generate",
            "--cn", "no.home.arpa", "--san", "dns:no.home.arpa", *args,
            "--out", str(work / "no.crt"), "--key-out", str(work / "no.key"),
        )  # fmt: skip
        assert refused.exit_code == code and reason in refused.output, refused.output
    assert not (work / "no.crt").exists() and not (work / "no.key").exists()
    serial = json.loads(made.stdout)["serial"]
    renewed = run(
        stack, "cert", "renew", serial, "--ttl", "30m", "--out", str(work / "renewed.crt")
    )
    assert renewed.exit_code == 0, renewed.output
    again = load_chain(work / "renewed.crt")[0]
    assert (again.not_valid_after_utc - again.not_valid_before_utc).total_seconds() == 1800
    profiles = json.loads(run(stack, "ca", "profiles", "-o", "json").stdout)
    https = next(p for p in profiles if p["name"] == "https-server")
    assert (https["default_ttl"], https["max_ttl"]) == ("90d", "398d")


# -- bundles ---------------------------------------------------------------------------


def test_legacy_pkcs12_with_a_warning(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    p12 = work / "old-phone.p12"
    made = kmsctl(
        stack, "cert", "issue", "--profile", "vpn-client", "--generate", "--cn", "old-phone",
        "--format", "pkcs12", "--legacy", "--password-file", str(work / "pw.txt"),
        "--out", str(p12),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "warning: --legacy" in made.stderr and "3DES" in made.stderr
    assert mode(p12) == 0o600
    pw = f"file:{work / 'pw.txt'}"
    opened = openssl("pkcs12", "-legacy", "-in", str(p12), "-passin", pw, "-info", "-nokeys")
    assert opened.returncode == 0, opened.stderr
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in opened.stderr and "MAC: sha1" in opened.stderr
    subjects = [
        c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(opened.stdout.encode())
    ]
    assert subjects[0] == "CN=old-phone" and "CN=Home CA" in subjects
    wrong = run(
        stack, "cert", "issue", "--profile", "vpn-client", "--generate", "--cn", "x",
        "--legacy", "--out", str(work / "x.crt"), "--key-out", str(work / "x.key"),
    )  # fmt: skip
    assert wrong.exit_code == ExitCode.USAGE and not (work / "x.crt").exists()


@pytest.mark.skipif(shutil.which("openvpn") is None, reason="needs openvpn")
def test_export_ovpn_connects_and_refuses_what_it_must(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    def issue(profile: str, cn: str, *extra: str) -> str:
        return str(
            ok_json(
                run(
                    stack,
                    "cert",
                    "issue",
                    "--profile",
                    profile,
                    "--generate",
                    "--cn",
                    cn,
                    *extra,
                    "--out",
                    str(work / f"{cn}.crt"),
                    "--key-out",
                    str(work / f"{cn}.key"),
                    "-o",
                    "json",
                )
            )["serial"]
        )

    laptop = issue("vpn-client", "laptop")
    server = issue("vpn-server", "vpn.home.arpa", "--san", "dns:vpn.home.arpa")
    port = free_port()
    profile, ta = work / "laptop.ovpn", work / "ta.key"
    exported = run(
        stack, "cert", "export", laptop, "--key", str(work / "laptop.key"),
        "--remote", f"127.0.0.1:{port}", "--server-name", "vpn.home.arpa",
        "--tls-crypt", str(ta), "--out", str(profile), "-o", "json",
    )  # fmt: skip
    answer = ok_json(exported)
    assert answer["tls_crypt_created"] is True and answer["format"] == "ovpn"
    assert mode(profile) == 0o600 and mode(ta) == 0o600
    text = profile.read_text()
    assert f"remote 127.0.0.1 {port}" in text and "<tls-crypt>" in text and "<key>" in text

    # A second profile reuses the same tls-crypt key (the server has only one).
    again = ok_json(
        run(
            stack,
            "cert",
            "export",
            laptop,
            "--key",
            str(work / "laptop.key"),
            "--remote",
            f"127.0.0.1:{port}",
            "--tls-crypt",
            str(ta),
            "--out",
            str(work / "laptop2.ovpn"),
            "-o",
            "json",
        )
    )
    assert again["tls_crypt_created"] is False
    assert ta.read_text().split("-----")[2] in (work / "laptop2.ovpn").read_text()

    # The real thing: an OpenVPN server set up as the README says, the client given only
    # the .ovpn file.
    write_private(work / "vpn.key.pem", (work / "vpn.home.arpa.key").read_bytes())
    server_log, client_log = work / "ovpn-server.log", work / "ovpn-client.log"
    server_argv = [
        "--tls-server", "--proto", "udp", "--local", "127.0.0.1", "--lport", str(port),
        "--ca", str(ca_dir / "chain.pem"), "--cert", str(work / "vpn.home.arpa.crt"),
        "--key", str(work / "vpn.key.pem"), "--dh", "none", "--tls-crypt", str(ta),
        "--remote-cert-tls", "client", "--verb", "3",
    ]  # fmt: skip
    with openvpn(server_log, *server_argv) as server_proc:
        poll_log(server_log, LISTENING, server_proc)
        with openvpn(client_log, "--config", str(profile)) as client_proc:
            log = poll_log(client_log, "Initialization Sequence Completed", client_proc)
    assert "VERIFY X509NAME OK: CN=vpn.home.arpa" in log

    for args, code, reason in [
        ([server, "--key", str(work / "vpn.home.arpa.key")], ExitCode.INVALID_ARGUMENT,
         "bundle.not_client_certificate"),
        ([laptop, "--key", str(work / "vpn.home.arpa.key")], ExitCode.INVALID_ARGUMENT,
         "bundle.key_mismatch"),
        ([laptop, "--key", str(work / "pw.txt")], ExitCode.INVALID_ARGUMENT, "bundle.key_invalid"),
        ([laptop, "--key", str(work / "laptop.key"), "--remote", "a b"],
         ExitCode.INVALID_ARGUMENT, "bundle.remote_invalid"),
        ([laptop, "--key", str(work / "laptop.key"), "--tls-crypt", str(work / "pw.txt")],
         ExitCode.INVALID_ARGUMENT, "bundle.tls_crypt_invalid"),
    ]:  # fmt: skip
        if "--remote" not in args:
            args = [*args, "--remote", "vpn.home.arpa"]
        refused = run(stack, "cert", "export", *args, "--out", str(work / "refused.ovpn"))
        assert refused.exit_code == code and reason in refused.output, refused.output
    assert not (work / "refused.ovpn").exists()


def test_export_pkcs12_legacy_then_refused_once_revoked(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    serial = ok_json(
        run(
            stack,
            "cert",
            "issue",
            "--profile",
            "vpn-client",
            "--generate",
            "--cn",
            "tablet",
            "--out",
            str(work / "tablet.crt"),
            "--key-out",
            str(work / "tablet.key"),
            "-o",
            "json",
        )
    )["serial"]
    p12 = work / "tablet.p12"
    done = kmsctl(
        stack, "cert", "export", serial, "--key", str(work / "tablet.key"), "--format", "pkcs12",
        "--legacy", "--password-file", str(work / "pw.txt"), "--out", str(p12),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: --legacy" in done.stderr
    opened = openssl(
        "pkcs12", "-legacy", "-in", str(p12), "-passin", f"file:{work / 'pw.txt'}", "-nodes"
    )
    assert opened.returncode == 0 and "BEGIN PRIVATE KEY" in opened.stdout, opened.stderr

    # Revoked: nothing to export.
    assert run(stack, "cert", "revoke", serial).exit_code == 0
    revoked = run(
        stack, "cert", "export", serial, "--key", str(work / "tablet.key"), "--format",
        "pkcs12", "--password-file", str(work / "pw.txt"), "--out", str(work / "gone.p12"),
    )  # fmt: skip
    assert revoked.exit_code == ExitCode.FAILED_PRECONDITION and "cert.revoked" in revoked.output
    assert not (work / "gone.p12").exists()


# -- rotation and revoking an intermediate ---------------------------------------------


def test_rotate_then_revoke_the_old_intermediate(stack: KmsStack, ca_dir: Path, work: Path) -> None:
    def leaf(name: str) -> Path:
        out = work / f"{name}.crt"
        made = run(
            stack, "cert", "issue", "--profile", "https-server", "--generate", "--cn", name,
            "--san", f"dns:{name}", "--out", str(out), "--key-out", str(work / f"{name}.key"),
        )  # fmt: skip
        assert made.exit_code == 0, made.output
        return out

    old_leaf = leaf("before.home.arpa")
    old_inter = load_chain(ca_dir / "intermediate.crt")[0]
    rotated = kmsctl(stack, "ca", "rotate", "--out-dir", str(work / "ca2"), "-o", "json")
    assert rotated.returncode == 0, rotated.stderr
    answer = json.loads(rotated.stdout)
    assert answer["intermediate"]["subject"] == "CN=Home CA Issuing CA 2"
    assert [r["subject"] for r in answer["retired"]] == [old_inter.subject.rfc4514_string()]
    assert answer["name_constraints"]["permitted_dns"] == ["home.arpa"]  # carried over
    shown = json.loads(run(stack, "key", "show", "ca/intermediate-2", "-o", "json").stdout)
    assert (shown["provider"], shown["state"]) == ("hsm0", "active")
    chain = work / "ca2" / "chain.pem"
    assert [c.subject for c in load_chain(chain)][1] == old_inter.subject
    new_leaf = leaf("after.home.arpa")
    new_inter = load_chain(work / "ca2" / "intermediate.crt")[0]
    load_chain(new_leaf)[0].verify_directly_issued_by(new_inter)

    base = f"http://{stack.state()['ca_http']}"
    old_key_id = (
        old_inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        .value.digest.hex()
        .upper()
    )
    old_crl = work / "old.crl"
    got = subprocess.run(
        ["curl", "-sSf", "-o", str(old_crl), f"{base}/crl/{old_key_id}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert x509.load_der_x509_crl(old_crl.read_bytes()).issuer == old_inter.subject

    def crls() -> Path:
        """`ca crl --root` and `ca crl --pem`, which after the rotation holds the CRLs of
        both intermediates (what OpenVPN's crl-verify needs)."""
        root_crl, inter_crls = work / "root-crl.pem", work / "inter-crls.pem"
        assert run(stack, "ca", "crl", "--root", "--pem", "--out", str(root_crl)).exit_code == 0
        assert run(stack, "ca", "crl", "--pem", "--out", str(inter_crls)).exit_code == 0
        marker = b"-----BEGIN X509 CRL-----"
        issuers = [
            x509.load_pem_x509_crl(marker + part).issuer
            for part in inter_crls.read_bytes().split(marker)[1:]
        ]
        assert issuers == [new_inter.subject, old_inter.subject]
        bundle = work / "all-crls.pem"
        bundle.write_bytes(root_crl.read_bytes() + inter_crls.read_bytes())
        return bundle

    def strict(cert: Path) -> subprocess.CompletedProcess[str]:
        return openssl(
            "verify", "-crl_check_all", "-CAfile", str(ca_dir / "root.crt"),
            "-untrusted", str(chain), "-CRLfile", str(crls()), str(cert),
        )  # fmt: skip

    for cert in (old_leaf, new_leaf):
        checked = strict(cert)
        assert checked.returncode == 0, checked.stdout + checked.stderr

    no = run(stack, "ca", "revoke-intermediate", f"{old_inter.serial_number:X}")
    assert no.exit_code == ExitCode.USAGE and "--yes" in no.output
    done = run(
        stack, "ca", "revoke-intermediate", f"{old_inter.serial_number:X}",
        "--reason", "superseded", "--yes", "-o", "json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["reason"] == "superseded"
    refused = strict(old_leaf)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    still = strict(new_leaf)
    assert still.returncode == 0, still.stdout + still.stderr
    again = run(stack, "ca", "revoke-intermediate", f"{old_inter.serial_number:X}", "--yes")
    assert again.exit_code == ExitCode.FAILED_PRECONDITION
    assert "ca.intermediate_already_revoked" in again.output
    unknown = run(stack, "ca", "revoke-intermediate", "ABCDEF", "--yes")
    assert unknown.exit_code == ExitCode.NOT_FOUND and "ca.intermediate_unknown" in unknown.output


def test_operators_may_read_the_root_crl_but_not_rotate_or_revoke(
    stack: KmsStack, ca_dir: Path, work: Path
) -> None:
    cert, key = issue_client_cert(stack, "ops", "operator")
    conf = work / "operator"
    conf.mkdir()
    (conf / "ops.crt").write_bytes(cert)
    write_private(conf / "ops.key", key)
    (conf / "ca.crt").write_bytes((stack.data_dir / "client" / "ca.crt").read_bytes())
    config = conf / "config.toml"
    config.write_text(
        f'broker = "{stack.broker}"\nserver_name = "edgekms-broker"\n'
        'ca_cert = "ca.crt"\ncert = "ops.crt"\nkey = "ops.key"\n'
    )

    def as_operator(*args: str) -> Result:
        return CliRunner().invoke(cli, [*args, "--config", str(config)])

    crl = as_operator("ca", "crl", "--root", "--out", str(work / "ops-root.crl"))
    assert crl.exit_code == 0, crl.output
    assert x509.load_der_x509_crl((work / "ops-root.crl").read_bytes()).issuer == (
        load_chain(ca_dir / "root.crt")[0].subject
    )
    for args in (["ca", "rotate"], ["ca", "revoke-intermediate", "ABCDEF", "--yes"]):
        denied = as_operator(*args)
        assert denied.exit_code == ExitCode.PERMISSION_DENIED, denied.output
