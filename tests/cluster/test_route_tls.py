"""TLS on routes (mgmt.natsserver.ClusterConfig tls_cert/tls_key/tls_ca): real
nats-servers whose routes carry TLS with certificates from one CA (InternalCA.issue_route)
and verify each other's; a node whose route certificate comes from another CA is
refused even though it knows the route password."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client

from mgmt.natsserver import ClusterConfig, NatsServer, NatsServerConfig, NatsServerError, free_port
from mgmt.pki import InternalCA, build_ca_certificate, write_private, write_public
from tests.conftest import SLOWDOWN

CLUSTER = "edgekms-tls"


def _ca() -> InternalCA:
    key = ec.generate_private_key(ec.SECP256R1())
    return InternalCA(build_ca_certificate(key), key)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _route_files(ca: InternalCA, directory: Path, node: str) -> tuple[Path, Path, Path]:
    """This node's route certificate and key, and the CA it trusts for routes."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_route(key.public_key(), [node, "localhost", "127.0.0.1"])
    paths = (directory / "route.crt", directory / "route.key", directory / "routes-ca.crt")
    write_public(paths[0], _pem(cert))
    write_private(
        paths[1],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_public(paths[2], _pem(ca.cert))
    return paths


def test_route_tls_is_rendered_whole_or_refused(tmp_path: Path) -> None:
    with_tls = ClusterConfig(
        name="c",
        port=6222,
        password="pw",
        tls_cert=tmp_path / "r.crt",
        tls_key=tmp_path / "r.key",
        tls_ca=tmp_path / "ca.crt",
    ).render()
    text = "\n".join(with_tls)
    assert "tls: {" in text and "verify: true" in text
    assert f'ca_file: "{tmp_path / "ca.crt"}"' in text
    # The password stays required with TLS.
    with pytest.raises(NatsServerError, match="password"):
        ClusterConfig(
            name="c", port=6222, tls_cert=tmp_path / "a", tls_key=tmp_path / "b", tls_ca=tmp_path
        ).render()
    # Half a TLS setting is refused, not rendered as plain routes.
    with pytest.raises(NatsServerError, match="all three"):
        ClusterConfig(name="c", port=6222, password="pw", tls_cert=tmp_path / "r.crt").render()
    assert not any("tls" in line for line in ClusterConfig("c", 6222, password="p").render())


def _route_info(port: int, cert: Path, key: Path, ca: Path) -> bytes:
    """The first line a route listener sends: over plain TCP (nothing, when it speaks
    only TLS), or, with `cert`, after a TLS handshake as a route client."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        context.check_hostname = False
        with context.wrap_socket(conn) as tls:
            return tls.makefile("rb").readline()


def _plain_first_line(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            return conn.makefile("rb").readline()
        except OSError:
            return b""


async def _crossing(publisher: Client, subscriber: Client, subject: str) -> bool:
    """Whether a message published on one node reaches a subscriber on the other."""
    sub = await subscriber.subscribe(subject)
    await subscriber.flush()
    try:
        await publisher.publish(subject, b"x")
        await publisher.flush()
        try:
            await sub.next_msg(timeout=0.5)
            return True
        except nats.errors.TimeoutError:
            return False
    finally:
        await sub.unsubscribe()


async def test_routes_use_tls_and_refuse_a_certificate_of_another_ca(tmp_path: Path) -> None:
    ours, theirs = _ca(), _ca()
    password = "route-password-shared-by-all"
    route_ports = [free_port() for _ in range(3)]
    client_ports = [free_port() for _ in range(3)]
    servers: list[NatsServer] = []
    try:
        for index in range(3):
            directory = tmp_path / f"n{index}"
            directory.mkdir()
            # n2 knows the password but holds a certificate of another CA (and trusts it).
            cert, key, ca = _route_files(theirs if index == 2 else ours, directory, f"n{index}")
            config = NatsServerConfig(
                store_dir=directory / "jetstream",
                port=client_ports[index],
                server_name=f"n{index}",
                cluster=ClusterConfig(
                    name=CLUSTER,
                    port=route_ports[index],
                    routes=tuple(f"127.0.0.1:{p}" for p in route_ports),
                    password=password,
                    tls_cert=cert,
                    tls_key=key,
                    tls_ca=ca,
                ),
            )
            server = NatsServer(config, directory / "nats.conf", directory / "nats.log")
            servers.append(server.start(timeout=15.0 * SLOWDOWN))
        clients = [await nats.connect(s.url, connect_timeout=2) for s in servers]
        try:
            deadline = time.monotonic() + 60 * SLOWDOWN
            # n0 and n1 route to each other over TLS.
            while not await _crossing(clients[0], clients[1], "tls.ok"):
                assert time.monotonic() < deadline, "n0 and n1 never routed over TLS"
            # The route listener speaks TLS first: nothing in plain text, its INFO only
            # after a handshake with a certificate of our CA.
            assert not _plain_first_line(route_ports[0]).startswith(b"INFO")
            cert, key, ca = _route_files(ours, tmp_path / "probe", "probe")
            info = _route_info(route_ports[0], cert, key, ca)
            assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True
            # n2's route is refused in the TLS handshake: n0 and n1 do not trust its CA.
            for log_path in (servers[0].log_path, servers[1].log_path):
                while "certificate signed by unknown authority" not in log_path.read_text(
                    errors="replace"
                ):
                    assert time.monotonic() < deadline, f"no TLS refusal of n2 in {log_path}"
                    await asyncio.sleep(0.2)
            # With n0-n1 routed and n2's attempts refused, nothing crosses to n2.
            assert not await _crossing(clients[0], clients[2], "tls.refused")
            assert not await _crossing(clients[2], clients[1], "tls.refused")
            # And n0-n1 still carries both ways: polled, since a new subscription's
            # interest reaches the other node a moment after the subscriber's flush.
            while not await _crossing(clients[1], clients[0], "tls.ok.back"):
                assert time.monotonic() < deadline, "n1 to n0 stopped routing"
        finally:
            for client in clients:
                await client.close()
    finally:
        for server in servers:
            server.stop()
