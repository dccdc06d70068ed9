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

from mgmt.client import KMSClient
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


async def test_a_junk_flood_from_the_ca_does_not_stall_signing(stack: KmsStack) -> None:
    """Issue 11, item 4, on a live `kmsctl up`: the CA's identity floods kms.audit.ca
    with junk while the broker signs. The broker's chain is its own, so no Sign is lost
    to a race with the flood; nats-server still stores the junk first (one fsync each),
    so a Sign may wait for it and time out once (UNAVAILABLE, retried), never more than
    the flood lasts. `kmsctl audit verify` then names the first junk entry and a count."""
    import subprocess
    import sys

    ca = await nats.connect(
        stack.nats_url, allow_reconnect=False, **_creds(stack, "ca").connect_options()
    )
    flooding = asyncio.Event()

    async def flood() -> None:
        for i in range(3000):
            await ca.publish("kms.audit.ca", b"junk %d" % i)
            if i == 100:
                flooding.set()
        await ca.flush()

    def sign_many() -> int:
        with KMSClient.from_config(stack.client_config, timeout=30, retries=20) as client:
            client.create_key("flood/key", "ec-p256")
            return sum(bool(client.sign("flood/key", b"m%d" % i)) for i in range(20))

    try:
        task = asyncio.create_task(flood())
        await flooding.wait()
        assert await asyncio.to_thread(sign_many) == 20
        await task
    finally:
        await ca.close()
    # Core publishes: the server has them all, its stream stores them in its own time.
    broker = await nats.connect(
        stack.nats_url, allow_reconnect=False, **_creds(stack, "broker").connect_options()
    )
    try:
        js = broker.jetstream(timeout=10)
        deadline = asyncio.get_running_loop().time() + 60
        while (await js.stream_info("KMS_AUDIT_CA")).state.messages < 3000:
            assert asyncio.get_running_loop().time() < deadline, "the junk was not all stored"
            await asyncio.sleep(0.2)
    finally:
        await broker.close()
    kmsctl = str(Path(sys.executable).parent / "kmsctl")
    result = await asyncio.to_thread(
        subprocess.run,
        [kmsctl, "audit", "verify"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("audit chain broken at entry"), lines[:3]
    assert "not JSON" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("3000 problem(s)"), lines[:3]
