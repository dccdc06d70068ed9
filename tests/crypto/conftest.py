"""Real `kms-crypto` processes for the service tests: config in a temp dir, the session's
nats-server and SoftHSM token, stderr kept in a file so a test can read what it said."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import nats.aio.client
import pytest

from edgekms.crypto_client import CryptoClient
from mgmt.natsserver import NatsServer
from tests.conftest import TokenInfo
from tests.logevents import has_event

KMS_CRYPTO = str(Path(sys.executable).parent / "kms-crypto")


def write_config(
    directory: Path,
    provider_id: str,
    nats_url: str,
    token: TokenInfo,
    pin_file: Path | None = None,
    token_label: str | None = None,
    sessions: int = 4,
    pin_env: str | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{provider_id}.toml"
    pin_line = f'pin_env = "{pin_env}"' if pin_env else f'pin_file = "{pin_file or token.pin_file}"'
    path.write_text(
        f'provider_id = "{provider_id}"\n'
        f'nats_url = "{nats_url}"\n'
        "[pkcs11]\n"
        f'module = "{token.module}"\n'
        f'token_label = "{token_label or token.label}"\n'
        f"{pin_line}\n"
        f"sessions = {sessions}\n"
    )
    return path


class CryptoProcess:
    """One kms-crypto subprocess; `start()` returns once it has registered on NATS."""

    def __init__(
        self, config: Path, token: TokenInfo, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.extra_env = dict(env or {})
        self.config = config
        self.token = token
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> CryptoProcess:
        env = {**os.environ, **self.extra_env, "SOFTHSM2_CONF": str(self.token.conf)}
        offset = len(self.stderr())  # a restart appends: look only at what this run says
        with open(self.log, "ab") as err:
            self.process = subprocess.Popen(
                [KMS_CRYPTO, "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        if wait:
            deadline = time.monotonic() + timeout
            while not has_event(self.stderr()[offset:], "service_started"):
                if self.process.poll() is not None:
                    raise RuntimeError(f"kms-crypto exited early: {self.stderr()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kms-crypto did not start: {self.stderr()[-2000:]}")
                time.sleep(0.05)
        return self

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


CryptoFactory = Callable[..., CryptoProcess]


@pytest.fixture
def crypto_factory(
    tmp_path: Path, nats_server: NatsServer, softhsm_token: TokenInfo
) -> Iterator[CryptoFactory]:
    """Start extra kms-crypto processes for one test; all are stopped afterwards."""
    started: list[CryptoProcess] = []

    def make(
        provider_id: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        **config_kw: object,
    ) -> CryptoProcess:
        n = len(started)
        nats_url = str(config_kw.pop("nats_url", nats_server.url))
        config = write_config(
            tmp_path / f"p{n}",
            provider_id,
            nats_url,
            softhsm_token,
            **config_kw,  # type: ignore[arg-type]
        )
        proc = CryptoProcess(config, softhsm_token, tmp_path / f"p{n}.stderr", env)
        started.append(proc)
        return proc.start(wait=wait)

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def hsm0(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer, softhsm_token: TokenInfo
) -> Iterator[CryptoProcess]:
    """The module's long-lived crypto service, provider "hsm0"."""
    directory = tmp_path_factory.mktemp("hsm0")
    config = write_config(directory, "hsm0", nats_server.url, softhsm_token)
    proc = CryptoProcess(config, softhsm_token, directory / "stderr").start()
    yield proc
    assert proc.stop() == 0, proc.stderr()[-2000:]


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[nats.aio.client.Client]:
    conn = await nats.connect(nats_server.url, allow_reconnect=False)
    yield conn
    await conn.close()


@pytest.fixture
def client(nc: nats.aio.client.Client) -> CryptoClient:
    return CryptoClient(nc, default_timeout=10.0)
