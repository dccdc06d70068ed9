"""One stack per data dir: the lock `kmsctl up` holds on its data dir, the clean-up of a
killed supervisor's leftovers, and the check that the stack's ports are free.

Two supervisors on one data dir share a JetStream store, a token and the config files,
and each rewrites what the other reads; so `kmsctl up` takes an exclusive flock on
<data-dir>/run/up.lock (its pid written inside) before it starts or writes anything,
and a second one is refused at once, naming that pid. The kernel drops a flock when its
holder dies, so the lock of a supervisor that was killed (SIGKILL, OOM) is simply free
the next time; what such a supervisor leaves behind are its children (each in its own
session), still running on this data dir. `reap_orphans` ends those, recognised by the
pids in the last state file *and* a command line naming this data dir, so that a pid
the kernel gave to an unrelated process since is never touched.

Only the standard library and edgekms.errors: this runs before the stack's imports so
that a refused start costs a fraction of a second.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from edgekms.errors import FailedPrecondition

LOCK_NAME = "up.lock"
STATE_NAME = "state.json"
# How long a leftover child gets to exit on SIGTERM before SIGKILL.
ORPHAN_GRACE = 10.0


@dataclass
class StackLock:
    """The held lock; released when closed or when this process ends."""

    path: Path
    fd: int
    # The pid a killed supervisor left in the lock file, if the lock was taken over.
    previous_pid: int | None

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _holder(fd: int, wait: float = 2.0) -> int | None:
    """The pid in a lock file another process holds. It writes its pid just after
    taking the lock, so a `kmsctl up` started at the same moment may find the file still
    empty: look again for a short while rather than name no one."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read_pid(fd)
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.01)


def acquire(run_dir: Path) -> StackLock:
    """Take the data dir's lock, or raise FailedPrecondition `stack.already_running`
    naming the pid that holds it. On refusal nothing is created or changed."""
    path = run_dir / LOCK_NAME
    existed = path.exists()
    if not existed:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        holder = _holder(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise FailedPrecondition(
            "stack.already_running",
            f"{run_dir.parent} is in use by `kmsctl up` ({who}); stop that one first "
            f"(kill -INT {holder or 'PID'}), or give this one its own --data-dir",
            {"pid": str(holder or ""), "lock": str(path)},
        ) from None
    previous = _read_pid(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return StackLock(path, fd, previous if previous != os.getpid() else None)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def leftover_pids(data_dir: Path) -> list[int]:
    """Processes the last supervisor on `data_dir` started that still run: the pids in
    its state file whose command line still names this data dir."""
    try:
        state = json.loads((data_dir / "run" / STATE_NAME).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(state, dict):
        return []
    candidates: list[object] = [state.get("nats_pid"), state.get("swtpm_pid")]
    children = state.get("children")
    if isinstance(children, dict):
        candidates.extend(children.values())
    marker = str(data_dir.resolve())
    found = []
    for pid in candidates:
        if isinstance(pid, int) and pid > 1 and pid != os.getpid() and marker in _cmdline(pid):
            found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has no command line left: it is gone for our purposes.
    return bool(_cmdline(pid))


def reap_orphans(data_dir: Path, grace: float = ORPHAN_GRACE) -> list[int]:
    """End what a killed supervisor left running on `data_dir` (SIGTERM, then SIGKILL
    after `grace`); the pids ended, for the log."""
    pids = leftover_pids(data_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def split_listen(option: str, value: str) -> tuple[str, int]:
    """(host, port) of a listen option; FailedPrecondition `stack.listen_invalid` for
    anything else, before the stack starts (a bad value would otherwise surface as a
    child that cannot bind, after nats-server and the token were started)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise FailedPrecondition(
            "stack.listen_invalid",
            f"{option} must be host:port, got {value!r}",
            {"option": option, "value": value},
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def check_ports(ports: dict[str, tuple[str, int]]) -> None:
    """Bind each (option -> host, port) the stack will listen on, as its server would
    (SO_REUSEADDR), and let go; FailedPrecondition `stack.port_in_use` names the first
    one something else holds."""
    for option, (host, port) in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise FailedPrecondition(
                        "stack.port_in_use",
                        f"{host}:{port} ({option}) is already in use by another process; "
                        f"stop it or start with another {option}",
                        {"option": option, "address": f"{host}:{port}"},
                    ) from None
                raise FailedPrecondition(
                    "stack.port_unusable",
                    f"cannot listen on {host}:{port} ({option}): {exc.strerror}",
                    {"option": option, "address": f"{host}:{port}"},
                ) from None


def metrics_parts(provider_ids: list[str]) -> list[str]:
    """The parts that serve metrics, in the order their ports follow --metrics-listen."""
    return ["broker", "ca", *(f"crypto-{p}" for p in provider_ids)]


def metrics_addresses(listen: str, parts: list[str]) -> dict[str, tuple[str, int]]:
    """Where each part serves /metrics: consecutive ports from --metrics-listen's (the
    broker on it, then the CA, then each crypto service); "" : none. Port 0 gives each part
    a free port chosen now (tests). FailedPrecondition `stack.listen_invalid` for a value
    that is not IP:PORT or whose ports would run past 65535."""
    if not listen:
        return {}
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        valid = bool(sep) and port.isdigit() and int(port) + len(parts) - 1 < 65536
    except OSError:
        valid = False
    if not valid:
        raise FailedPrecondition(
            "stack.listen_invalid",
            f"--metrics-listen must be IP:PORT with room for {len(parts)} ports after it"
            f" (one per service), got {listen!r}",
            {"option": "--metrics-listen", "value": listen},
        )
    base = int(port)
    if base:
        return {part: (host, base + i) for i, part in enumerate(parts)}
    chosen: dict[str, tuple[str, int]] = {}
    for part in parts:
        with socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        ) as sock:
            sock.bind((host, 0))
            chosen[part] = (host, int(sock.getsockname()[1]))
    return chosen
