"""certbot, unchanged, gets a certificate from the mini-CA's ACME server: http-01 from a
webroot served by a real HTTP server; then nginx serves it and curl trusts it with the
root alone. The certificate is an ordinary CA record (requester acme:<account>),
revocable into the CRL, and the whole exchange is in the audit log."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from edgekms.audit import parse_message, writer_stream
from edgekms.v1 import ca_pb2
from mgmt.natsserver import free_port
from tests.acme.conftest import AcmeEnv, wait_listening
from tests.conftest import SLOWDOWN

pytestmark = pytest.mark.skipif(
    shutil.which("certbot") is None or shutil.which("nginx") is None,
    reason="needs certbot and nginx (scripts/bootstrap.sh installs them)",
)


async def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A tool run off the event loop: it calls back into the ACME server on this loop."""
    return await asyncio.to_thread(
        subprocess.run,
        list(argv),
        capture_output=True,
        text=True,
        timeout=240 * SLOWDOWN,
        check=False,
        env={**os.environ, **(env or {})},
    )


def certbot(env: AcmeEnv, work: Path, *args: str) -> list[str]:
    return [
        "certbot",
        *("--config-dir", str(work / "config"), "--work-dir", str(work / "work")),
        *("--logs-dir", str(work / "logs"), "--non-interactive", "--agree-tos"),
        *("--server", env.directory),
        *args,
    ]


def nginx_conf(directory: Path, port: int, cert: Path, key: Path) -> Path:
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name nas.home.arpa;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "served by nginx\\n"; }}
    }}
}}
"""
    )
    return conf


async def audit_actions(env: AcmeEnv) -> list[str]:
    """The actions of the CA writer's audit entries (subject kms.audit.ca)."""
    js = env.ca.nc.jetstream()
    sub = await js.subscribe("kms.audit.ca", stream=writer_stream("ca"), ordered_consumer=True)
    actions: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                return actions
            for entry in parse_message(msg.data):  # long form, whatever the format
                actions.append(entry["action"])
    finally:
        await sub.unsubscribe()


