"""A real nats-server configured exactly as `kmsctl up` configures it: bus TLS from the
bus CA, one user per service with the permission tables of mgmt.natsauth.

Session-scoped: permissions are static, and every test uses its own subjects or keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from mgmt.natsauth import (
    BUS_MAX_PAYLOAD,
    BusCredentials,
    BusTLS,
    Identity,
    audit_writers,
    ensure_bus_tls,
    ensure_passwords,
    read_password,
    render_authorization,
    stack_identities,
)
from mgmt.natsserver import NatsServer, NatsServerConfig, free_port

PROVIDERS = ("hsm0", "tpm0")


@dataclass
class SecureBus:
    server: NatsServer
    tls: BusTLS
    passwords: dict[str, Path]
    identities: dict[str, Identity]
    providers: tuple[str, ...] = PROVIDERS

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, user: str) -> BusCredentials:
        return BusCredentials(user, self.passwords[user], self.tls.ca_cert)


def start_secure_bus(
    root: Path, providers: tuple[str, ...] = PROVIDERS, ceremony: bool = False, setup: bool = False
) -> SecureBus:
    identities = stack_identities(providers, ceremony=ceremony, setup=setup)
    secrets_dir = root / "secrets"
    tls = ensure_bus_tls(root / "tls", secrets_dir)
    passwords = ensure_passwords(secrets_dir, [i.user for i in identities])
    plain = {user: read_password(path) for user, path in passwords.items()}
    config = NatsServerConfig(
        store_dir=root / "jetstream",
        port=free_port(),
        max_payload=BUS_MAX_PAYLOAD,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        authorization=render_authorization(identities, plain),
    )
    server = NatsServer(config, root / "nats.conf", root / "nats.log").start()
    return SecureBus(server, tls, passwords, {i.user: i for i in identities}, providers)


def end_ceremony(bus: SecureBus) -> None:
    """Reload the bus without the supervisor's ceremony (and setup) grant, as `kmsctl up`
    does."""
    identities = stack_identities(bus.providers, ceremony=False)
    plain = {user: read_password(path) for user, path in bus.passwords.items()}
    config = dataclasses.replace(
        bus.server.config, authorization=render_authorization(identities, plain)
    )
    bus.server.reload(config)
    bus.identities = {i.user: i for i in identities}


@pytest.fixture(scope="session")
def secure_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    bus = start_secure_bus(tmp_path_factory.mktemp("securebus"))
    try:
        yield bus
    finally:
        bus.server.stop()


@dataclass
class Conn:
    """A connection plus the permission errors the server reported on it."""

    nc: Client
    errors: list[str] = field(default_factory=list)

    async def violation(self, needle: str, within: float = 5.0) -> str:
        """Wait for the server's 'Permissions Violation' naming `needle`. It returns as
        soon as the notice arrives; the bound only needs room for a loaded machine."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            for error in self.errors:
                if "permissions violation" in error.lower() and needle.lower() in error.lower():
                    return error
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {needle!r}; got {self.errors}")


async def connect(bus: SecureBus, user: str, **extra: Any) -> Conn:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        bus.url,
        name=f"test-{user}",
        connect_timeout=3,
        allow_reconnect=False,
        error_cb=on_error,
        **{**bus.creds(user).connect_options(), **extra},
    )
    return Conn(nc, errors)


@contextlib.asynccontextmanager
async def connected(bus: SecureBus, user: str) -> AsyncIterator[Conn]:
    conn = await connect(bus, user)
    try:
        yield conn
    finally:
        await conn.nc.close()


@contextlib.contextmanager
def hardened_bus(directory: Path) -> Iterator[SecureBus]:
    """A secure bus whose buckets and audit stream the supervisor has made or hardened
    (edgekms.kvstore, edgekms.audit) before its setup grant goes, as `kmsctl up` does."""
    from edgekms import audit, kvstore

    bus = start_secure_bus(directory, setup=True)
    try:

        async def set_up() -> None:
            conn = await connect(bus, "kmsctl")
            try:
                js = conn.nc.jetstream(timeout=10)
                for spec in kvstore.BUCKETS.values():
                    await kvstore.harden(js, spec)
                await audit.harden_stream(js, audit_writers(bus.providers))
            finally:
                await conn.nc.close()

        asyncio.run(set_up())
        end_ceremony(bus)
        yield bus
    finally:
        bus.server.stop()
