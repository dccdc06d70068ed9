"""Bundles people import: the legacy (3DES/SHA-1) PKCS#12 opened by `openssl pkcs12
-legacy`, and the .ovpn client profile accepted by a real OpenVPN 2.6 client talking to
a real OpenVPN server on loopback, with certificates from the CA service on SoftHSM."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.builder import build_leaf, random_serial
from ca_service.policy import load_csr, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES
from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from mgmt import bundle, ovpn
from mgmt.natsserver import free_port
from mgmt.pki import write_private
from tests.ca.conftest import CAEnv
from tests.ca.helpers import LeafKey, SoftCA, make_csr, make_key, make_soft_ca

PASSWORD = b"correct horse battery staple"
# A point-to-point TLS server (no --mode server: that needs a tun device) is ready once
# its socket is bound; "Initialization Sequence Completed" comes when a peer has joined.
LISTENING = "UDPv4 link local (bound)"
needs_openvpn = pytest.mark.skipif(shutil.which("openvpn") is None, reason="needs openvpn")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def soft_leaf(ca: SoftCA, profile: str, sans: tuple[str, ...], cn: str) -> tuple[LeafKey, bytes]:
    key = make_key("ec-p256")
    plan = plan_from_csr(BUILTIN_PROFILES[profile], load_csr(make_csr(key, cn=cn, sans=sans)))
    return key, der(build_leaf(ca.key, ca.cert, plan, random_serial()))


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


# ---- PKCS#12 ---------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "aes"])
def test_pkcs12_forms_open_in_openssl(legacy: bool, tmp_path: Path) -> None:
    ca = make_soft_ca()
    key, cert = soft_leaf(ca, "vpn-client", (), "phone")
    p12 = tmp_path / "phone.p12"
    p12.write_bytes(
        bundle.pkcs12_bundle(
            "phone", key, cert, [der(ca.cert), der(ca.root)], PASSWORD, legacy=legacy
        )
    )
    (tmp_path / "pw").write_bytes(PASSWORD + b"\n")
    argv = ["pkcs12", "-in", str(p12), "-passin", f"file:{tmp_path / 'pw'}", "-info", "-nodes"]
    opened = openssl(*argv, "-legacy") if legacy else openssl(*argv)
    assert opened.returncode == 0, opened.stderr
    if legacy:
        assert "MAC: sha1, Iteration 2048" in opened.stderr, opened.stderr
        assert "pbeWithSHA1And3-KeyTripleDES-CBC, Iteration 2048" in opened.stderr
        assert "AES" not in opened.stderr
    else:
        assert "MAC: sha256" in opened.stderr and "AES-256-CBC" in opened.stderr, opened.stderr
    certs = x509.load_pem_x509_certificates(opened.stdout.encode())
    assert len(certs) == 3 and der(certs[0]) == cert
    extracted = serialization.load_pem_private_key(
        opened.stdout[opened.stdout.index("-----BEGIN PRIVATE KEY") :].encode(), None
    )
    assert extracted.public_key() == key.public_key()
    # The wrong password is refused, not silently half-read.
    (tmp_path / "bad").write_text("wrong\n")
    bad = openssl(
        "pkcs12", "-in", str(p12), "-passin", f"file:{tmp_path / 'bad'}", "-legacy", "-nokeys"
    )
    assert bad.returncode != 0


# ---- .ovpn pieces (pure logic) ---------------------------------------------------------


def test_tls_crypt_key_round_trip_and_refusals() -> None:
    made = ovpn.new_tls_crypt_key()
    assert ovpn.check_tls_crypt_key(made).startswith(b"-----BEGIN OpenVPN Static key V1-----")
    assert made != ovpn.new_tls_crypt_key()
    lines = made.decode().splitlines()
    for bad in (b"", b"garbage", "\n".join(lines[:-3] + lines[-1:]).encode(), made.upper()):
        with pytest.raises(InvalidArgument) as exc:
            ovpn.check_tls_crypt_key(bad)
        assert exc.value.reason == "bundle.tls_crypt_invalid"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vpn.home.arpa", ovpn.Remote("vpn.home.arpa", 1194)),
        ("vpn.home.arpa:443", ovpn.Remote("vpn.home.arpa", 443)),
        ("[2001:db8::1]:1195", ovpn.Remote("2001:db8::1", 1195)),
        ("192.168.1.1", ovpn.Remote("192.168.1.1", 1194)),
    ],
)
def test_remote_spellings(text: str, expected: ovpn.Remote) -> None:
    assert ovpn.Remote.parse(text) == expected


@pytest.mark.parametrize("text", ["", "vpn host", "a:0", "a:70000", "a:b", "x;rm -rf"])
def test_bad_remote_is_typed(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        ovpn.Remote.parse(text)
    assert exc.value.reason == "bundle.remote_invalid"


def test_server_certificate_and_foreign_key_are_refused() -> None:
    ca = make_soft_ca()
    key, server = soft_leaf(ca, "vpn-server", ("dns:vpn.example.com",), "vpn.example.com")
    with pytest.raises(InvalidArgument) as exc:
        ovpn.client_profile(ovpn.Remote("vpn.example.com"), server, [], bundle.key_pem(key))
    assert exc.value.reason == "bundle.not_client_certificate"
    _, client = soft_leaf(ca, "vpn-client", (), "laptop")
    with pytest.raises(InvalidArgument) as exc:
        bundle.check_key_matches(key, client)
    assert exc.value.reason == "bundle.key_mismatch"


@pytest.mark.parametrize(
    "data",
    [
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"a long passphrase\n",
        b"",
    ],
    ids=["truncated", "not_pem", "empty"],
)
def test_unreadable_key_is_typed(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as exc:
        bundle.load_leaf_key(data)
    assert exc.value.reason == "bundle.key_invalid"


# ---- a real OpenVPN server and client --------------------------------------------------


@contextmanager
def openvpn(log: Path, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """openvpn with `--dev null`: the TLS and control channel are real, no tun device is
    made (nothing on the shared machine changes), and it ends with the block."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["openvpn", *argv, "--dev", "null", "--ifconfig-noexec", "--route-noexec"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def poll_log(log: Path, text: str, proc: subprocess.Popen[bytes], within: float = 90) -> str:
    """Poll the log until `text` shows (or the process ends, or the deadline passes)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    content = log.read_text(errors="replace") if log.exists() else ""
    raise AssertionError(f"{text!r} not seen in {log.name}:\n{content[-3000:]}")


async def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes]) -> str:
    return await asyncio.to_thread(poll_log, log, text, proc)


async def issue(
    env: CAEnv, profile: str, cn: str, sans: tuple[str, ...]
) -> tuple[LeafKey, ca_pb2.IssueCertificateResponse]:
    key = make_key("ec-p256")
    response = await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile=profile, csr=make_csr(key, cn=cn, sans=sans), requester="admin"
        ),
        ca_pb2.IssueCertificateResponse,
    )
    return key, response


def pem(der_bytes: bytes) -> bytes:
    return x509.load_der_x509_certificate(der_bytes).public_bytes(serialization.Encoding.PEM)


@needs_openvpn
async def test_ovpn_profile_connects_to_a_real_openvpn_server(
    ca_env: CAEnv, tmp_path: Path
) -> None:
    """The server is configured as the README shows (chain, vpn-server certificate,
    remote-cert-tls client, the tls-crypt key); the client gets only the .ovpn file. It
    completes the handshake and the pushed configuration; the same profile with another
    tls-crypt key, or a client certificate from another CA, is turned away."""
    await ca_env.init()
    server_key, server = await issue(
        ca_env, "vpn-server", "vpn.example.com", ("dns:vpn.example.com",)
    )
    client_key, client = await issue(ca_env, "vpn-client", "laptop", ())
    chain = list(client.chain_der)
    (tmp_path / "chain.pem").write_bytes(b"".join(pem(d) for d in chain))
    (tmp_path / "server.crt").write_bytes(pem(server.certificate_der))
    write_private(tmp_path / "server.key", bundle.key_pem(server_key))
    tls_crypt = ovpn.new_tls_crypt_key()
    write_private(tmp_path / "ta.key", tls_crypt)
    port = free_port()
    remote = ovpn.Remote("127.0.0.1", port)

    def profile(key: LeafKey, cert_der: bytes, ta: bytes) -> Path:
        path = tmp_path / f"client-{time.monotonic_ns()}.ovpn"
        write_private(
            path,
            ovpn.client_profile(
                remote, cert_der, chain, bundle.key_pem(key), ta, "vpn.example.com"
            ),
        )
        return path

    good = profile(client_key, client.certificate_der, tls_crypt)
    text = good.read_text()
    assert "<tls-crypt>" in text and "remote-cert-tls server" in text
    assert text.count("BEGIN CERTIFICATE") == 3

    server_argv = [
        "--tls-server", "--proto", "udp", "--local", "127.0.0.1", "--lport", str(port),
        "--ca", str(tmp_path / "chain.pem"), "--cert", str(tmp_path / "server.crt"),
        "--key", str(tmp_path / "server.key"), "--dh", "none",
        "--tls-crypt", str(tmp_path / "ta.key"), "--remote-cert-tls", "client", "--verb", "3",
    ]  # fmt: skip
    server_log = tmp_path / "server.log"
    with openvpn(server_log, *server_argv) as server_proc:
        await wait_for_line(server_log, LISTENING, server_proc)
        with openvpn(tmp_path / "client.log", "--config", str(good)) as client_proc:
            log = await wait_for_line(
                tmp_path / "client.log", "Initialization Sequence Completed", client_proc
            )
        assert "VERIFY X509NAME OK: CN=vpn.example.com" in log
        assert "PUSH_REPLY" in log
        await wait_for_line(server_log, "[laptop] Peer Connection Initiated", server_proc)

    # Another tls-crypt key: the server drops every packet before TLS begins.
    server_log = tmp_path / "server2.log"
    with openvpn(server_log, *server_argv) as server_proc:
        await wait_for_line(server_log, LISTENING, server_proc)
        wrong = profile(client_key, client.certificate_der, ovpn.new_tls_crypt_key())
        with openvpn(tmp_path / "client2.log", "--config", str(wrong)):
            await wait_for_line(server_log, "tls-crypt unwrapping failed", server_proc)
        assert "Peer Connection Initiated" not in server_log.read_text()

    # A client certificate from a CA the server does not trust is refused in TLS.
    stranger = make_soft_ca()
    stranger_key, stranger_cert = soft_leaf(stranger, "vpn-client", (), "stranger")
    server_log = tmp_path / "server3.log"
    with openvpn(server_log, *server_argv) as server_proc:
        await wait_for_line(server_log, LISTENING, server_proc)
        with openvpn(
            tmp_path / "client3.log",
            "--config",
            str(profile(stranger_key, stranger_cert, tls_crypt)),
        ):
            await wait_for_line(server_log, "VERIFY ERROR", server_proc)
        assert "Peer Connection Initiated" not in server_log.read_text()


def test_export_chain_puts_the_issuing_intermediate_first() -> None:
    """After a rotation a leaf may come from the retired intermediate: the exported
    chain starts with its issuer, then the other intermediate in force, then the root."""
    from ca_service.builder import build_intermediate, ca_name
    from mgmt.cli.cert_export import issuing_chain

    old = make_soft_ca()
    new_key = make_key("ec-p256")
    new = build_intermediate(
        old.root_key, old.root, new_key.public_key(), ca_name("Test Issuing CA 2"), 365
    )
    _, old_leaf = soft_leaf(old, "vpn-client", (), "laptop")
    certs = ca_pb2.GetCACertificatesResponse(
        root_certificate_der=der(old.root),
        intermediate_certificate_der=der(new),
        retired_intermediates_der=[der(old.cert)],
    )
    assert issuing_chain(old_leaf, certs) == [der(old.cert), der(new), der(old.root)]
    plan = plan_from_csr(
        BUILTIN_PROFILES["vpn-client"], load_csr(make_csr(make_key("ec-p256"), cn="x", sans=()))
    )
    new_leaf = der(build_leaf(new_key, new, plan, random_serial()))
    assert issuing_chain(new_leaf, certs) == [der(new), der(old.cert), der(old.root)]
