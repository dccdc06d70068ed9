"""The real stack for the agent's tests: `kmsctl up` (nats-server, SoftHSM, kms-crypto,
the CA service, the broker) with a CA whose CRLs live one minute, a mini-CA, and an
operator client the agent runs as. Plus a way to run the agent itself, as a user does
(`kmsctl agent --config ...` in a subprocess), and read its JSON log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack

CRL_LIFETIME = "1m"


@dataclass
class AgentStack:
    stack: KmsStack
    operator_dir: Path

    @property
    def operator_config(self) -> Path:
        return self.operator_dir / "config.toml"


@pytest.fixture(scope="module")
def agent_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentStack]:
    root = tmp_path_factory.mktemp("agentstack")
    stack = start_stack(root / "data", "--ca-crl-lifetime", CRL_LIFETIME)
    try:
        with stack.client(timeout=60) as kms:
            kms.ca_init("Agent Test CA")
        operator_dir = root / "device"
        operator_dir.mkdir()
        subprocess.run(
            [str(BIN / "kmsctl"), "client", "add", "device-agent", "--role", "operator",
             "--out-dir", str(operator_dir)],
            env=stack.env(), check=True, capture_output=True, timeout=60 * SLOWDOWN,
        )  # fmt: skip
        yield AgentStack(stack, operator_dir)
    finally:
        code = stop_stack(stack)
        assert code == 0, stack.log_path.read_text()[-2000:]


class AgentProcess:
    """`kmsctl agent --config PATH` running in the background, its log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "kmsctl"), "agent", "--config", str(config), "--log-level", "debug"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                found.append(entry)
        return found

    def wait_for(self, what: str, condition: Callable[[], Any], within: float = 240.0) -> Any:
        """Poll `condition` until it returns something true; fail naming `what`, with
        the tail of the agent's log, at the deadline or if the agent died."""
        deadline = time.monotonic() + within * SLOWDOWN
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{what}: not seen (agent rc={self.proc.poll()}):\n{tail}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30 * SLOWDOWN)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@pytest.fixture
def run_agent() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(config: Path, log: Path, env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(config, log, env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


class Forwarder:
    """A TCP relay on a loopback port to the broker, which the test opens and closes:
    the KMS seen from the device goes away and comes back at the network level, the way
    a device's uplink does, while the stack itself keeps running."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        thread = threading.Thread(target=self._accept, args=(self._server,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
