"""Logs people read (issue 14, item 4), on a real `kmsctl up`: the console in text, the
services' logs as JSON lines with one field set and no asyncio noise, rotated by size
with the copies kept, and a log directory that fills up truncated, not fatal."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.logevents import count_event

LOGFMT_PAIR = re.compile(r"(?:^|\s)[a-z_][a-z0-9_.]*=\S")


def _until(condition: Callable[[], bool], what: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds}s: {what}")


def _requests(stack: KmsStack, count: int) -> bool:
    """`count` GetKey calls (one broker log line each); False, to chain with `or`."""
    with stack.client() as client:
        for _ in range(count):
            client.get_key("logs/p256")
    return False


def test_console_text_json_files_and_rotation(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = start_stack(data_dir, "--log-max-bytes", "65536", "--log-backups", "2")
    logs = data_dir / "logs"
    try:
        with stack.client() as client:
            client.create_key("logs/p256", "ec-p256")
        broker_log = logs / "broker.log"
        # One info line per request in the broker's log (~250 bytes): past 64 KiB, and
        # again after the supervisor's check has rotated it once.
        _until(
            lambda: _requests(stack, 150) or (logs / "broker.log.2").exists(),
            "two rotations of broker.log",
        )
        _requests(stack, 10)
        assert broker_log.stat().st_size < 65536 + 32768
        with stack.client() as client:
            assert client.get_key("logs/p256").name == "logs/p256"
        assert not (logs / "broker.log.3").exists()
    finally:
        assert stop_stack(stack) == 0

    console = stack.log_path.read_text()
    assert "kmsctl-up: started  part=nats" in console
    assert not any(line.startswith("{") for line in console.splitlines())
    assert "log rotated  log=broker.log" in console
    assert "eof_received" not in console
    for path in logs.iterdir():
        if path.name.startswith(("nats", "swtpm")):
            continue  # nats-server's own format
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            assert "eof_received" not in entry["msg"], path
            assert not entry["msg"].startswith("event="), (path, entry)
            # No `key=value` left inside the message: those are fields.
            assert not LOGFMT_PAIR.search(entry["msg"]), (path, entry)
    rotated = [json.loads(x) for x in (logs / "broker.log.1").read_text().splitlines() if x]
    assert any(e["msg"] == "request" and e["method"] == "GetKey" for e in rotated)


def test_a_full_log_directory_is_truncated_not_fatal(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    logs = data_dir / "logs"
    logs.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(logs)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stack = start_stack(data_dir, "--log-max-bytes", "163840", "--log-backups", "2")
        try:
            with stack.client() as client:
                client.create_key("logs/p256", "ec-p256")
            # The broker's log grows until no copy of it fits beside it.
            _until(
                lambda: _requests(stack, 200) or "log directory full" in stack.log_path.read_text(),
                "the supervisor to find the log directory full",
                180.0,
            )
            with stack.client() as client:
                signature = client.sign("logs/p256", b"still working")
                assert client.verify("logs/p256", b"still working", signature)
            assert (logs / "broker.log").stat().st_size < 163840
        finally:
            assert stop_stack(stack) == 0
    finally:
        subprocess.run(["umount", str(logs)], check=True)


def test_console_json_for_a_collector(tmp_path: Path) -> None:
    """`--log-format json`: the supervisor's own log lines on the console are the same
    JSON objects the services write (one field set), for a collector; only the two
    sentences for people ("EdgeKMS is up", "EdgeKMS stopped.") are plain text."""
    stack = start_stack(tmp_path / "data", "--log-format", "json")
    assert stop_stack(stack) == 0
    lines = [line for line in stack.log_path.read_text().splitlines() if line.strip()]
    logged = [line for line in lines if not line.startswith("EdgeKMS ")]
    assert logged and all(line.startswith("{") for line in logged), logged[:5]
    entries = [json.loads(line) for line in logged]
    assert all(e["service"] == "kmsctl-up" and e["level"] and e["ts"] for e in entries)
    assert count_event("\n".join(logged), "started", part="nats") == 1
    assert not any(e["msg"].startswith("event=") or "eof_received" in e["msg"] for e in entries)
    assert [line.split(":")[0] for line in lines if line.startswith("EdgeKMS ")] == [
        "EdgeKMS is up",
        "EdgeKMS stopped.",
    ]
