"""Real parts for the ACME tests: the CA test fixtures (nats-server with JetStream,
kms-crypto on SoftHSM, a CA service on its own bucket), an ACME server of that CA on a
free loopback port with its audit writer, and a plain HTTP server on a webroot for
http-01 (python's http.server, as a NAS's web server would serve the directory)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.acmeclient import AcmeClient
from ca_service.acme.policy import NamePolicy
from ca_service.acme.server import AcmeServer
from ca_service.acme.settings import AcmeConfig
from edgekms.audit import AuditWriter
from edgekms.v1 import ca_pb2
from mgmt.natsserver import free_port
from tests.ca.conftest import CAEnv, ca_crypto, ca_env, ca_nats  # noqa: F401 - fixtures
from tests.conftest import SLOWDOWN

NAMES = ("nas.home.arpa", "www.nas.home.arpa", "media.lan", "down.home.arpa")


def wait_listening(port: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline * SLOWDOWN
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise AssertionError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


@dataclass
class Webroot:
    """A directory served over plain HTTP on 127.0.0.1:port."""

    path: Path
    port: int

    def answer(self, token: str, key_authorization: str) -> None:
        challenge_dir = self.path / ".well-known" / "acme-challenge"
        challenge_dir.mkdir(parents=True, exist_ok=True)
        (challenge_dir / token).write_text(key_authorization)


@pytest.fixture
def webroot(tmp_path: Path) -> Iterator[Webroot]:
    path = tmp_path / "webroot"
    path.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        yield Webroot(path, port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class AcmeEnv:
    ca: CAEnv
    server: AcmeServer
    config: AcmeConfig
    root_pem: Path
    webroot: Webroot
    audit: AuditWriter

    @property
    def directory(self) -> str:
        return self.config.directory_url

    def client(self, **kw: object) -> AcmeClient:
        return AcmeClient(self.directory, str(self.root_pem), **kw)  # type: ignore[arg-type]


def acme_config(port: int, http_port: int, **kw: Any) -> AcmeConfig:
    hosts = {name: "127.0.0.1" for name in NAMES if name != "down.home.arpa"}
    hosts["down.home.arpa"] = "127.0.0.2"  # nothing listens there
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "names": ("127.0.0.1",),
        "http01_port": http_port,
        "tlsalpn01_port": http_port,
        "hosts": hosts,
        "policy": NamePolicy(),
    }
    return AcmeConfig(**(settings | kw))


async def start_acme(ca: CAEnv, config: AcmeConfig, audit: AuditWriter) -> AcmeServer:
    server = AcmeServer(ca.ca, config, audit)
    await server.start()
    await asyncio.wait_for(server.ready.wait(), 60 * SLOWDOWN)
    return server


@pytest.fixture
async def acme_env(ca_env: CAEnv, webroot: Webroot, tmp_path: Path) -> AsyncIterator[AcmeEnv]:  # noqa: F811
    init = await ca_env.init()
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(
        x509.load_der_x509_certificate(init.root_certificate_der).public_bytes(
            serialization.Encoding.PEM
        )
    )
    audit = AuditWriter(ca_env.nc.jetstream(), "ca")
    await audit.ensure_stream()
    config = acme_config(free_port(), webroot.port)
    server = await start_acme(ca_env, config, audit)
    try:
        yield AcmeEnv(ca_env, server, config, root_pem, webroot, audit)
    finally:
        await server.stop()


@pytest.fixture
async def free_ports_server(acme_env: AcmeEnv) -> AsyncIterator[AcmeServer]:
    """A second ACME listener of the same CA whose challenge ports are free ones that a
    client which answers challenges itself (lego, Caddy) can take; the first listener's
    http-01 port is the webroot server's."""
    config = acme_config(free_port(), free_port(), tlsalpn01_port=free_port())
    server = await start_acme(acme_env.ca, config, acme_env.audit)
    try:
        yield server
    finally:
        await server.stop()


def curl_site(site: str, port: int, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """curl https://SITE:PORT/PATH with SITE resolved to 127.0.0.1; `args` add trust."""
    where = ["--resolve", f"{site}:{port}:127.0.0.1", f"https://{site}:{port}{path}"]
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args, *where],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def served_with_our_root(
    name: str, site: str, port: int, path: str, root: Path, proc: asyncio.subprocess.Process
) -> str:
    """What an unchanged ACME-speaking web server (Caddy, Traefik) serves once curl,
    trusting only our root, accepts it; it obtains the certificate in the background
    after it starts listening, serving nothing or a self-signed one until then. Also
    checks the other half of the point: without our root, curl refuses it (exit 60)."""
    end = time.monotonic() + 240 * SLOWDOWN
    while True:
        got = await asyncio.to_thread(curl_site, site, port, path, "--cacert", str(root))
        if got.returncode == 0:
            break
        if proc.returncode is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {got.stderr}")
        if time.monotonic() > end:
            raise AssertionError(f"no trusted HTTPS from {name}: {got.stderr}")
        await asyncio.sleep(0.5)
    untrusted = await asyncio.to_thread(curl_site, site, port, path)
    assert untrusted.returncode == 60, untrusted.stderr
    return got.stdout


async def assert_acme_record(env: AcmeEnv, leaf: x509.Certificate, site: str) -> None:
    """The certificate a client stored is for `site` only and is an ordinary, valid CA
    record made for an ACME account under the https-server profile."""
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [site]
    record, _ = await env.ca.store.get_record(f"{leaf.serial_number:X}")
    assert record.requester.startswith("acme:") and record.profile == "https-server"
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID
