"""A software TPM 2.0 (swtpm) for development, tests and `kmsctl up --tpm swtpm`.

swtpm plays the part of the board's /dev/tpmrm0, with its NV state in a directory of its
own. It is started already powered on and past TPM2_Startup(CLEAR), so a TCTI can talk
to it at once. The TPM provider reaches it with the TCTI string `tcti` gives.

Who may talk to it: swtpm takes commands and control requests (power off, reset,
locality) from anyone who reaches its sockets, without authentication. On loopback TCP
that is every local user (user nobody cleared the dictionary-attack lockout that way),
so by default it listens on two Unix sockets instead, `swtpm.sock` and
`swtpm.sock.ctrl` (the name tpm2-tss's swtpm TCTI derives, `swtpm:path=...`), mode 0600
in a 0700 directory owned by whoever runs it. TCP (`port=`) remains for the container
image, where swtpm is a network peer of its own.

A real machine's firmware locks the platform hierarchy (random platformAuth) at every
boot; swtpm's is open with an empty auth after every TPM2_Startup(CLEAR), and platform
auth can clear the TPM. With `lock_platform`, every start disables the platform
hierarchy (TPM2_HierarchyControl), as firmware would, before anyone else connects.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mgmt import subprocs
from mgmt.natsserver import NatsServerError, free_port_pair, wait_for_port

log = logging.getLogger(__name__)


class SwtpmError(RuntimeError):
    """swtpm is missing, exited, or did not open its ports in time."""


def find_binary() -> str:
    found = shutil.which("swtpm")
    if found is None:
        raise SwtpmError("swtpm not found: install the swtpm package")
    return found


# sockaddr_un holds 108 bytes; the TCTI appends ".ctrl" to the command socket's path.
_MAX_SOCKET_PATH = 100
SOCKET_NAME = "swtpm.sock"


def _socket_dir(state_dir: Path) -> Path:
    """Where the sockets go: beside the state, unless that path is too long for AF_UNIX
    (a deep data dir); then a fresh private directory under the system's temp dir."""
    if len(str(state_dir.absolute() / SOCKET_NAME)) + len(".ctrl") <= _MAX_SOCKET_PATH:
        return state_dir
    return Path(tempfile.mkdtemp(prefix="swtpm-"))  # 0700


@dataclass(frozen=True)
class SwtpmConfig:
    state_dir: Path
    # None: Unix sockets, 0600 (the default); a port: TCP on host, control on port + 1.
    port: int | None = None
    host: str = "127.0.0.1"
    socket_dir: Path | None = None
    lock_platform: bool = False

    @property
    def ctrl_port(self) -> int:
        assert self.port is not None
        return self.port + 1

    @property
    def socket_path(self) -> Path:
        return (self.socket_dir or self.state_dir).absolute() / SOCKET_NAME

    @property
    def ctrl_path(self) -> Path:
        return Path(f"{self.socket_path}.ctrl")

    @property
    def tcti(self) -> str:
        if self.port is None:
            return f"swtpm:path={self.socket_path}"
        return f"swtpm:host={self.host},port={self.port}"

    def argv(self) -> list[str]:
        if self.port is None:
            server = f"type=unixio,path={self.socket_path},mode=0600"
            ctrl = f"type=unixio,path={self.ctrl_path},mode=0600"
        else:
            server = f"type=tcp,port={self.port},bindaddr={self.host}"
            ctrl = f"type=tcp,port={self.ctrl_port},bindaddr={self.host}"
        return [
            find_binary(),
            "socket",
            "--tpm2",
            "--server",
            server,
            "--ctrl",
            ctrl,
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
        """On loopback TCP: reachable by every local user; for benchmarks and containers."""
        return cls(SwtpmConfig(state_dir=state_dir, port=free_port_pair()))

    @classmethod
    def private(cls, state_dir: Path, lock_platform: bool = False) -> Swtpm:
        """On Unix sockets only its owner may open (the development default)."""
        return cls(
            SwtpmConfig(
                state_dir=state_dir,
                socket_dir=_socket_dir(state_dir),
                lock_platform=lock_platform,
            )
        )

    @property
    def tcti(self) -> str:
        return self.config.tcti

    def start(self, timeout: float = 15.0) -> Swtpm:
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.config.state_dir, 0o700)
        if self.config.port is None:
            for path in (self.config.socket_path, self.config.ctrl_path):
                path.unlink(missing_ok=True)  # left by a swtpm that was killed
        # swtpm binds its sockets, then chmods them to mode=0600: born under umask 077 they
        # are never wider than that, even for the moment between the two calls.
        self.process = subprocs.spawn(self.config.argv(), self.log_path, umask=0o077)
        try:
            if self.config.port is None:
                self._wait_for_sockets(timeout)
            else:
                # The control port opens after the command port: probing the command port
                # itself would take swtpm's one client slot and confuse its first TCTI.
                wait_for_port(
                    self.config.host, self.config.ctrl_port, timeout, self.process, self.log_path
                )
        except NatsServerError as exc:
            self.kill()
            raise SwtpmError(f"swtpm did not start: {exc}") from exc
        if self.config.lock_platform:
            try:
                self.lock_platform()
            except Exception as exc:
                self.kill()
                raise SwtpmError(f"swtpm's platform hierarchy could not be locked: {exc}") from exc
        log.info(
            "swtpm started pid=%s tcti=%s state_dir=%s",
            self.process.pid,
            self.tcti,
            self.config.state_dir,
        )
        return self

    def _wait_for_sockets(self, timeout: float) -> None:
        """Both sockets exist with their final mode 0600 (swtpm makes and chmods them
        before it accepts); no probe connection, which would take swtpm's one client slot."""
        deadline = time.monotonic() + timeout
        paths = (self.config.socket_path, self.config.ctrl_path)
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise NatsServerError(f"process exited with {self.process.returncode}: {tail}")
            try:
                modes = [os.stat(p).st_mode for p in paths]
                if all(stat.S_ISSOCK(m) and stat.S_IMODE(m) == 0o600 for m in modes):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise NatsServerError(f"no sockets at {paths[0]} after {timeout}s")

    def lock_platform(self) -> None:
        """Disable the platform hierarchy until swtpm's next start, as firmware does."""
        lock_platform(self.tcti)

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


def lock_platform(tcti: str) -> None:
    """Disable the TPM's platform hierarchy until its next start, as firmware does."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR

    with ESAPI(tcti) as esys:
        esys.hierarchy_control(ESYS_TR.PLATFORM, ESYS_TR.PLATFORM, False)


def main(argv: list[str]) -> int:
    """`python -m mgmt.swtpm lock-platform TCTI`: the lean watcher of `kmsctl up`
    (mgmt.upwatch) locks a restarted swtpm this way, so that the TPM bindings load in
    this short-lived process and never in the watcher."""
    if len(argv) != 2 or argv[0] != "lock-platform":
        print("usage: python -m mgmt.swtpm lock-platform TCTI", file=sys.stderr)
        return 2
    try:
        lock_platform(argv[1])
    except Exception as exc:  # any failure: the watcher ends swtpm and stops the stack
        print(f"swtpm lock-platform failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
