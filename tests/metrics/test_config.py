"""Bad metrics settings, refused before anything serves: in each service's TOML, in
`kmsctl up --metrics-listen`, and a metrics port another program holds (the service
exits with a config error; `kmsctl up` refuses before it starts anything)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError as BrokerConfigError
from broker.config import load_config as load_broker
from ca_service.config import CAConfigError, load_serve_config
from crypto_service.config import ConfigError as CryptoConfigError
from crypto_service.config import load_config as load_crypto
from mgmt.natsserver import NatsServer, free_port, free_port_pair
from tests.conftest import SLOWDOWN, TokenInfo

BIN = Path(sys.executable).parent
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LOADERS: dict[str, tuple[Callable[[Path], Any], type[Exception]]] = {
    "broker.toml": (load_broker, BrokerConfigError),
    "ca.toml": (load_serve_config, CAConfigError),
    "crypto-hsm0.toml": (load_crypto, CryptoConfigError),
}


def _with_metrics(tmp_path: Path, name: str, line: str) -> Path:
    """The board's config of `name` with a metrics_listen line first (a top-level key)."""
    path = tmp_path / name
    path.write_text(f"{line}\n" + (DEPLOY / name).read_text())
    return path


BAD_LISTEN = {
    "a_name": '"nas.lan:9464"',
    "no_port": '"127.0.0.1"',
    "port_too_high": '"127.0.0.1:99999"',
    "a_number": "9464",
}


@pytest.mark.parametrize("name", list(LOADERS))
@pytest.mark.parametrize("case", list(BAD_LISTEN))
def test_every_service_config_refuses_a_bad_metrics_listen(
    tmp_path: Path, name: str, case: str
) -> None:
    value = BAD_LISTEN[case]
    load, error = LOADERS[name]
    with pytest.raises(error) as refused:
        load(_with_metrics(tmp_path, name, f"metrics_listen = {value}"))
    assert "metrics_listen" in str(refused.value) and name in str(refused.value)


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_good_metrics_listen_is_kept_and_none_means_no_endpoint(
    tmp_path: Path, name: str
) -> None:
    load, _ = LOADERS[name]
    assert load(_with_metrics(tmp_path, name, 'metrics_listen = "[::1]:9470"')).metrics_listen == (
        "[::1]:9470"
    )
    assert load(DEPLOY / name).metrics_listen is None


@pytest.fixture
def held_port() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield int(holder.getsockname()[1])
    holder.close()


def test_a_crypto_service_whose_metrics_port_is_taken_exits_with_a_config_error(
    tmp_path: Path, nats_server: NatsServer, softhsm_token: TokenInfo, held_port: int
) -> None:
    conf = tmp_path / "crypto-hsm0.toml"
    conf.write_text(
        'provider_id = "hsm0"\n'
        f'nats_url = "{nats_server.url}"\n'
        f'metrics_listen = "127.0.0.1:{held_port}"\n'
        "[pkcs11]\n"
        f'module = "{softhsm_token.module}"\n'
        f'token_label = "{softhsm_token.label}"\n'
        f'pin_file = "{softhsm_token.pin_file}"\n'
    )
    done = subprocess.run(
        [str(BIN / "kms-crypto"), "--config", str(conf)],
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf)},
        capture_output=True,
        text=True,
        timeout=60 * SLOWDOWN,
    )
    assert done.returncode == 2, done.stderr
    assert f"metrics port 127.0.0.1:{held_port} is taken" in done.stderr


def _up(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "kmsctl"),
            "up",
            "--data-dir",
            str(data_dir),
            "--nats-port",
            str(free_port()),
            "--broker-listen",
            f"127.0.0.1:{free_port_pair()}",
            "--ca-http",
            f"127.0.0.1:{free_port()}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60 * SLOWDOWN,
        env={**os.environ, "XDG_STATE_HOME": str(data_dir.parent / "state")},
    )


def _left(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))


@pytest.mark.parametrize(
    "value",
    ["9464", "nas.lan:9464", "127.0.0.1:65534", "127.0.0.1:x"],
    ids=["no_host", "a_name", "no_room_after_it", "port_not_a_number"],
)
def test_kmsctl_up_refuses_a_bad_metrics_listen_before_starting(tmp_path: Path, value: str) -> None:
    data_dir = tmp_path / "data"
    done = _up(data_dir, "--metrics-listen", value)
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("kmsctl: stack.listen_invalid: --metrics-listen"), done.stderr
    assert _left(data_dir) == ["run", "run/up.lock"]


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_kmsctl_up_names_a_metrics_port_another_program_holds(tmp_path: Path) -> None:
    """The CA's port is the one after the broker's: hold that one (with the broker's free)."""
    holders: list[socket.socket] = []
    try:
        while True:  # a held port whose lower neighbour is free, found in a few tries
            holder = socket.socket()
            holders.append(holder)
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            held_port = int(holder.getsockname()[1])
            if _free(held_port - 1):
                break
            assert len(holders) < 50, "no free port below a held one"
        _check_up_names_the_held_port(tmp_path, held_port)
    finally:
        for holder in holders:
            holder.close()


def _check_up_names_the_held_port(tmp_path: Path, held_port: int) -> None:
    data_dir = tmp_path / "data"
    done = _up(data_dir, "--metrics-listen", f"127.0.0.1:{held_port - 1}")
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("kmsctl: stack.port_in_use: "), done.stderr
    assert f"127.0.0.1:{held_port} (--metrics-listen (ca))" in done.stderr
    assert _left(data_dir) == ["run", "run/up.lock"]
