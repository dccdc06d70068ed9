"""`kmsctl audit verify --device D` on a fleet hub, end to end.

The hub's nats-server (leaf listener, authorization) carries a real broker, kms-crypto
and the ceremony's internal CA (tests/e2e's Parts, logged in as the hub's admin); device
a is a leaf node in its own domain writing its audit locally. kmsctl asks the hub's
broker for device a's copy (TailAudit device=a) and checks it itself.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekms.audit import AuditWriter
from edgekms.errors import InvalidArgument
from edgekms.fleet import fleet_stream, source_device
from mgmt.natsserver import NatsServer, NatsServerConfig
from tests.conftest import SLOWDOWN, make_token
from tests.e2e.conftest import BIN, Parts
from tests.fleet.conftest import ADMIN, Fleet, until


class HubServer(NatsServer):
    """The hub's nats-server, whose URL carries the admin's login for the hub parts."""

    def __init__(self, config: NatsServerConfig, root: Path, password: str) -> None:
        super().__init__(config, root / "nats.conf", root / "nats.log")
        self.password = password

    @property
    def url(self) -> str:
        return f"nats://{ADMIN}:{self.password}@{self.config.host}:{self.config.port}"


@pytest.fixture
def hub_with_broker(tmp_path: Path) -> Iterator[tuple[Fleet, Parts]]:
    fleet = Fleet(tmp_path / "fleet")
    directory = fleet.root / "hub"
    directory.mkdir(parents=True)
    hub = HubServer(fleet.hub_config(), directory, fleet.passwords[ADMIN])
    parts: Parts | None = None
    try:
        fleet.hub = hub.start(timeout=15.0 * SLOWDOWN)
        fleet.start_device("a")
        (tmp_path / "parts").mkdir()
        parts = Parts(tmp_path / "parts", hub, make_token(tmp_path / "softhsm"))
        parts.start_crypto()
        parts.ceremony()
        parts.start_broker()
        yield fleet, parts
    finally:
        if parts is not None:
            parts.stop_all()
        fleet.stop_all()


def verify(parts: Parts, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), "audit", "verify", "--config", str(parts.client_config), *args],
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
    )


def test_kmsctl_verifies_a_devices_audit_at_the_hub(
    hub_with_broker: tuple[Fleet, Parts],
) -> None:
    fleet, parts = hub_with_broker

    async def write_and_source() -> None:
        device = await fleet.connect_device("a")
        hub = await fleet.connect_hub()
        try:
            writer = AuditWriter(device.jetstream(), "crypto-a")
            await writer.ensure_stream()
            for i in range(4):
                await writer.append("Sign", "ok", target=f"key-{i}")
            await source_device(hub.jetstream(), "a", ["crypto-a"])

            async def four() -> bool:
                info = await hub.jetstream(timeout=2).stream_info(fleet_stream("a"))
                return info.state.messages == 4

            await until(four, what="device a's audit at the hub")
        finally:
            await device.close()
            await hub.close()

    asyncio.run(write_and_source())
    done = verify(parts, "--device", "a", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["entries"] == 4 and report["device"] == "a"
    assert list(report["heads"]) == ["crypto-a"]
    text = verify(parts, "--device", "a")
    assert text.returncode == 0 and "device a: audit chain whole at the hub" in text.stdout

    async def forge() -> None:
        hub = await fleet.connect_hub()
        try:
            js = hub.jetstream()
            info = await js.stream_info(fleet_stream("a"))
            info.config.subjects = ["kms.audit.crypto-a"]
            await js.update_stream(info.config)
            real = await js.get_msg(fleet_stream("a"), 2)
            await js.publish("kms.audit.crypto-a", real.data or b"")
        finally:
            await hub.close()

    asyncio.run(forge())
    broken = verify(parts, "--device", "a")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "audit chain broken at entry KMS_FLEET_A 5" in broken.stdout

    unknown = verify(parts, "--device", "nobody")
    assert unknown.returncode != 0
    assert "fleet.device_unknown" in unknown.stdout + unknown.stderr
    invalid = verify(parts, "--device", "A.>")
    assert invalid.returncode != 0
    assert "fleet.device_invalid" in invalid.stdout + invalid.stderr


def test_tailaudit_refuses_device_with_writer_or_follow(
    hub_with_broker: tuple[Fleet, Parts],
) -> None:
    _, parts = hub_with_broker
    with parts.client() as kms:
        for extra in ({"writer": "broker"}, {"follow": True}):
            with pytest.raises(InvalidArgument) as err:
                list(kms.tail_audit(1, device="a", **extra))  # type: ignore[arg-type]
            assert err.value.reason == "audit.device_exclusive"
        with pytest.raises(InvalidArgument) as bad:
            list(kms.tail_audit(1, device="a.b"))
        assert bad.value.reason == "fleet.device_invalid"
