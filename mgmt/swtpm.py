"""A software TPM 2.0 (swtpm) for development, tests and `kmsctl up --tpm swtpm`.

swtpm plays the part of the board's /dev/tpmrm0: a TPM command port and a control port
(port + 1) on the loopback interface, with its NV state in a directory of its own. It is
started already powered on and past TPM2_Startup(CLEAR), so a TCTI can talk to it at once.
The TPM provider reaches it with the TCTI string `tcti` gives.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mgmt import subprocs
from mgmt.natsserver import NatsServerError, free_port, wait_for_port

log = logging.getLogger(__name__)


class SwtpmError(RuntimeError):
    """swtpm is missing, exited, or did not open its ports in time."""


def find_binary() -> str:
    found = shutil.which("swtpm")
    if found is None:
        raise SwtpmError("swtpm not found: install the swtpm package")
    return found


def free_port_pair(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port N with N and N + 1 both free: swtpm's control port is the next one up."""
    import socket

    for _ in range(attempts):
        port = free_port(host)
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise SwtpmError(f"no pair of free ports found on {host}")


@dataclass(frozen=True)
class SwtpmConfig:
    state_dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def argv(self) -> list[str]:
        return [
            find_binary(),
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={self.port},bindaddr={self.host}",
            "--ctrl",
            f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--flags",
            "not-need-init,startup-clear",
        ]


class Swtpm:
    """A running swtpm; `stop()` ends it. A context manager for tests.

    The state directory survives `stop()`, so a restart brings back the same seeds,
    hierarchies and persistent objects, like a reboot of a board.
    """

    def __init__(self, config: SwtpmConfig, log_path: Path | None = None):
        self.config = config
        self.log_path = log_path or config.state_dir / "swtpm.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def on_free_port(cls, state_dir: Path) -> Swtpm:
        return cls(SwtpmConfig(state_dir=state_dir, port=free_port_pair()))

    @property
    def tcti(self) -> str:
        return self.config.tcti

    def start(self, timeout: float = 15.0) -> Swtpm:
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.process = subprocs.spawn(self.config.argv(), self.log_path)
        try:
            wait_for_port(
                self.config.host, self.config.ctrl_port, timeout, self.process, self.log_path
            )
            # The control port opens after the command port: probing the command port
            # itself would take swtpm's one client slot and confuse its first TCTI.
        except NatsServerError as exc:
            self.kill()
            raise SwtpmError(f"swtpm did not start: {exc}") from exc
        log.info(
            "swtpm started pid=%s port=%s ctrl_port=%s state_dir=%s",
            self.process.pid,
            self.config.port,
            self.config.ctrl_port,
            self.config.state_dir,
        )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if subprocs.end(self.process, timeout):
            log.info("swtpm stopped port=%s", self.config.port)

    def kill(self) -> None:
        subprocs.kill(self.process)

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
