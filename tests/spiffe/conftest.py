"""The real stack for the SPIFFE tests: `kmsctl up` (nats-server with JetStream, SoftHSM,
kms-crypto, the CA service, the broker), a mini-CA, the trust domain home.arpa, an
enrolled device, and that device's SPIFFE agent (`kmsctl spiffe agent`) on a socket in a
temp dir. Workloads are separate processes under other uids (tests/spiffe/workload.py,
run by Debian's python: the venv's interpreter lives under /root, which other uids
cannot enter)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack
from tests.enroll.test_enroll import enrolled
from tests.logevents import entries

TRUST_DOMAIN = "home.arpa"
DEVICE = "nas-spiffe"
ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = Path(__file__).with_name("workload.py")
# Debian's python of the venv's version: other uids can run it, and the venv's compiled
# packages (grpcio, cryptography) fit its ABI.
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout * SLOWDOWN
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class SpiffeStack:
    stack: KmsStack
    device_config: Path
    root: Path
    # The CA's ACME listener (HTTPS, the mini-CA's server certificate), where the
    # trust domain's bundle endpoint is served for the https_web profile.
    https_url: str = ""
    # The trust domain's bundle endpoint over https_spiffe (--spiffe-bundle-listen).
    spiffe_bundle_url: str = ""

    def kmsctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "kmsctl"), *args],
            env=self.stack.env(), capture_output=True, text=True, timeout=120 * SLOWDOWN,
        )  # fmt: skip
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def entry(self, spiffe_id: str, *selectors: str, ttl: str = "", node: str = DEVICE) -> str:
        args = ["spiffe", "entry", "create", "--id", spiffe_id, "--node", node, "-o", "json"]
        for s in selectors:
            args += ["--selector", s]
        if ttl:
            args += ["--ttl", ttl]
        return str(json.loads(self.kmsctl(*args).stdout)["entry_id"])


@pytest.fixture(scope="package")
def spiffe_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpiffeStack]:
    root = tmp_path_factory.mktemp("spiffestack")
    acme_port, bundle_port = free_port(), free_port()
    stack = start_stack(
        root / "data",
        "--acme", f"127.0.0.1:{acme_port}",
        "--spiffe-bundle-listen", f"127.0.0.1:{bundle_port}",
    )  # fmt: skip
    try:
        with stack.client(timeout=60) as kms:
            kms.ca_init("SPIFFE Test CA")
            kms.spiffe_init(TRUST_DOMAIN)
        device_config = enrolled(stack, root, DEVICE)
        yield SpiffeStack(
            stack,
            device_config,
            root,
            f"https://127.0.0.1:{acme_port}",
            f"https://127.0.0.1:{bundle_port}/spiffe/bundle",
        )
    finally:
        code = stop_stack(stack)
        assert code == 0, stack.log_path.read_text()[-2000:]


class Agent:
    """`kmsctl spiffe agent` in the background, its JSON log in a file."""

    def __init__(
        self,
        client_config: Path,
        where: Path,
        sync_interval: float = 0.5,
        argv: Callable[[Path], list[str]] | None = None,
    ) -> None:
        """`argv(socket)`, if given, is the command to run instead (a doc's line with
        this agent's socket path put in)."""
        where.mkdir(parents=True, exist_ok=True)
        # pytest's temp dirs are 0700: the socket lives where other uids can reach it.
        self.public = Path(tempfile.mkdtemp(prefix="edgekms-spiffe-test-"))
        os.chmod(self.public, 0o755)  # noqa: S103 - other uids dial the socket
        self.socket = self.public / "run" / "workload.sock"
        self.log = where / "agent.log"
        command = (
            argv(self.socket)
            if argv is not None
            else [str(BIN / "kmsctl"), "spiffe", "agent", "--client-config", str(client_config),
                  "--socket", f"unix://{self.socket}", "--sync-interval", str(sync_interval),
                  "--log-level", "debug"]
        )  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 60, "the socket")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in entries(self.log.read_text(errors="replace")) if e.get("msg") == name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30 * SLOWDOWN)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.public, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(spiffe_stack: SpiffeStack) -> Iterator[Agent]:
    running = Agent(spiffe_stack.device_config, spiffe_stack.root / "agent")
    try:
        yield running
    finally:
        running.stop()