async def test_certbot_obtains_a_certificate_that_nginx_serves_and_curl_trusts(
    acme_env: AcmeEnv, tmp_path: Path
) -> None:
    work = tmp_path / "certbot"
    got = await run(
        *certbot(
            acme_env,
            work,
            "certonly",
            *("-m", "admin@nas.home.arpa", "--webroot", "-w", str(acme_env.webroot.path)),
            *("-d", "nas.home.arpa", "-d", "www.nas.home.arpa"),
        ),
        env={"REQUESTS_CA_BUNDLE": str(acme_env.root_pem)},
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    live = work / "config" / "live" / "nas.home.arpa"
    fullchain, privkey = live / "fullchain.pem", live / "privkey.pem"
    leaf = x509.load_pem_x509_certificates(fullchain.read_bytes())[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["nas.home.arpa", "www.nas.home.arpa"]

    # nginx serves it; curl trusts it with nothing but the root.
    port = free_port()
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    conf = nginx_conf(nginx_dir, port, fullchain, privkey)
    nginx = await asyncio.create_subprocess_exec(
        *("nginx", "-p", str(nginx_dir), "-c", str(conf)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_listening, port)
        where = ["--resolve", f"nas.home.arpa:{port}:127.0.0.1", f"https://nas.home.arpa:{port}/"]
        curl = await run("curl", "-sS", "--cacert", str(acme_env.root_pem), *where)
        assert curl.returncode == 0 and curl.stdout == "served by nginx\n", curl.stderr
        other = [
            "--resolve",
            f"other.home.arpa:{port}:127.0.0.1",
            f"https://other.home.arpa:{port}/",
        ]
        wrong = await run("curl", "-sS", "--cacert", str(acme_env.root_pem), *other)
        assert wrong.returncode in (51, 60), wrong.stderr  # the name is checked too
    finally:
        nginx.terminate()
        await nginx.wait()

    # An ordinary CA record, with the account as requester.
    serial = f"{leaf.serial_number:X}"
    record, _ = await acme_env.ca.store.get_record(serial)
    assert record.requester.startswith("acme:") and record.profile == "https-server"
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID
    listed = await acme_env.ca.ca.list(ca_pb2.ListCertificatesRequest(match="www.nas.home.arpa"))
    assert [r.serial for r in listed.records] == [serial]

    # certbot revokes it with its account key: the CRL lists it.
    revoked = await run(
        *certbot(
            acme_env,
            work,
            "revoke",
            "--cert-path",
            str(live / "cert.pem"),
            "--no-delete-after-revoke",
            "--reason",
            "keycompromise",
        ),
        env={"REQUESTS_CA_BUNDLE": str(acme_env.root_pem)},
    )
    assert revoked.returncode == 0, revoked.stdout[-2000:] + revoked.stderr[-2000:]
    record, _ = await acme_env.ca.store.get_record(serial)
    assert record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
    assert record.revocation_reason == ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
    crl = x509.load_der_x509_crl((await acme_env.ca.ca.rebuild_crl()).crl_der)
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None

    actions = await audit_actions(acme_env)
    for action in ("acme.new_account", "acme.validate", "acme.finalize", "acme.revoke"):
        assert action in actions, actions


async def test_certbot_renew_gets_a_new_certificate_from_the_same_ca(
    acme_env: AcmeEnv, tmp_path: Path
) -> None:
    """`certbot renew`, as its timer runs it, from what `certonly` stored (server,
    webroot, account): a new certificate with a new serial for the same names, the
    old one still valid (ACME renewal is a new order; expiry retires the old)."""
    work = tmp_path / "certbot"
    bundle = {"REQUESTS_CA_BUNDLE": str(acme_env.root_pem)}
    got = await run(
        *certbot(
            acme_env,
            work,
            "certonly",
            *("-m", "admin@nas.home.arpa", "--webroot", "-w", str(acme_env.webroot.path)),
            *("-d", "nas.home.arpa"),
        ),
        env=bundle,
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    live = work / "config" / "live" / "nas.home.arpa" / "cert.pem"
    first = x509.load_pem_x509_certificate(live.read_bytes())
    # --force-renewal: the certificate is months from expiry; `renew` takes the server
    # and the webroot from the renewal configuration certonly wrote.
    renewed = await run(
        "certbot",
        *("--config-dir", str(work / "config"), "--work-dir", str(work / "work")),
        *("--logs-dir", str(work / "logs"), "--non-interactive"),
        *("renew", "--force-renewal", "--no-random-sleep-on-renew"),
        env=bundle,
    )
    assert renewed.returncode == 0, renewed.stdout[-3000:] + renewed.stderr[-3000:]
    second = x509.load_pem_x509_certificate(live.read_bytes())
    assert second.serial_number != first.serial_number
    san = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nas.home.arpa"]
    for cert in (first, second):
        record, _ = await acme_env.ca.store.get_record(f"{cert.serial_number:X}")
        assert record.requester.startswith("acme:")
        assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID


async def test_state_survives_a_restart_of_the_acme_server(acme_env: AcmeEnv) -> None:
    """Accounts and orders live in the CA's bucket: a new server (a new CA process on
    the same bucket) finds the account by its key and completes the order."""
    from tests.acme.conftest import start_acme

    client = acme_env.client()
    await asyncio.to_thread(client.register)
    order_url, order = await asyncio.to_thread(client.new_order, ["nas.home.arpa"])
    await acme_env.server.stop()
    restarted = await start_acme(acme_env.ca, acme_env.config, acme_env.audit)
    acme_env.server = restarted  # the fixture stops this one
    again = acme_env.client(key=client.key)
    found = await asyncio.to_thread(
        again.post,
        (await asyncio.to_thread(again.load_directory))["newAccount"],
        {"onlyReturnExisting": True},
        use_jwk=True,
    )
    assert found.status == 200 and found.headers["location"] == client.kid
    again.kid = client.kid
    for chall in await asyncio.to_thread(again.challenges, order):
        acme_env.webroot.answer(chall["token"], again.key_authorization(chall["token"]))
        await asyncio.to_thread(again.post, chall["url"], {})
    ready = await asyncio.to_thread(again.poll, order_url, ("ready", "invalid"))
    assert ready["status"] == "ready", ready
