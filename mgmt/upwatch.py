"""The lean half of `kmsctl up`: the process that watches a started stack until it stops.

`kmsctl up` starts the stack with everything it needs for that (nats-py, cryptography for
the bus TLS and the ceremony, click): ~55 MB RSS that a supervisor which only watches
its children would keep for the stack's life (issue 19: the whole stack <= 150 MB PSS
on a 512 MB board). Once the stack is ready, mgmt.stack hands over here: the same
process (same pid, so state.json, the data dir's flock and `kmsctl status` stay true)
os.execv's `python -m mgmt.upwatch`, which reads the handover (children's pids, argv,
environments, log files; nats-server's and swtpm's) from an inherited memfd and from
then on does what the supervisor's loop did, with the standard library only:

- a child that exits is restarted with the same backoff and limits (FATAL_EXIT_CODES,
  MAX_RESTARTS in RESTART_WINDOW); one exiting with a fatal code, or too often, stops
  the stack with its reason (exit 8, as before);
- nats-server and swtpm are restarted when they exit (swtpm's platform hierarchy locked
  again by a short-lived helper, `python -m mgmt.swtpm lock-platform`, so the heavy
  TPM bindings never load here);
- the logs under DATA_DIR/logs are kept within their size (mgmt.logrotate);
- run/state.json is rewritten after every restart and says ready=false on the way out;
- SIGINT/SIGTERM stop every child in reverse start order, then swtpm, then nats-server.

SIGINT and SIGTERM stay blocked from before the exec (the mask survives execve) and are
taken with sigtimedwait, so a signal sent during the hand-over is never lost and never
kills the watcher with its children left running. Children are spawned with an empty
signal mask, SIGPIPE/SIGXFSZ at their defaults and no inherited descriptors but 0-2,
as subprocess.Popen gives them.

A supervisor that has bus work to do for the stack's life (a cluster node, a fleet hub,
an mDNS announcement) does not hand over; see Stack.lean_watch_refusal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekms.logs import fields, setup_logging
from mgmt.logrotate import rotate_and_report

log = logging.getLogger("mgmt.stack")

# Exit codes of kms-crypto / kms-broker that no restart can fix.
FATAL_EXIT_CODES = {2: "bad configuration", 3: "token refused (PIN or token missing)"}
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
# How often the watcher looks at its children (as the supervisor's loop did).
TICK_S = 0.5
# kmsctl's exit code for "a part failed to start or died for good" (mgmt.cli.common
# ExitCode.UNAVAILABLE; a test checks they agree: click is not imported here).
EXIT_UNAVAILABLE = 8
# What the handover says it is; a watcher refuses another (an upgrade between the two
# halves of one process cannot happen, but a stale file must not be half-read).
HANDOVER_VERSION = 1
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# swtpm's sockets and nats-server's port: how long a restarted one may take.
RESTART_READY_S = 15.0
LOCK_PLATFORM_S = 60.0


class WatchError(RuntimeError):
    """The stack failed for good: stopped, and `kmsctl up` exits 8 with this reason."""


def plan_restart(
    name: str, code: int, restarts: list[float], last_log_line: Callable[[], str]
) -> float:
    """How long to wait before restarting child `name`, which exited with `code`, and
    note the restart in `restarts` (its recent restart times, kept within
    RESTART_WINDOW in place); WatchError when the stack must stop instead: a fatal
    code, or MAX_RESTARTS deaths in the window. One rule for both supervisors (this
    watcher and mgmt.stack's own loop)."""
    if code in FATAL_EXIT_CODES:
        raise WatchError(f"{name} stopped: {FATAL_EXIT_CODES[code]}")
    now = time.monotonic()
    restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW]
    if len(restarts) >= MAX_RESTARTS:
        raise WatchError(
            f"{name} died {MAX_RESTARTS} times in {RESTART_WINDOW:.0f}s: {last_log_line()}"
        )
    restarts.append(now)
    return min(0.5 * 2.0 ** (len(restarts) - 1), 10.0)


class Proc:
    """One process the watcher owns: what it runs, where its output goes, its pid. A
    plain class: dataclasses would cost this process ~1.5 MB (inspect, ast)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: str,
        pid: int,
        env: dict[str, str] | None = None,
        restarts: list[float] | None = None,
    ):
        self.name = name
        self.argv = argv
        self.log = log
        self.pid = pid
        self.env = env
        self.restarts = list(restarts or [])

    def last_log_line(self) -> str:
        try:
            lines = Path(self.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""


def spawn(argv: list[str], log_path: str, env: dict[str, str] | None, umask: int = -1) -> int:
    """Start `argv` in its own session, output appended to `log_path`, stdin /dev/null;
    as mgmt.subprocs.spawn (subprocess.Popen) does, without importing subprocess."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    old = os.umask(umask) if umask >= 0 else None
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            os.environ if env is None else env,
            file_actions=actions,
            setsid=True,
            # Our SIGINT/SIGTERM are blocked (taken with sigtimedwait): the child's are not.
            setsigmask=(),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        if old is not None:
            os.umask(old)


