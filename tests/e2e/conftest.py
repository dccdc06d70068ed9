"""The whole system for end-to-end tests.

`kms_stack` starts it exactly as a user does, `kmsctl up` in a subprocess on a fresh
data dir with free loopback ports, and waits for <data-dir>/run/state.json to say
ready. `parts` builds the same system piece by piece (nats-server, token, kms-crypto,
ceremony, kms-broker) so fault tests can stop and restart one piece under the others;
`kmsctl up` would restart a dead child by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from mgmt.client import KMSClient
from mgmt.natsauth import local_credentials
from mgmt.natsserver import NatsServer, free_port, free_port_pair, wait_for_port
from mgmt.pki import run_ceremony
from mgmt.sealkeys import local_seal
from tests.conftest import SLOWDOWN, TokenInfo, make_token, start_nats

BIN = Path(sys.executable).parent


@dataclass
class KmsStack:
    data_dir: Path
    nats_url: str
    broker: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ca_url: str = ""

    @property
    def client_config(self) -> Path:
        return self.data_dir / "client" / "config.toml"

    def client(self, timeout: float = 10.0) -> KMSClient:
        return KMSClient.from_config(self.client_config, timeout=timeout * SLOWDOWN)

    def state(self) -> dict[str, object]:
        return dict(json.loads((self.data_dir / "run" / "state.json").read_text()))

    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGEKMS_DATA_DIR": str(self.data_dir)}

    def open_record(self, bucket: str, key: str, value: bytes) -> bytes:
        """A stored record's payload, verified with the writers' keys of this stack."""
        seal = local_seal(self.data_dir / "secrets", None)
        assert seal is not None, "kmsctl up made no sealing keys"
        return seal.open(bucket, key, value)

    def nats_options(self, user: str = "kmsctl") -> dict[str, Any]:
        """nats.connect options for the stack's authenticated bus, as `kmsctl up` itself
        (or as another part's identity, `user`)."""
        return local_credentials(self.data_dir, user).connect_options()


def state_home(data_dir: Path) -> Path:
    """The XDG_STATE_HOME a test stack on `data_dir` runs with."""
    return data_dir.parent / f"{data_dir.name}-state"


def start_stack(data_dir: Path, *extra: str, timeout: float = 90.0) -> KmsStack:
    timeout *= SLOWDOWN
    # The broker's port + 1 is its enrollment listener's default: both must be free.
    nats_port, broker_port, ca_port = free_port(), free_port_pair(), free_port()
    log_path = data_dir.parent / f"{data_dir.name}-up.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "kmsctl"),
                "up",
                "--data-dir",
                str(data_dir),
                "--nats-port",
                str(nats_port),
                "--broker-listen",
                f"127.0.0.1:{broker_port}",
                "--ca-http",
                f"127.0.0.1:{ca_port}",
                # Each service's own readiness deadline, scaled as the tests' are.
                "--start-timeout",
                str(30.0 * SLOWDOWN),
                *extra,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its pointer for kmsctl's discovery (mgmt.stackstate) beside the data dir,
            # not in the home of whoever runs the tests.
            env={**os.environ, "XDG_STATE_HOME": str(state_home(data_dir))},
        )
    state_file = data_dir / "run" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"kmsctl up exited {process.returncode}: {log_path.read_text()[-3000:]}"
            )
        if state_file.exists() and json.loads(state_file.read_text() or "{}").get("ready"):
            return KmsStack(
                data_dir,
                f"nats://127.0.0.1:{nats_port}",
                f"127.0.0.1:{broker_port}",
                process,
                log_path,
                ca_url=f"http://127.0.0.1:{ca_port}",
            )
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"kmsctl up not ready in {timeout}s: {log_path.read_text()[-3000:]}")


def stop_stack(stack: KmsStack) -> int:
    stack.process.send_signal(signal.SIGINT)
    try:
        return stack.process.wait(30 * SLOWDOWN)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        stack.process.wait()
        raise


@pytest.fixture(scope="session")
def kms_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    stack = start_stack(tmp_path_factory.mktemp("stack") / "data")
    yield stack
    code = stop_stack(stack)
    assert code == 0, (
        f"kmsctl up did not stop cleanly ({code}): {stack.log_path.read_text()[-2000:]}"
    )


