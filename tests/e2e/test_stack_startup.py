"""`kmsctl up`'s start-up: the level it is given reaches every service, the broker and the
crypto services run on uvloop (the CA service on the standard loop, ca_service/__main__.py
says why), and "ready" still means a signed request goes through at once, on a cold
data dir and on a warm one (where the broker starts beside the crypto services)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mgmt.cli import cli
from tests.e2e.conftest import KmsStack, start_stack, stop_stack


def _children(stack: KmsStack) -> dict[str, int]:
    children = stack.state()["children"]
    assert isinstance(children, dict)
    return {str(name): int(pid) for name, pid in children.items()}


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _levels(log: Path) -> set[str]:
    levels = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            levels.add(json.loads(line)["level"])
    return levels


def test_log_level_reaches_every_child_and_ready_means_sign_works(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = start_stack(data_dir, "--log-level", "warning")
    try:
        children = _children(stack)
        assert set(children) == {"crypto-hsm0", "ca", "broker"}
        for name, pid in children.items():
            argv = _argv(pid)
            at = argv.index("--log-level")
            assert argv[at + 1] == "warning", (name, argv)
            # edgekms.aio.run picked uvloop: its extension module is mapped in. The CA
            # keeps the standard loop, for memory.
            on_uvloop = "uvloop" in Path(f"/proc/{pid}/maps").read_text()
            assert on_uvloop == (name != "ca"), name
            # Idle per-thread malloc arenas held memory: two arenas for every service.
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"MALLOC_ARENA_MAX=2" in environ, name
        with stack.client() as client:
            client.create_key("startup/p256", "ec-p256")
            signature = client.sign("startup/p256", b"cold")
            assert client.verify("startup/p256", b"cold", signature)
    finally:
        assert stop_stack(stack) == 0
    # At info the broker writes a line per request; at warning, none.
    for log in ("broker.log", "crypto-hsm0.log", "ca.log"):
        assert "info" not in _levels(data_dir / "logs" / log), log

    # Warm: the ceremony has run, so the broker starts beside hsm0; ready must still
    # wait for hsm0, so the first request after ready signs.
    stack = start_stack(data_dir, "--log-level", "warning")
    try:
        with stack.client() as client:
            signature = client.sign("startup/p256", b"warm")
            assert client.verify("startup/p256", b"warm", signature)
        assert all("warning" in _argv(pid) for pid in _children(stack).values())
    finally:
        assert stop_stack(stack) == 0


def test_unknown_log_level_is_refused_before_anything_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(cli, ["up", "--data-dir", str(data_dir), "--log-level", "verbose"])
    assert result.exit_code == 2
    assert "verbose" in result.output
    assert not data_dir.exists()


def test_start_timeout_below_a_second_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """--start-timeout bounds each service's readiness wait (raised for slow boards and
    qemu-user); zero or less would make every start fail, so click refuses it."""
    data_dir = tmp_path / "data"
    for bad in ("0", "-5", "soon"):
        result = CliRunner().invoke(
            cli, ["up", "--data-dir", str(data_dir), "--start-timeout", bad]
        )
        assert result.exit_code == 2, result.output
        assert "--start-timeout" in result.output
    assert not data_dir.exists()
