"""The board's audit streams on a real JetStream store of the board's size: nats-server
with the layer's --max-file-store, its store on a tmpfs as large as the data partition.
Each writer's AuditWriter.ensure_stream with the limit its board config sets is granted;
with the old defaults (1-2 GiB) it is refused with err 10047, and nothing is left behind.
The static half (the margins for LUKS, ext4 and the rest) is
tests/deploy/test_yocto_layer.py::test_data_partition_holds_the_audit_streams_reservation."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from edgekms.audit import (
    MIN_STREAM_BYTES,
    AuditWriter,
    StreamLimit,
    default_max_bytes,
    writer_stream,
)
from edgekms.errors import ResourceExhausted
from mgmt.natsserver import NatsServer, NatsServerConfig, free_port
from tests.conftest import SLOWDOWN
from tests.deploy.boardsizing import BoardSizing, board_sizing


@pytest.fixture
def board_store(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of the data partition's size, mounted for this test and unmounted after."""
    board = board_sizing()
    mount = tmp_path / "datafs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs of the board's partition size needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={board.partition},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o size={board.partition} refused: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=60, check=True)


@pytest.fixture
def board_nats(board_store: Path, tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server as the board's nats.conf has it: JetStream on the partition, capped."""
    config = NatsServerConfig(
        store_dir=board_store / "nats" / "jetstream",
        port=free_port(),
        max_file_store=board_sizing().max_file_store,
    )
    server = NatsServer(config, tmp_path / "nats.conf", tmp_path / "nats.log")
    server.start(timeout=15.0 * SLOWDOWN)
    try:
        yield server
    finally:
        server.stop()


async def test_each_writer_gets_its_board_stream_and_the_old_defaults_are_refused(
    board_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    board: BoardSizing = board_sizing()
    assert f"max_file_store: {board.max_file_store}" in board_nats.conf_path.read_text()
    nc = await nats.connect(board_nats.url, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10 * SLOWDOWN)
        # The defaults, as each service asked for them before its config could say
        # otherwise: refused, and no stream half made.
        for writer in board.limits:
            with pytest.raises(ResourceExhausted) as refused:
                await AuditWriter(js, writer).ensure_stream()
            assert refused.value.reason == "audit.no_room", (writer, refused.value)
            assert refused.value.details["max_bytes"] == str(default_max_bytes(writer))
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.stream_info(writer_stream(writer))
        # The board's limits: every writer's stream is made, with exactly those limits.
        for writer, limit in board.limits.items():
            assert limit is not None, writer
            await AuditWriter(js, writer, limit=limit).ensure_stream()
            info = await js.stream_info(writer_stream(writer))
            assert (info.config.max_bytes, info.config.max_msgs) == (
                limit.max_bytes,
                limit.max_msgs,
            )
        # A restart finds the streams and keeps them as they are, even where the config
        # now names other limits: a service may not shrink (cut) its own stream.
        for writer, limit in board.limits.items():
            assert limit is not None, writer
            smaller = StreamLimit(MIN_STREAM_BYTES, 10)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="edgekms.audit"):
                await AuditWriter(js, writer, limit=smaller).ensure_stream()
            assert [r.getMessage() for r in caplog.records] == ["audit stream keeps its limits"]
            info = await js.stream_info(writer_stream(writer))
            assert (info.config.max_bytes, info.config.max_msgs) == (
                limit.max_bytes,
                limit.max_msgs,
            )
        streams = [str(info.config.name) for info in await js.streams_info()]
        assert sorted(streams) == sorted(writer_stream(w) for w in board.limits)
    finally:
        await nc.close()
