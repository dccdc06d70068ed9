"""lego, a second unchanged client (Go's TLS and JOSE stack, ES256 account key where
certbot's is RS256): it obtains certificates with http-01 from its own HTTP server and
with tls-alpn-01 from its own TLS server, each on the port the CA's config names."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from ca_service.acme.server import AcmeServer
from edgekms.v1 import ca_pb2
from tests.acme.conftest import AcmeEnv
from tests.conftest import SLOWDOWN

pytestmark = pytest.mark.skipif(shutil.which("lego") is None, reason="needs lego")


async def lego(
    server: AcmeServer, root: Path, work: Path, *args: str, command: tuple[str, ...] = ("run",)
) -> subprocess.CompletedProcess[str]:
    argv = [
        "lego",
        *("--server", server.config.directory_url, "--email", "admin@nas.home.arpa"),
        *("--accept-tos", "--path", str(work), "--domains", "nas.home.arpa", *args, *command),
    ]
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=240 * SLOWDOWN,
        check=False,
        env={**os.environ, "LEGO_CA_CERTIFICATES": str(root)},
    )


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_lego_obtains_a_certificate(
    acme_env: AcmeEnv, free_ports_server: AcmeServer, tmp_path: Path, challenge: str
) -> None:
    config = free_ports_server.config
    if challenge == "http-01":
        args = ("--http", "--http.port", f"127.0.0.1:{config.http01_port}")
    else:
        args = ("--tls", "--tls.port", f"127.0.0.1:{config.tlsalpn01_port}")
    got = await lego(free_ports_server, acme_env.root_pem, tmp_path, *args)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    chain = x509.load_pem_x509_certificates(
        (tmp_path / "certificates" / "nas.home.arpa.crt").read_bytes()
    )
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas.home.arpa"]
    record, _ = await acme_env.ca.store.get_record(f"{leaf.serial_number:X}")
    assert record.requester.startswith("acme:")
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID
    # What lego saved verifies to the root alone, as nginx would serve it.
    verify = await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "verify",
            "-CAfile",
            str(acme_env.root_pem),
            "-untrusted",
            str(tmp_path / "certificates" / "nas.home.arpa.issuer.crt"),
            "-purpose",
            "sslserver",
            str(tmp_path / "certificates" / "nas.home.arpa.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_lego_renew_gets_a_new_certificate_from_the_same_ca(
    acme_env: AcmeEnv, free_ports_server: AcmeServer, tmp_path: Path
) -> None:
    """`lego renew`, as its cron job runs it: `--days 3650` makes a certificate months
    from expiry due, so lego orders again with the account it stored."""
    http = ("--http", "--http.port", f"127.0.0.1:{free_ports_server.config.http01_port}")
    got = await lego(free_ports_server, acme_env.root_pem, tmp_path, *http)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    saved = tmp_path / "certificates" / "nas.home.arpa.crt"
    first = x509.load_pem_x509_certificates(saved.read_bytes())[0]
    renewed = await lego(
        free_ports_server,
        acme_env.root_pem,
        tmp_path,
        *http,
        command=("renew", "--days", "3650", "--no-random-sleep"),
    )
    assert renewed.returncode == 0, renewed.stdout[-3000:] + renewed.stderr[-3000:]
    second = x509.load_pem_x509_certificates(saved.read_bytes())[0]
    assert second.serial_number != first.serial_number
    san = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas.home.arpa"]
    record, _ = await acme_env.ca.store.get_record(f"{second.serial_number:X}")
    assert record.requester.startswith("acme:")
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID
