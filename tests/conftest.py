"""Fixtures that start the real parts: nats-server with JetStream and a SoftHSM token,
each in a temporary directory on a free loopback port, torn down afterwards.

Further fixtures live beside the tests that need them (swtpm in tests/tpm/, the whole
stack in tests/e2e/). Nothing here is mocked.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mgmt.natsserver import NatsServer, NatsServerConfig, free_port
from mgmt.softhsm import SoftHSMToken, init_token

# One private D-Bus session bus for the whole run, registered here only: GLib keeps the
# first session bus a process connects to, so a second bus (a fixture registered per
# package) would leave later tpm2-abrmd TCTIs dialling the first one.
from tests.tpm.swtpm_fixtures import session_bus as session_bus

# How much slower than this machine the parts run: the fixtures' deadlines are generous
# for a loaded x86 machine, and `make test-arm` (qemu-user, 10-30x slower) raises them
# with EDGEKMS_TEST_SLOWDOWN. A deadline, never a sleep: a test still ends when it can.
SLOWDOWN = max(1.0, float(os.environ.get("EDGEKMS_TEST_SLOWDOWN", "1") or 1))
# Every `kmsctl up` a test starts (they inherit this environment) serves its metrics on
# free ports rather than the default 9464.., which stacks running side by side would fight
# over (`kmsctl up --metrics-listen`, docs/architecture.md "Metrics").
os.environ.setdefault("EDGEKMS_METRICS_LISTEN", "127.0.0.1:0")


def start_nats(directory: Path) -> NatsServer:
    directory.mkdir(parents=True, exist_ok=True)
    config = NatsServerConfig(store_dir=directory / "jetstream", port=free_port())
    return NatsServer(config, directory / "nats.conf", directory / "nats.log").start(
        timeout=15.0 * SLOWDOWN
    )


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for the session; tests that kill it use `nats_server_factory`."""
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[type[NatsServer] | object]:
    started: list[NatsServer] = []

    def make() -> NatsServer:
        server = start_nats(tmp_path / f"nats{len(started)}")
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


class TokenInfo:
    """A SoftHSM token and its PIN (kept in memory and in a 0600 file, never in argv)."""

    def __init__(self, token: SoftHSMToken, pin: str, pin_file: Path):
        self.token = token
        self.pin = pin
        self.pin_file = pin_file

    @property
    def conf(self) -> Path:
        return self.token.conf

    @property
    def module(self) -> str:
        return self.token.module

    @property
    def label(self) -> str:
        return self.token.label


def make_token(directory: Path, label: str = "edgekms") -> TokenInfo:
    pin = secrets.token_hex(8)
    token = init_token(directory, label, pin=pin, so_pin=secrets.token_hex(8))
    pin_file = directory / "pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    return TokenInfo(token, pin, pin_file)


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> TokenInfo:
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="session", autouse=True)
def _softhsm_conf_env(softhsm_token: TokenInfo) -> Iterator[None]:
    """libsofthsm2 reads SOFTHSM2_CONF at load time: point in-process loads at the test token."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SOFTHSM2_CONF", str(softhsm_token.conf))
    yield
    mp.undo()
