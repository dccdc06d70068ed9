"""The lean watcher of `kmsctl up` (mgmt.upwatch), driven as `kmsctl up` drives it: a
process spawns its children, then os.execv's the watcher with the handover, and the
watcher restarts, reports and stops them. The children here are small Python programs
(a "service" that logs its signals, a "nats-server" that listens on a port), so each
rule is checked in seconds; the real stack goes through the same code in
tests/e2e/test_embedded_stack.py and tests/e2e/test_stack_lock.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mgmt.cli.common import ExitCode
from mgmt.natsserver import free_port
from mgmt.upwatch import (
    EXIT_UNAVAILABLE,
    FATAL_EXIT_CODES,
    MAX_RESTARTS,
    RESTART_WINDOW,
    WatchError,
    plan_restart,
)
from tests.conftest import SLOWDOWN

# A service: says it started, logs SIGTERM with its name, exits `code` after `life`
# seconds (never, if negative).
SERVICE = """
import os, signal, sys, time
name, code, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def term(*_):
    print(f"{name} got SIGTERM {time.monotonic()}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print(f"{name} up {os.getpid()}", flush=True)
start = time.monotonic()
while life < 0 or time.monotonic() - start < life:
    time.sleep(0.05)
sys.exit(code)
"""

NATS = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
while True:
    time.sleep(1)
"""

# Spawns the children as mgmt.stack does (subprocess, own session), then becomes the
# watcher exactly as `kmsctl up` does (mgmt.upwatch.exec_watcher), holding a lock fd.
DRIVER = """
import fcntl, json, os, signal, subprocess, sys
from mgmt.upwatch import exec_watcher
spec = json.loads(sys.argv[1])
def start(p):
    with open(p["log"], "ab") as log:
        return subprocess.Popen(p["argv"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True).pid
children = [{**c, "pid": start(c), "env": None} for c in spec["children"]]
nats = {**spec["nats"], "pid": start(spec["nats"])}
lock = os.open(spec["lock"], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(lock, str(os.getpid()).encode())
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
state = {"ready": True, "data_dir": spec["dir"], "pid": os.getpid(),
         "children": {c["name"]: c["pid"] for c in children}, "nats_pid": nats["pid"],
         "swtpm_pid": None}
with open(spec["state"], "w") as f:
    json.dump(state, f, indent=2)
exec_watcher({
    "state": state,
    "state_file": spec["state"], "logs_dir": spec["logs"],
    "log_max_bytes": 1 << 20, "log_backups": 1,
    "children": children,
    "nats": {"proc": nats, "host": "127.0.0.1", "port": spec["port"]},
    "swtpm": None, "pointers": [spec["pointer"]], "log_level": "info", "log_format": "json",
}, lock)
"""


class Run:
    """One driven watcher and its directory."""

    def __init__(self, tmp: Path, children: list[tuple[str, int, float]], **extra: Any):
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.state_file = tmp / "state.json"
        self.pointer = tmp / "pointer.json"
        self.pointer.write_text("{}")
        self.lock = tmp / "up.lock"
        port = free_port()
        spec = {
            "dir": str(tmp),
            "state": str(self.state_file),
            "logs": str(self.logs),
            "pointer": str(self.pointer),
            "lock": str(self.lock),
            "port": port,
            "children": [
                {
                    "name": name,
                    # The last argument (ignored) marks the process as this test's.
                    "argv": [sys.executable, "-c", SERVICE, name, str(code), str(life), str(tmp)],
                    "log": str(self.logs / f"{name}.log"),
                    **extra.get(name, {}),
                }
                for name, code, life in children
            ],
            "nats": {
                "name": "nats",
                "argv": [sys.executable, "-c", NATS, str(port), str(tmp)],
                "log": str(self.logs / "nats.log"),
            },
        }
        self.out = tmp / "watcher.out"
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", DRIVER, json.dumps(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def state(self) -> dict[str, Any]:
        try:
            found = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def wait_state(self, check: Any, seconds: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds * SLOWDOWN
        while time.monotonic() < deadline:
            state = self.state()
            if state and check(state):
                return state
            assert self.process.poll() is None, self.out.read_text()
            time.sleep(0.05)
        raise AssertionError(f"state never matched: {self.state()}\n{self.out.read_text()}")

    def wait_exit(self, seconds: float = 60.0) -> int:
        try:
            return self.process.wait(seconds * SLOWDOWN)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        """Whatever the outcome: the watcher killed, and every process it or the driver
        started (their command lines name this test's directory)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        marker = str(self.tmp).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in argv and int(entry.name) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """The test's driven watchers, each cleaned up after the test, pass or fail (a
    failed assertion must leave no watcher or child running on the machine)."""
    started: list[Run] = []
    yield started
    for run in started:
        run.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""


def _blocks_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            # Not the everything-blocked moment of subprocess's own vfork.
            return bool(mask & (1 << (signal.SIGTERM - 1))) and not mask & (
                1 << (signal.SIGHUP - 1)
            )
    return False


def test_restarts_children_and_nats_then_stops_all_in_reverse_order(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, [("crypto-hsm0", 0, -1), ("broker", 0, -1)])
    runs.append(run)
    first = run.wait_state(lambda s: "broker" in s.get("children", {}))
    assert first["pid"] == run.process.pid and first["ready"] is True
    written = run.state_file.stat().st_mtime_ns
    deadline = time.monotonic() + 30 * SLOWDOWN
    while "lean watcher took over" not in run.out.read_text():
        assert time.monotonic() < deadline, run.out.read_text()
        time.sleep(0.05)
    cmdline = Path(f"/proc/{run.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"mgmt.upwatch" in cmdline  # the same pid, now the watcher
    # The hand-over rewrites nothing (a second `up` checks that nothing changed).
    assert run.state_file.stat().st_mtime_ns == written
    os.kill(first["children"]["broker"], signal.SIGKILL)
    os.kill(first["nats_pid"], signal.SIGKILL)
    restarted = run.wait_state(
        lambda s: (
            s["children"]["broker"] != first["children"]["broker"]
            and s["nats_pid"] != first["nats_pid"]
        )
    )
    assert restarted["children"]["crypto-hsm0"] == first["children"]["crypto-hsm0"]
    assert _alive(restarted["children"]["broker"]) and _alive(restarted["nats_pid"])
    deadline = time.monotonic() + 30 * SLOWDOWN
    while run.log("broker").count("broker up") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"broker up {restarted['children']['broker']}" in run.log("broker")
    # A restarted child holds none of the watcher's descriptors (the data dir's lock
    # above all: a child holding it would keep the data dir locked after us).
    fd_dir = Path(f"/proc/{restarted['children']['broker']}/fd")
    held = {fd: os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
    assert sorted(held) == ["0", "1", "2"], held
    run.process.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0, run.out.read_text()
    out = run.out.read_text()
    assert out.rstrip().endswith("EdgeKMS stopped."), out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    restarted_parts = [e.get("part") for e in events if e["msg"] == "child exited; restarting"]
    assert restarted_parts == ["broker"]
    assert any(e["msg"] == "nats-server exited; restarting" for e in events)
    # Reverse start order: the broker ended before crypto-hsm0.
    ended = {
        name: float(run.log(name).split("got SIGTERM ")[-1].split()[0])
        for name in ("broker", "crypto-hsm0")
    }
    assert ended["broker"] <= ended["crypto-hsm0"]
    final = run.state()
    assert final["ready"] is False
    pids = [*final["children"].values(), final["nats_pid"]]
    assert not any(_alive(p) for p in pids)
    assert not run.pointer.exists()  # the discovery pointer withdrawn
    assert run.lock.read_text() == ""  # the lock file's pid cleared, the flock gone


def test_a_fatal_exit_code_stops_the_stack_with_its_reason(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, [("crypto-hsm0", 0, -1), ("broker", 3, 1.0)])
    runs.append(run)
    code = run.wait_exit()
    out = run.out.read_text()
    assert code == EXIT_UNAVAILABLE == ExitCode.UNAVAILABLE, out
    assert "kmsctl: broker stopped: token refused (PIN or token missing)" in out
    assert "EdgeKMS stopped." not in out
    final = run.state()
    assert final["ready"] is False
    assert not _alive(final["children"]["crypto-hsm0"])
    assert "crypto-hsm0 got SIGTERM" in run.log("crypto-hsm0")


def test_a_child_dying_too_often_stops_the_stack(tmp_path: Path, runs: list[Run]) -> None:
    # The restarts of the last minute travel in the handover, as from the supervisor.
    recent = [time.monotonic() - 1.0] * MAX_RESTARTS
    run = Run(
        tmp_path,
        [("crypto-hsm0", 1, 0.5), ("broker", 0, -1)],
        **{"crypto-hsm0": {"restarts": recent}},
    )
    runs.append(run)
    code = run.wait_exit()
    out = run.out.read_text()
    assert code == EXIT_UNAVAILABLE, out
    assert f"kmsctl: crypto-hsm0 died {MAX_RESTARTS} times in 60s: crypto-hsm0 up" in out
    assert not _alive(run.state()["children"]["broker"])


def test_a_signal_sent_during_the_hand_over_is_not_lost(tmp_path: Path, runs: list[Run]) -> None:
    """SIGTERM before the watcher runs its loop (blocked across the exec): it stops."""
    run = Run(tmp_path, [("broker", 0, -1)])
    runs.append(run)
    # As soon as the driver blocks SIGTERM, just before its exec: the signal lands
    # in the driver, in the exec, or in the watcher before its loop.
    deadline = time.monotonic() + 30 * SLOWDOWN
    while not _blocks_sigterm(run.process.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _blocks_sigterm(run.process.pid)
    run.process.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0, run.out.read_text()
    assert "EdgeKMS stopped." in run.out.read_text()
    assert not _alive(run.state()["children"]["broker"])


def test_the_watcher_is_only_started_by_kmsctl_up() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mgmt.upwatch"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "started by `kmsctl up` only" in done.stderr


def test_the_restart_rule_both_supervisors_share() -> None:
    """plan_restart, the one rule of the watcher and of mgmt.stack's own loop: a backoff
    that doubles from 0.5 s, MAX_RESTARTS deaths within RESTART_WINDOW end the stack
    naming the child's last log line, restarts older than the window are forgotten, and
    a fatal exit code ends it at once."""
    restarts: list[float] = []
    delays = [plan_restart("broker", 1, restarts, lambda: "boom") for _ in range(MAX_RESTARTS)]
    assert delays == [min(0.5 * 2**i, 10.0) for i in range(MAX_RESTARTS)]
    assert len(restarts) == MAX_RESTARTS
    with pytest.raises(WatchError, match=f"broker died {MAX_RESTARTS} times.*boom"):
        plan_restart("broker", 1, restarts, lambda: "boom")
    restarts[:] = [time.monotonic() - RESTART_WINDOW - 1] * MAX_RESTARTS
    assert plan_restart("broker", 1, restarts, lambda: "") == 0.5
    assert len(restarts) == 1
    fatal = next(iter(FATAL_EXIT_CODES))
    with pytest.raises(WatchError, match=FATAL_EXIT_CODES[fatal]):
        plan_restart("crypto-hsm0", fatal, [], lambda: "")
