"""Caddy, unchanged (Debian's 2.6.2: Go's TLS stack, certmagic and acmez, where lego's
own ACME code is tested beside it): a Caddyfile that names our directory in `acme_ca`
and our root in `acme_ca_root` is all it needs to obtain a certificate for its site by
itself, with http-01 on its HTTP port or tls-alpn-01 on its HTTPS port, and to serve
HTTPS that curl trusts with nothing but the root. This is how a NAS runs Caddy."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from ca_service.acme.server import AcmeServer
from tests.acme.conftest import AcmeEnv, assert_acme_record, served_with_our_root
from tests.conftest import SLOWDOWN

pytestmark = pytest.mark.skipif(
    shutil.which("caddy") is None, reason="needs caddy (scripts/bootstrap.sh installs it)"
)

SITE = "nas.home.arpa"
BODY = "served by caddy"


def caddyfile(work: Path, server: AcmeServer, root: Path, challenge: str) -> Path:
    """The Caddyfile an admin writes: the global `acme_ca` and `acme_ca_root`, Caddy's
    ports set to the ones the CA validates on, and one site. The site's `issuer acme`
    only switches off the other challenge so that each run proves one; it inherits the
    directory and the root from the global options."""
    config = server.config
    disable = "disable_tlsalpn_challenge" if challenge == "http-01" else "disable_http_challenge"
    path = work / "Caddyfile"
    path.write_text(
        f"""{{
	admin off
	storage file_system {work / "data"}
	http_port {config.http01_port}
	https_port {config.tlsalpn01_port}
	acme_ca {config.directory_url}
	acme_ca_root {root}
	email admin@{SITE}
}}

{SITE} {{
	bind 127.0.0.1
	tls {{
		issuer acme {{
			{disable}
		}}
	}}
	respond "{BODY}" 200
}}
"""
    )
    return path


def solved_challenges(log: str) -> set[str]:
    """The challenge types Caddy's JSON log says it tried."""
    types: set[str] = set()
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "trying to solve challenge":
            types.add(str(entry.get("challenge_type")))
    return types


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_caddy_obtains_a_certificate_and_serves_https_that_curl_trusts(
    acme_env: AcmeEnv, free_ports_server: AcmeServer, tmp_path: Path, challenge: str
) -> None:
    work = tmp_path / "caddy"
    work.mkdir()
    conf = caddyfile(work, free_ports_server, acme_env.root_pem, challenge)
    log_path = work / "caddy.log"
    home = {"HOME": str(work), "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}
    with log_path.open("w") as log:
        caddy = await asyncio.create_subprocess_exec(
            *("caddy", "run", "--config", str(conf), "--adapter", "caddyfile"),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **home},
        )
    try:
        port = free_ports_server.config.tlsalpn01_port
        try:
            body = await served_with_our_root("caddy", SITE, port, "/", acme_env.root_pem, caddy)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log_path.read_text()[-4000:]}") from None
        assert body == BODY
    finally:
        caddy.terminate()
        await asyncio.wait_for(caddy.wait(), 30 * SLOWDOWN)

    assert solved_challenges(log_path.read_text()) == {challenge}
    # What Caddy stored and serves is an ordinary CA record made for an ACME account.
    stored = sorted((work / "data" / "certificates").glob(f"*/{SITE}/{SITE}.crt"))
    assert len(stored) == 1, stored
    leaf = x509.load_pem_x509_certificates(stored[0].read_bytes())[0]
    await assert_acme_record(acme_env, leaf, SITE)
