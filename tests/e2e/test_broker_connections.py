"""The broker lets go of connections nobody uses: a TCP connection that never starts
its TLS handshake, and a client connection that stays idle, are closed by the server
(real broker on its own nats-server and SoftHSM token, timeouts shortened in its
config). Before, both were held indefinitely."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import Parts, running_parts


class ShortTimeouts(Parts):
    broker_extra = "handshake_timeout = 1.0\nidle_timeout = 1.0\n"


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    with running_parts(tmp_path, ShortTimeouts) as built:
        yield built


def test_a_connection_that_never_handshakes_is_closed(parts: Parts) -> None:
    with socket.create_connection(("127.0.0.1", parts.broker_port), timeout=60) as sock:
        # Nothing sent: a half-open or idle-before-TLS peer. The server ends it; recv
        # returns b"" (or the connection is reset) well within the socket's 60 s.
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
    assert data == b""


def test_an_idle_client_connection_is_closed(parts: Parts) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with parts.client() as client:
        assert client.whoami().client == "admin"
        channel = client._channel
        channel.subscribe(states.append, try_to_connect=False)
        deadline = time.monotonic() + 60
        while grpc.ChannelConnectivity.IDLE not in states[1:] and time.monotonic() < deadline:
            time.sleep(0.1)
        # READY after the call, then IDLE once the server closed the idle connection.
        assert grpc.ChannelConnectivity.IDLE in states[1:], states
        assert client.whoami().client == "admin"  # a new call simply reconnects
