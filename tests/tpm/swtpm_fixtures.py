"""swtpm fixtures, importable by any conftest that needs a TPM (tests/tpm, tests/contract).

Each swtpm has its own state directory and its own Unix sockets (0600) in it, as
`kmsctl up --tpm swtpm` runs it. swtpm serves one client at a time, so a test holds a
provider open only while it uses it, and tests that need a TPM of their own (lockout,
restarts) take a fresh one from `swtpm_factory`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mgmt.swtpm import Swtpm

SwtpmFactory = Callable[[], Swtpm]


def _require_swtpm() -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed (Debian package swtpm)")


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    _require_swtpm()
    tpm = Swtpm.private(tmp_path_factory.mktemp("swtpm") / "state").start()
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[SwtpmFactory]:
    _require_swtpm()
    started: list[Swtpm] = []

    def make() -> Swtpm:
        tpm = Swtpm.private(tmp_path / f"swtpm{len(started)}").start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


class ResourceManagedTpm:
    """swtpm behind tpm2-abrmd, the user-space resource manager, on a private D-Bus.

    A real device reaches its TPM through the kernel's resource manager (/dev/tpmrm0),
    which swaps objects in and out, so that many processes, and a TLS handshake that
    needs more objects than the TPM's three slots, share it. swtpm alone has no such
    manager; tpm2-abrmd plays the kernel's part here. `tcti` is what clients use."""

    def __init__(self, tpm: Swtpm, bus_address: str, name: str) -> None:
        import os
        import subprocess

        self.tpm = tpm
        self.bus_name = f"com.intel.tss2.Tabrmd.{name}"
        self.tcti = f"tabrmd:bus_name={self.bus_name},bus_type=session"
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": bus_address}
        self.proc = subprocess.Popen(
            [
                "tpm2-abrmd", "--session", "--allow-root", f"--dbus-name={self.bus_name}",
                f"--tcti={tpm.tcti}", "--flush-all",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self) -> None:
        import time

        from tpm2_pytss import ESAPI

        from tests.conftest import SLOWDOWN

        deadline = time.monotonic() + 30 * SLOWDOWN
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tpm2-abrmd exited with {self.proc.returncode}")
            try:
                ESAPI(self.tcti).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.tpm.stop()


ManagedTpmFactory = Callable[[], ResourceManagedTpm]


@pytest.fixture(scope="session")
def session_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private D-Bus session bus (tpm2-abrmd registers its name there)."""
    import os
    import signal
    import subprocess

    if shutil.which("tpm2-abrmd") is None or shutil.which("dbus-daemon") is None:
        pytest.skip("tpm2-abrmd and dbus-daemon are needed (Debian tpm2-abrmd, dbus-daemon)")
    done = subprocess.run(
        ["dbus-daemon", "--session", "--print-address=1", "--print-pid=1", "--fork"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    address, pid = done.stdout.split()[:2]
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = address  # the tabrmd TCTI finds the bus so
    yield address
    os.kill(int(pid), signal.SIGTERM)


@pytest.fixture
def managed_tpm_factory(tmp_path: Path, session_bus: str) -> Iterator[ManagedTpmFactory]:
    """swtpm instances, each behind its own tpm2-abrmd (see ResourceManagedTpm)."""
    _require_swtpm()
    started: list[ResourceManagedTpm] = []

    def make() -> ResourceManagedTpm:
        name = f"t{os.getpid()}x{len(started)}x{tmp_path.name[-8:]}".replace("-", "_")
        tpm = Swtpm.private(tmp_path / f"rmtpm{len(started)}").start()
        try:
            managed = ResourceManagedTpm(tpm, session_bus, name)
        except BaseException:
            tpm.stop()
            raise
        started.append(managed)
        return managed

    yield make
    for managed in started:
        managed.stop()
