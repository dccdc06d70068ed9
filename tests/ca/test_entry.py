"""`kmsctl ca serve` execs the lean CA process (`python -m ca_service`): same pid, same
options, same errors and exit codes, and a service that answers on the real bus."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from ca_service import __main__ as entry
from edgekms.v1 import ca_pb2
from mgmt.cli.common import ExitCode
from mgmt.natsserver import NatsServer, free_port

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


def test_exit_codes_are_the_cli_ones() -> None:
    assert entry.EXIT_USAGE == ExitCode.USAGE
    assert entry.EXIT_UNAVAILABLE == ExitCode.UNAVAILABLE


def test_parse_args() -> None:
    assert entry.parse_args(["--config", "/x/ca.toml"]) == ("/x/ca.toml", "info")
    assert entry.parse_args(["--log-level", "debug", "--config", "c"]) == ("c", "debug")
    for bad in ([], ["--log-level", "info"], ["--config"], ["--config", "c", "--bus", "x"]):
        with pytest.raises(ValueError):
            entry.parse_args(bad)


def test_bad_arguments_exit_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["--nope", "x"]) == ExitCode.USAGE
    assert "unexpected argument '--nope'" in capsys.readouterr().err


def test_missing_config_fails_through_kmsctl_as_before(tmp_path: Path) -> None:
    done = subprocess.run(
        [KMSCTL, "ca", "serve", "--config", str(tmp_path / "absent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert f"{tmp_path / 'absent.toml'}: cannot read" in done.stderr


async def _list_profiles(url: str) -> bytes:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        request = ca_pb2.ListProfilesRequest().SerializeToString()
        return bytes((await nc.request("kms.ca.ListProfiles", request, timeout=1)).data)
    finally:
        await nc.close()


async def _drop_bucket(url: str, bucket: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_key_value(bucket)
    finally:
        await nc.close()


def test_kmsctl_ca_serve_runs_the_lean_process_under_its_own_pid(
    tmp_path: Path, ca_nats: NatsServer, ca_crypto: object
) -> None:
    config = tmp_path / "ca.toml"
    port = free_port()
    config.write_text(f'nats_url = "{ca_nats.url}"\nhttp_listen = "127.0.0.1:{port}"\n')
    log = tmp_path / "ca.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [KMSCTL, "ca", "serve", "--config", str(config), "--log-level", "warning"],
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = asyncio.run(_list_profiles(ca_nats.url))
                break
            except Exception:
                assert time.monotonic() < deadline, "CA did not start"
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.1)
        assert b"https-server" in answer
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[1:5] == ["-m", "ca_service", "--config", str(config)], argv
        assert argv[5:7] == ["--log-level", "warning"], argv
        # The standard event loop: uvloop's extension module is not even mapped in.
        assert "uvloop" not in Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asyncio.run(_drop_bucket(ca_nats.url, "kms_ca"))