class Relay:
    """A TCP relay to the broker that can be cut: the device's uplink going away. Unlike
    a closed listener alone, `cut` also drops the connections in use, so the agent's
    open gRPC channel fails the way a lost link does."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
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

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()


def device_behind_relay(spiffe_stack: SpiffeStack, name: str) -> tuple[Path, Relay]:
    """A device enrolled now whose client config reaches the broker through a Relay."""
    config = enrolled(spiffe_stack.stack, spiffe_stack.root, name)
    relay = Relay(spiffe_stack.stack.broker)
    text = config.read_text()
    config.write_text(text.replace(spiffe_stack.stack.broker, f"127.0.0.1:{relay.port}"))
    return config, relay


def workload_env() -> dict[str, str]:
    site = next((ROOT / ".venv" / "lib").glob("python*/site-packages"))
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{site}:{ROOT / 'protos'}:{ROOT}",
        "HOME": "/tmp",
    }


def as_user(uid: int, gid: int) -> dict[str, Any]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (Debian's python3) is needed to run workloads as uid {uid}")
    return {"user": uid, "group": gid, "extra_groups": [], "env": workload_env(), "cwd": "/tmp"}


def workload(socket: Path, uid: int, gid: int, mode: str, *args: str) -> dict[str, Any]:
    """Run tests/spiffe/workload.py MODE under uid/gid; its one JSON answer."""
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-S", str(WORKLOAD), mode, str(socket), *args],
        capture_output=True, text=True, timeout=120 * SLOWDOWN, **as_user(uid, gid),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    return dict(lines[-1])


def workload_process(
    socket: Path, uid: int, gid: int, mode: str, *args: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(SYSTEM_PYTHON), "-S", str(WORKLOAD), mode, str(socket), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **as_user(uid, gid),
    )  # fmt: skip


def read_json_line(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The next JSON line a workload process prints (a deadline, not a sleep)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout * SLOWDOWN
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return dict(json.loads(line))
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"no JSON line from the workload in time; stderr: {err[-2000:]}")


def system_python_path() -> str:
    return os.path.realpath(SYSTEM_PYTHON)


# systemd's cgroup hierarchies, in the order spiffe_agent.attest reads them.
CGROUP_ROOTS = (
    Path("/sys/fs/cgroup/systemd"),
    Path("/sys/fs/cgroup/unified"),
    Path("/sys/fs/cgroup"),
)


def _empty_cgroup(path: Path) -> bool:
    return not (path / "cgroup.procs").read_text().split()


class UnitCgroups:
    """Cgroups named like systemd units, made by the (root) test in a real systemd
    hierarchy of this kernel, so that a workload's /proc/<pid>/cgroup names a unit the
    way systemd would have put it there. Skips (and says why) where none is writable."""

    def __init__(self) -> None:
        self.made: list[Path] = []
        for root in CGROUP_ROOTS:
            if not (root / "cgroup.procs").exists():
                continue
            probe = root / f"edgekms-probe-{os.getpid()}"
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError:
                continue
            self.root = root
            return
        pytest.skip("no writable systemd cgroup hierarchy to place a workload in a unit")

    def make(self, path: str) -> Path:
        where = self.root
        for part in path.strip("/").split("/"):
            where = where / part
            if not where.exists():
                where.mkdir()
                self.made.append(where)
        return where

    def cleanup(self) -> None:
        """Remove what was made, deepest first, once the workloads have left it."""
        for path in reversed(self.made):
            wait_for(functools.partial(_empty_cgroup, path), 30, f"{path} empty")
            with contextlib.suppress(OSError):
                path.rmdir()


def workload_in_cgroup(
    socket: Path, cgroup: Path, uid: int, gid: int, mode: str, *args: str
) -> dict[str, Any]:
    """Run tests/spiffe/workload.py MODE as uid/gid from inside `cgroup`: it joins the
    cgroup as root, then drops to uid/gid and execs the workload (one process, so the
    agent attests a process in that cgroup)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (Debian's python3) is needed to run workloads as uid {uid}")
    enter = (
        "import os, sys\n"
        "with open(sys.argv[1] + '/cgroup.procs', 'w') as f: f.write(str(os.getpid()))\n"
        "os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))\n"
        "os.execv(sys.executable, [sys.executable, '-S', *sys.argv[4:]])\n"
    )
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-S", "-c", enter, str(cgroup), str(uid), str(gid),
         str(WORKLOAD), mode, str(socket), *args],
        capture_output=True, text=True, timeout=120 * SLOWDOWN, env=workload_env(), cwd="/tmp",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    return dict(lines[-1])
