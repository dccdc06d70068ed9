"""One data dir everywhere (issue 14, item 2): kmsctl given no data dir finds the stack
that runs, errors for a missing config, a wrong data dir and a broker that does not
answer say what to do next, and `kmsctl init` on an initialised data dir neither issues
credentials again nor moves the broker address unless told to."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from mgmt.natsserver import free_port
from mgmt.pki import write_client_config
from tests.e2e.conftest import BIN, KmsStack, state_home


def _env(home: Path, **extra: str) -> dict[str, str]:
    """An environment that names no data dir: kmsctl's default is under `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("EDGEKMS_DATA_DIR", "EDGEKMS_CONFIG", "XDG_DATA_HOME", "XDG_STATE_HOME")
    }
    return {**env, "HOME": str(home), **extra}


def _kmsctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _initialised_copy(stack: KmsStack, target: Path) -> Path:
    """The ceremony's files of `stack` in a data dir of their own (no bus needed)."""
    for part in ("pki", "client"):
        shutil.copytree(stack.data_dir / part, target / part)
    return target


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_kmsctl_finds_the_running_stack_without_a_data_dir(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    env = _env(tmp_path / "home", XDG_STATE_HOME=str(state_home(kms_stack.data_dir)))
    found = _kmsctl("status", "-o", "json", env=env)
    assert found.returncode == 0, found.stderr
    assert f"using the stack running on {kms_stack.data_dir}" in found.stderr
    assert f"pid {kms_stack.process.pid}" in found.stderr

    # A data dir given explicitly is never replaced by a guess.
    wrong = tmp_path / "no-such-dir"
    refused = _kmsctl("status", "--data-dir", str(wrong), env=env)
    assert refused.returncode == 6, refused.stderr
    assert refused.stderr.startswith("kmsctl: config.missing: ")
    assert f"{wrong} does not exist" in refused.stderr
    assert "EDGEKMS_DATA_DIR" in refused.stderr
    assert not wrong.exists()

    # No stack running for this user: say how to start one or where to point.
    nothing = _kmsctl("key", "list", env=_env(tmp_path / "home"))
    assert nothing.returncode == 6
    assert "kmsctl up --data-dir" in nothing.stderr
    assert "using the stack" not in nothing.stderr


def test_a_broker_that_does_not_answer_says_the_stack_is_not_running(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    data_dir = _initialised_copy(kms_stack, tmp_path / "data")
    config = data_dir / "client" / "config.toml"
    values = tomllib.loads(config.read_text())
    values["broker"] = f"127.0.0.1:{free_port()}"
    write_client_config(config, **{k: str(v) for k, v in values.items()})
    result = _kmsctl("key", "list", "--data-dir", str(data_dir), env=_env(tmp_path))
    assert result.returncode == 8, result.stderr
    assert result.stderr.startswith("kmsctl: transport.unavailable: ")
    assert f"no `kmsctl up` is running on {data_dir}" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_on_an_initialised_data_dir_changes_nothing_unless_asked(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    data_dir = _initialised_copy(kms_stack, tmp_path / "data")
    before = _files(data_dir)
    again = _kmsctl("init", "--data-dir", str(data_dir), "-o", "json", env=_env(tmp_path))
    assert again.returncode == 0, again.stderr
    assert '"created": false' in again.stdout
    assert _files(data_dir) == before

    moved = _kmsctl(
        "init", "--data-dir", str(data_dir), "--broker-address", "10.0.0.5:9443", env=_env(tmp_path)
    )
    assert moved.returncode == 0, moved.stderr
    config = tomllib.loads((data_dir / "client" / "config.toml").read_text())
    assert config["broker"] == "10.0.0.5:9443"

    # The client config lost, the CA still there: no new admin without --new-admin, and
    # the refusal comes before any bus is dialled (none runs on the default port here).
    shutil.rmtree(data_dir / "client")
    pki_before = _files(data_dir / "pki")
    refused = _kmsctl(
        "init",
        "--data-dir",
        str(data_dir),
        "--nats-url",
        f"nats://127.0.0.1:{free_port()}",
        env=_env(tmp_path),
    )
    assert refused.returncode == 5, refused.stderr
    assert refused.stderr.startswith("kmsctl: init.already_initialised: ")
    assert "--new-admin" in refused.stderr
    assert not (data_dir / "client").exists()
    assert _files(data_dir / "pki") == pki_before


def test_init_without_a_bus_says_what_to_do(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = _kmsctl(
        "init",
        "--data-dir",
        str(data_dir),
        "--nats-url",
        f"nats://127.0.0.1:{free_port()}",
        env=_env(tmp_path),
    )
    assert result.returncode == 8
    assert result.stderr.startswith("kmsctl: bus.unavailable: ")
    assert f"kmsctl up --data-dir {data_dir}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (data_dir / "client").exists()


@pytest.mark.parametrize("case", ["certificate", "password"])
def test_init_against_another_stacks_bus_says_so_at_once(
    kms_stack: KmsStack, tmp_path: Path, case: str
) -> None:
    """The issue's lost user: `kmsctl init` on an empty data dir dials a bus that is not
    its own (another stack's, on the default port 4222 in the issue). The server answers
    and refuses it, its certificate (`certificate`: our bus CA does not know the server)
    or its password (`password`: the right CA and user, the wrong password); that is
    said as `bus.refused` at the refusal, with what to do, instead of "cannot connect"
    after ten seconds, and nothing is written."""
    data_dir = tmp_path / "lost"
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    bus_ca = kms_stack.data_dir / "nats" / "tls" / "bus-ca.crt"
    assert bus_ca.exists()
    args = {
        "certificate": ["--nats-url", kms_stack.nats_url],
        "password": [
            "--nats-url", kms_stack.nats_url.replace("nats://", "tls://"),
            "--nats-user", "kmsctl", "--nats-password-file", str(wrong), "--nats-ca", str(bus_ca),
        ],
    }[case]  # fmt: skip
    result = _kmsctl("init", "--data-dir", str(data_dir), *args, env=_env(tmp_path))
    assert result.returncode == 8, result.stderr
    assert result.stderr.startswith("kmsctl: bus.refused: "), result.stderr
    reason = "CERTIFICATE_VERIFY_FAILED" if case == "certificate" else "Authorization Violation"
    assert reason in result.stderr
    assert f"It is not the bus of {data_dir}" in result.stderr
    assert "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr and "eof_received" not in result.stderr
    assert not (data_dir / "client").exists() and not (data_dir / "pki").exists()
