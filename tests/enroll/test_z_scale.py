"""50,000 devices on the real stack: the registry lists them page by page, and a group of
500 of them is denied in batches with progress, each member refused at once. Records are
seeded through the bucket as the broker itself writes them (sealed with its key):
enrolling 50,000 devices one by one would take the test machine half an hour. Runs last
in the package: it leaves the stack with 50,000 more records."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import nats.errors

from edgekms import errors
from edgekms.sealed import WRITER_BROKER
from edgekms.subjects import CLIENTS_BUCKET
from edgekms.v1 import enroll_pb2
from mgmt.sealkeys import local_seal
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run

DEVICES = 50_000
GROUP_SIZE = 500
WINDOW = 32
ATTEMPTS = 5


async def _seed(stack: KmsStack) -> None:
    seal = local_seal(stack.data_dir / "secrets", WRITER_BROKER)
    assert seal is not None
    nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
    try:
        js = nc.jetstream()
        slots = asyncio.Semaphore(WINDOW)

        async def put(key: str, value: bytes) -> None:
            # As SealedKV.put writes it, with a generous timeout and retries: on a loaded
            # machine a JetStream write can take seconds. A put repeated is the same put.
            sealed = seal.seal(CLIENTS_BUCKET, key, value)
            for attempt in range(ATTEMPTS):
                try:
                    await js.publish(f"$KV.{CLIENTS_BUCKET}.{key}", sealed, timeout=30)
                    return
                except nats.errors.TimeoutError:
                    if attempt == ATTEMPTS - 1:
                        raise

        async def one(i: int) -> None:
            device = enroll_pb2.Device(
                name=f"scale-{i:05d}",
                group="scale-big" if i % (DEVICES // GROUP_SIZE) == 0 else "scale-rest",
                profile="device",
                serial=format(0x5CA1E000000 + i, "x"),
                status=enroll_pb2.DEVICE_STATUS_ACTIVE,
                enrolled_at="2026-01-01T00:00:00+00:00",
            )
            async with slots:
                await put(f"device.{device.name}", device.SerializeToString())

        await asyncio.gather(*(one(i) for i in range(DEVICES)))
    finally:
        await nc.close()


def test_fifty_thousand_devices_list_paged_and_a_big_group_is_denied_in_batches(
    stack: KmsStack, tmp_path: Path
) -> None:
    asyncio.run(_seed(stack))
    with stack.client(timeout=60) as admin:
        deadline = time.monotonic() + 300 * SLOWDOWN
        group: list[enroll_pb2.Device] = []
        while time.monotonic() < deadline:
            # The broker follows the bucket: wait until it has every record (busy with
            # them, it may be slow to take a connection: that is "not yet", too).
            try:
                group = list(admin.iter_devices(group="scale-big", page_size=1000))
            except errors.Unavailable:
                group = []
            if len(group) == GROUP_SIZE:
                break
            time.sleep(1)
        assert len(group) == GROUP_SIZE
        names = [d.name for d in admin.iter_devices(page_size=1000)]
        assert len([n for n in names if n.startswith("scale-")]) == DEVICES
        assert names == sorted(names) and len(set(names)) == len(names)

    result = run(stack, "device", "deny", "--group", "scale-big", "--batch", "200")
    assert result.exit_code == 0, result.output
    # Each member's client certificate (its serial) revoked; none asked the CA for any.
    assert f"denied {GROUP_SIZE} device(s); {GROUP_SIZE} certificate(s) revoked" in result.stdout
    assert result.stderr.count("more denied of 500") == 3  # three batches: 200, 200, 100
    with stack.client(timeout=60) as admin:
        denied = list(admin.iter_devices(group="scale-big", denied_only=True, page_size=1000))
        assert len(denied) == GROUP_SIZE
        shown = admin.get_device("scale-00100")
        assert shown.status == enroll_pb2.DEVICE_STATUS_DENIED
        assert admin.get_device("scale-00101").status == enroll_pb2.DEVICE_STATUS_ACTIVE