# --- piecewise --------------------------------------------------------------------


@dataclass
class Parts:
    root: Path
    nats: NatsServer
    token: TokenInfo
    provider: str = "hsm0"
    broker_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Top-level broker.toml lines a subclass adds (connection timeouts, ...).
    broker_extra: ClassVar[str] = ""
    # Added to the brokers' environment (e.g. GRPC_VERBOSITY for a test reading its log).
    broker_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A hook for subclasses (e.g. to fill broker_env); the dataclass calls it."""

    @property
    def client_config(self) -> Path:
        return self.root / "client" / "config.toml"

    def client(self, timeout: float = 10.0) -> KMSClient:
        return KMSClient.from_config(self.client_config, timeout=timeout * SLOWDOWN)

    def crypto_config(self) -> Path:
        path = self.root / "crypto.toml"
        path.write_text(
            f'provider_id = "{self.provider}"\nnats_url = "{self.nats.url}"\n[pkcs11]\n'
            f'module = "{self.token.module}"\ntoken_label = "{self.token.label}"\n'
            f'pin_file = "{self.token.pin_file}"\nsessions = 2\n'
        )
        return path

    def start_crypto(self) -> None:
        env = {**os.environ, "SOFTHSM2_CONF": str(self.token.conf)}
        self._spawn("crypto", [str(BIN / "kms-crypto"), "--config", str(self.crypto_config())], env)
        asyncio.run(self._wait_crypto())

    async def _wait_crypto(self) -> None:
        import nats

        from edgekms.crypto_client import CryptoClient
        from edgekms.errors import KMSError

        nc = await nats.connect(self.nats.url)
        try:
            deadline = time.monotonic() + 30 * SLOWDOWN
            while True:
                try:
                    await CryptoClient(nc).ping(self.provider, timeout=0.5)
                    return
                except KMSError:
                    if time.monotonic() > deadline or self.processes["crypto"].poll() is not None:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def ceremony(self) -> None:
        asyncio.run(
            run_ceremony(
                self.nats.url,
                self.provider,
                self.root / "pki",
                self.root / "client",
                broker_address=f"127.0.0.1:{self.broker_port}",
                broker_names=["localhost", "127.0.0.1"],
            )
        )

    def start_broker(self, name: str = "broker", port: int | None = None) -> None:
        """Start a broker on the parts' bus and registry; `name` and `port` start another
        one beside it (another process, same NATS, same buckets, same certificates)."""
        port = self.broker_port if port is None else port
        pki = self.root / "pki"
        conf = self.root / f"{name}.toml"
        conf.write_text(
            f'listen = "127.0.0.1:{port}"\nnats_url = "{self.nats.url}"\n'
            f'default_provider = "{self.provider}"\nproviders = ["{self.provider}"]\n'
            f"sign_timeout = 2.0\n{self.broker_extra}[tls]\n"
            f'cert = "{pki / "broker.crt"}"\nkey = "{pki / "broker.key"}"\n'
            f'client_ca = "{pki / "internal-ca.crt"}"\n'
        )
        env = {**os.environ, **self.broker_env}
        self._spawn(name, [str(BIN / "kms-broker"), "--config", str(conf)], env)
        wait_for_port("127.0.0.1", port, 30 * SLOWDOWN, self.processes[name])

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait(15 * SLOWDOWN)

    def stop_all(self) -> None:
        for name in list(self.processes)[::-1]:
            self.stop(name)


P = TypeVar("P", bound=Parts)


@contextlib.contextmanager
def running_parts(root: Path, kind: type[P]) -> Iterator[P]:
    """A broker + crypto service on their own nats-server and token under `root`,
    initialised by the ceremony; everything stopped afterwards."""
    nats_server = start_nats(root / "nats")
    built = kind(root, nats_server, make_token(root / "softhsm"))
    try:
        built.start_crypto()
        built.ceremony()
        built.start_broker()
        yield built
    finally:
        built.stop_all()
        nats_server.stop()


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    """A broker + crypto service of its own, on its own nats-server and token."""
    with running_parts(tmp_path, Parts) as built:
        yield built
