"""Issue 21, item 3: JetStream's store can never fill the disk it lives on. A cap larger
than the file system can hold is refused at start with a typed error and nothing
written or started; with a cap that fits, a store driven to its cap refuses the audit
append (audit.full) while the file system keeps its room, and appends go on once the
archiver has made room."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker.archiver import Archiver
from edgekms.audit import AuditWriter, StreamLimit, writer_stream
from edgekms.errors import ResourceExhausted
from edgekms.retention import RetentionPolicy
from mgmt.natsserver import NatsServer, NatsServerConfig, free_port
from tests.audit.test_retention import SoftSigner
from tests.conftest import SLOWDOWN

MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: the data dir's file system on a small board."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=60, check=True)


def _server(disk: Path, tmp_path: Path, cap: int) -> NatsServer:
    config = NatsServerConfig(
        store_dir=disk / "nats" / "jetstream", port=free_port(), max_file_store=cap
    )
    return NatsServer(config, disk / "nats.conf", tmp_path / "nats.log")


def test_a_store_cap_beyond_the_disk_is_refused_before_anything_starts(
    small_disk: Path, tmp_path: Path
) -> None:
    server = _server(small_disk, tmp_path, 64 * MIB)
    with pytest.raises(ResourceExhausted) as refused:
        server.start(timeout=15 * SLOWDOWN)
    assert refused.value.reason == "nats.store_exceeds_disk"
    assert refused.value.details["max_file_store"] == str(64 * MIB)
    assert server.process is None
    assert list(small_disk.iterdir()) == []  # no config, no store


async def test_a_store_at_its_cap_refuses_appends_keeps_the_disk_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    server = _server(small_disk, tmp_path, 2 * MIB).start(timeout=15 * SLOWDOWN)
    try:
        nc = await nats.connect(server.url, allow_reconnect=False)
        js = nc.jetstream(timeout=10 * SLOWDOWN)
        # The stream's own limit is what the store cap allows: 1 MiB of the 2.
        writer = AuditWriter(js, "test", limit=StreamLimit(MIB, 1_000_000))
        await writer.ensure_stream()
        stored = 0
        with pytest.raises(ResourceExhausted) as full:
            for _ in range(100_000):
                await writer.append("Sign", "ok", client="alice", role="signer", target="k")
                stored += 1
        assert full.value.reason == "audit.full"
        assert stored > 1000
        # The file system kept its room: the store stopped at its limits, not the disk's.
        stat = os.statvfs(small_disk)
        assert stat.f_bavail * stat.f_frsize > MIB
        # The archiver makes room (to an archive dir on the same small disk) and the
        # writer appends again.
        archiver = Archiver(js, small_disk / "archive", SoftSigner(), RetentionPolicy(max_age_s=0))
        archived = await archiver.round()
        assert archived[writer_stream("test")] > 0
        await writer.append("Sign", "ok", target="after")
        await nc.close()
    finally:
        server.stop()