def exit_code(pid: int) -> int | None:
    """The child's exit code (negative: the signal that ended it), or None if it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1  # not ours any more (never expected): treated as exited
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def end(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds (mgmt.subprocs.end)."""
    if exit_code(pid) is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exit_code(pid) is not None:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def write_state(path: Path, state: dict[str, Any]) -> None:
    """state.json replaced atomically, 0644 (as mgmt.outfile.write_public makes it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(state, indent=2).encode())
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Watcher:
    """The watch loop over one handover (see the module docstring)."""

    def __init__(self, handover: dict[str, Any]):
        if handover.get("version") != HANDOVER_VERSION:
            raise WatchError(f"handover version {handover.get('version')!r} not understood")
        self.state: dict[str, Any] = handover["state"]
        self.state_file = Path(handover["state_file"])
        self.logs_dir = Path(handover["logs_dir"])
        self.log_max_bytes = int(handover["log_max_bytes"])
        self.log_backups = int(handover["log_backups"])
        self.children = [Proc(**c) for c in handover["children"]]
        self.nats = Proc(**handover["nats"]["proc"])
        self.nats_address = (str(handover["nats"]["host"]), int(handover["nats"]["port"]))
        swtpm = handover.get("swtpm")
        self.swtpm = Proc(**swtpm["proc"]) if swtpm else None
        self.swtpm_sockets: list[str] = list(swtpm["sockets"]) if swtpm else []
        self.swtpm_ctrl_port: int | None = swtpm.get("ctrl_port") if swtpm else None
        self.swtpm_lock_tcti: str = str(swtpm.get("lock_tcti") or "") if swtpm else ""
        self.stopping = False

    # --- the loop ------------------------------------------------------------------------

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, woken by SIGINT/SIGTERM: True once one came."""
        if self.stopping:
            return True
        if seconds > 0 and signal.sigtimedwait(STOP_SIGNALS, seconds) is not None:
            self.stopping = True
        elif seconds <= 0 and signal.sigpending() & STOP_SIGNALS:
            signal.sigtimedwait(STOP_SIGNALS, 0)
            self.stopping = True
        return self.stopping

    def run(self) -> None:
        """Until a stop signal (returns) or a failure for good (WatchError)."""
        # state.json is as the supervisor last wrote it (the handover's "state" is the
        # same): rewritten only when a pid changes, so a hand-over touches no file.
        ticks = 0
        while not self.wait(TICK_S):
            ticks += 1
            if ticks % 4 == 0:
                self.rotate_logs()
            if exit_code(self.nats.pid) is not None:
                log.warning("nats-server exited; restarting")
                self.restart_nats()
                self.write_state(True)
            if self.swtpm is not None and exit_code(self.swtpm.pid) is not None:
                log.warning("swtpm exited; restarting")
                self.restart_swtpm()
                self.write_state(True)
            for child in self.children:
                if self.stopping:
                    return
                code = exit_code(child.pid)
                if code is not None:
                    self.restart_child(child, code)

    def restart_child(self, child: Proc, code: int) -> None:
        """As mgmt.stack's loop does: fatal codes and too many deaths end the stack."""
        delay = plan_restart(child.name, code, child.restarts, child.last_log_line)
        log.warning(
            "child exited; restarting", extra=fields(part=child.name, code=code, delay=delay)
        )
        if self.wait(delay):
            return
        child.pid = self._spawn(child)
        self.write_state(True)

    def _spawn(self, proc: Proc, umask: int = -1) -> int:
        try:
            return spawn(proc.argv, proc.log, proc.env, umask)
        except OSError as exc:
            raise WatchError(f"{proc.name} could not be started: {exc}") from None

    def restart_nats(self) -> None:
        """nats-server again from its config file as last reloaded: without the setup
        and ceremony grants, which the supervisor withdrew before it handed over (the
        streams it hardened are in the store; nothing is granted again)."""
        import socket  # only on a restart: the watcher's steady state stays small

        self.nats.pid = self._spawn(self.nats)
        host, port = self.nats_address
        deadline = time.monotonic() + RESTART_READY_S
        while True:
            code = exit_code(self.nats.pid)
            if code is not None:
                raise WatchError(f"nats-server exited with {code}: {self.nats.last_log_line()}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise WatchError(f"nats-server: nothing listening on {host}:{port}") from None
                if self.wait(0.05):
                    return

    def restart_swtpm(self) -> None:
        """swtpm on its 0600 sockets (born under umask 077, as mgmt.swtpm starts it), and
        its platform hierarchy locked again before tpm0 may use it."""
        assert self.swtpm is not None
        for path in self.swtpm_sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.swtpm.pid = self._spawn(self.swtpm, umask=0o077)
        deadline = time.monotonic() + RESTART_READY_S
        while not self._swtpm_listens():
            code = exit_code(self.swtpm.pid)
            if code is not None:
                raise WatchError(f"swtpm exited with {code}: {self.swtpm.last_log_line()}")
            if time.monotonic() > deadline:
                end(self.swtpm.pid)
                raise WatchError("swtpm did not start")
            if self.wait(0.05):
                return
        if self.swtpm_lock_tcti:
            self._lock_platform(self.swtpm_lock_tcti)
        log.info("swtpm started", extra=fields(pid=self.swtpm.pid))

    def _swtpm_listens(self) -> bool:
        if self.swtpm_ctrl_port is not None:
            import socket

            try:
                with socket.create_connection(("127.0.0.1", self.swtpm_ctrl_port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            modes = [os.stat(p).st_mode for p in self.swtpm_sockets]
        except FileNotFoundError:
            return False
        return all(stat.S_ISSOCK(m) and stat.S_IMODE(m) == 0o600 for m in modes)

    def _lock_platform(self, tcti: str) -> None:
        """`python -m mgmt.swtpm lock-platform TCTI` in a process of its own: the TPM
        bindings are loaded there and gone with it. A swtpm that cannot be locked is
        ended and the stack stops (as a failed start does)."""
        assert self.swtpm is not None
        helper = Proc(
            "swtpm-lock",
            [sys.executable, "-m", "mgmt.swtpm", "lock-platform", tcti],
            self.swtpm.log,
            0,
        )
        pid = self._spawn(helper)
        deadline = time.monotonic() + LOCK_PLATFORM_S
        while (code := exit_code(pid)) is None:
            if time.monotonic() > deadline:
                end(pid, 1.0)
                code = -1
                break
            time.sleep(0.05)
        if code != 0:
            end(self.swtpm.pid)
            raise WatchError(f"swtpm's platform hierarchy could not be locked (exit {code})")

    def rotate_logs(self) -> None:
        rotate_and_report(self.logs_dir, self.log_max_bytes, self.log_backups, log)

    def write_state(self, ready: bool) -> None:
        self.state["ready"] = ready
        self.state["pid"] = os.getpid()
        self.state["children"] = {c.name: c.pid for c in self.children}
        self.state["nats_pid"] = self.nats.pid
        self.state["swtpm_pid"] = self.swtpm.pid if self.swtpm is not None else None
        write_state(self.state_file, self.state)

    def stop(self) -> None:
        """Every child in reverse start order, then swtpm, then nats-server."""
        with contextlib.suppress(OSError):
            self.write_state(False)
        for child in reversed(self.children):
            end(child.pid)
        if self.swtpm is not None:
            end(self.swtpm.pid)
        end(self.nats.pid)


def _release_lock(fd: int) -> None:
    """As mgmt.stacklock.StackLock.release: the pid out of the lock file, then the flock."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """`python -m mgmt.upwatch --handover-fd N`: only ever exec'd by `kmsctl up`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "--handover-fd" or not args[1].isdigit():
        print("mgmt.upwatch: started by `kmsctl up` only (--handover-fd N)", file=sys.stderr)
        return 2
    fd = int(args[1])
    with os.fdopen(fd, "rb") as handover_file:
        handover_file.seek(0)
        handover = json.loads(handover_file.read())
    lock_fd = int(handover.get("lock_fd", -1))
    if lock_fd >= 0:
        # Held by this process only: a child given it would keep the data dir locked
        # after we are gone.
        os.set_inheritable(lock_fd, False)
    setup_logging(
        "kmsctl-up", handover.get("log_level", "info"), handover.get("log_format", "text")
    )
    # Blocked already (the mask survives the exec); again in case of a direct start.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    code, reason = 0, ""
    watcher: Watcher | None = None
    try:
        watcher = Watcher(handover)
        log.info("lean watcher took over", extra=fields(pid=os.getpid()))
        watcher.run()
    except WatchError as exc:
        code = EXIT_UNAVAILABLE
        reason = str(exc)
    finally:
        if watcher is not None:
            watcher.stop()
        for pointer in handover.get("pointers", []):
            with contextlib.suppress(OSError):
                os.unlink(pointer)
        _release_lock(lock_fd)
    if code:
        print(f"kmsctl: {reason}", file=sys.stderr, flush=True)
    else:
        print("EdgeKMS stopped.", file=sys.stderr, flush=True)
    return code


def exec_watcher(handover: dict[str, Any], lock_fd: int) -> None:
    """Become the watcher (never returns unless the exec itself fails: OSError). The
    handover goes in a memfd the new program inherits; the lock fd is inherited as is."""
    handover = {**handover, "version": HANDOVER_VERSION, "lock_fd": lock_fd}
    fd = os.memfd_create("edgekms-handover", 0)  # not MFD_CLOEXEC: inherited
    try:
        os.write(fd, json.dumps(handover).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        if lock_fd >= 0:
            os.set_inheritable(lock_fd, True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.execv(sys.executable, [sys.executable, "-m", "mgmt.upwatch", "--handover-fd", str(fd)])
    except OSError:
        if lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.set_inheritable(lock_fd, False)
        os.close(fd)
        raise


if __name__ == "__main__":
    sys.exit(main())
