"""`kmsctl up` runs its bus with TLS and one identity per part: anonymous clients are
refused, each child's config names its own identity (no secret in it), and a child's
identity cannot do another's job on the live stack."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from mgmt.natsauth import BusCredentials, password_path
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    running = start_stack(tmp_path_factory.mktemp("authstack") / "data")
    try:
        yield running
    finally:
        assert stop_stack(running) == 0


def _creds(stack: KmsStack, user: str) -> BusCredentials:
    secrets = stack.data_dir / "secrets"
    return BusCredentials(
        user, password_path(secrets, user), stack.data_dir / "nats" / "tls" / "bus-ca.crt"
    )


def test_children_get_their_own_identity_by_config_file(stack: KmsStack) -> None:
    config_dir = stack.data_dir / "config"
    expected = {"crypto-hsm0.toml": "crypto-hsm0", "broker.toml": "broker", "ca.toml": "ca"}
    for name, user in expected.items():
        config = tomllib.loads((config_dir / name).read_text())
        assert config["nats_user"] == user
        assert config["nats_url"].startswith("tls://")
        password = Path(config["nats_password_file"]).read_text().strip()
        assert password not in (config_dir / name).read_text()
    for log in (stack.data_dir / "logs").glob("*.log"):
        for user in expected.values():
            secret = password_path(stack.data_dir / "secrets", user).read_text().strip()
            assert secret not in log.read_text(errors="replace"), log.name


async def test_anonymous_client_is_refused(stack: KmsStack) -> None:
    tls = BusCredentials(ca_file=stack.data_dir / "nats" / "tls" / "bus-ca.crt")
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(
            stack.nats_url, allow_reconnect=False, connect_timeout=3, **tls.connect_options()
        )


async def test_live_crypto_service_serves_broker_not_others(stack: KmsStack) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    broker = await nats.connect(
        stack.nats_url, allow_reconnect=False, **_creds(stack, "broker").connect_options()
    )
    crypto = await nats.connect(
        stack.nats_url,
        allow_reconnect=False,
        error_cb=on_error,
        **_creds(stack, "crypto-hsm0").connect_options(),
    )
    try:
        reply = await broker.request("$SRV.PING.kms-crypto-hsm0", b"", timeout=3)
        assert b"kms-crypto-hsm0" in reply.data
        # The crypto identity cannot use the real service it stands beside.
        await crypto.publish("kms.crypto.hsm0.ListKeys", b"")
        await crypto.flush()
        for _ in range(100):
            if any("permissions violation" in e for e in errors):
                break
            await asyncio.sleep(0.02)
        assert any('publish to "kms.crypto.hsm0.listkeys"' in e for e in errors), errors
    finally:
        await crypto.close()
        await broker.close()
