"""A hub and two leaf devices, real nats-servers on loopback (docs/cluster.md, "Fleet").

The hub runs JetStream in domain "hub" with a leaf listener and an authorization block
holding an admin user and each device's narrow user (mgmt.fleet.device_identity). Each
device runs JetStream in its own domain (dev-<id>) and connects to the hub as a leaf
node with its user. `Fleet.stop_hub()` / `start_hub()` cut and restore every uplink (same
ports, same store); `connect_*` poll with a generous deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from edgekms.fleet import device_domain
from mgmt.fleet import device_identity, device_inbox, device_user
from mgmt.natsauth import BusTLS, Identity, Permissions, ensure_bus_tls, render_authorization
from mgmt.natsserver import (
    HubLeafListen,
    LeafRemote,
    NatsServer,
    NatsServerConfig,
    free_port,
)
from tests.conftest import SLOWDOWN

DEVICES = ("a", "b")
ADMIN = "hub-admin"
HUB_DOMAIN = "hub"


async def until(
    check: Callable[[], Awaitable[bool]], seconds: float = 60.0, what: str = "condition"
) -> None:
    """Poll `check` until true, with a generous deadline (a busy two-core machine)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        try:
            if await check():
                return
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


@dataclass
class Fleet:
    root: Path
    passwords: dict[str, str] = field(default_factory=dict)
    hub_port: int = 0
    leaf_port: int = 0
    device_ports: dict[str, int] = field(default_factory=dict)
    hub: NatsServer | None = None
    devices: dict[str, NatsServer | None] = field(default_factory=dict)
    # The leaf connections over TLS: the hub's certificate from mgmt.natsauth's bus CA,
    # which each device checks the hub against.
    tls: BusTLS | None = None

    def __post_init__(self) -> None:
        self.hub_port = free_port()
        self.leaf_port = free_port()
        users = [ADMIN, *(device_user(d) for d in DEVICES)]
        self.passwords = {u: secrets.token_urlsafe(18) for u in users}
        self.device_ports = {d: free_port() for d in DEVICES}
        self.devices = dict.fromkeys(DEVICES)

    def hub_config(self) -> NatsServerConfig:
        identities = [
            Identity(ADMIN, Permissions(publish=(">",), subscribe=(">",))),
            *(device_identity(d) for d in DEVICES),
        ]
        return NatsServerConfig(
            store_dir=self.root / "hub" / "jetstream",
            port=self.hub_port,
            server_name="hub",
            domain=HUB_DOMAIN,
            authorization=render_authorization(identities, self.passwords),
            leaf_listen=HubLeafListen(
                port=self.leaf_port,
                tls_cert=self.tls.server_cert if self.tls else None,
                tls_key=self.tls.server_key if self.tls else None,
            ),
        )

    def device_config(self, device: str, uplink: bool = True) -> NatsServerConfig:
        remote = LeafRemote(
            url=f"127.0.0.1:{self.leaf_port}",
            user=device_user(device),
            password=self.passwords[device_user(device)],
            tls_ca=self.tls.ca_cert if self.tls else None,
        )
        return NatsServerConfig(
            store_dir=self.root / f"dev-{device}" / "jetstream",
            port=self.device_ports[device],
            server_name=f"dev-{device}",
            domain=device_domain(device),
            leaf_remote=remote if uplink else None,
        )

    def _run(self, name: str, config: NatsServerConfig) -> NatsServer:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        server = NatsServer(config, directory / "nats.conf", directory / "nats.log")
        return server.start(timeout=15.0 * SLOWDOWN)

    def start_hub(self) -> None:
        self.hub = self._run("hub", self.hub_config())

    def stop_hub(self) -> None:
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def start_device(self, device: str) -> None:
        self.devices[device] = self._run(f"dev-{device}", self.device_config(device))

    def stop_all(self) -> None:
        for device, server in self.devices.items():
            if server is not None:
                server.stop()
                self.devices[device] = None
        self.stop_hub()

    async def connect_hub(self) -> Client:
        """The hub's admin (the operator's view of the hub)."""
        return await nats.connect(
            f"nats://127.0.0.1:{self.hub_port}",
            user=ADMIN,
            password=self.passwords[ADMIN],
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
        )

    async def connect_device(self, device: str) -> Client:
        """A process on the device, on the device's own nats-server (its inbox prefix is
        the one the hub may answer on)."""
        return await nats.connect(
            f"nats://127.0.0.1:{self.device_ports[device]}",
            inbox_prefix=device_inbox(device),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
        )


def running_fleet(root: Path, tls: bool = False) -> Iterator[Fleet]:
    made = Fleet(root / "fleet")
    if tls:
        made.tls = ensure_bus_tls(root / "tls", root / "secrets")
    try:
        made.start_hub()
        for device in DEVICES:
            made.start_device(device)
        yield made
    finally:
        made.stop_all()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The hub and both devices, leaf links on plain TCP (loopback)."""
    yield from running_fleet(tmp_path)


@pytest.fixture
def tls_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The same with the leaf links over TLS (the hub's certificate from the bus CA)."""
    yield from running_fleet(tmp_path, tls=True)


@pytest.fixture
async def hub(fleet: Fleet) -> AsyncIterator[Client]:
    nc = await fleet.connect_hub()
    try:
        yield nc
    finally:
        await nc.close()
