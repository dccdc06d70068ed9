"""One stack per data dir (issue 14, item 1): a second `kmsctl up` on a live data dir, or
one whose port something else holds, is refused before it starts or writes anything;
the data dir of a supervisor killed with SIGKILL is taken over, its leftover children
ended, and an unrelated process whose pid happens to be in the old state file is left
alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mgmt.natsserver import free_port, free_port_pair
from mgmt.stacklock import reap_orphans
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the data dir that a second start could rewrite, with its mtime
    (the JetStream store and the logs change on their own while the stack runs)."""
    found = {}
    for part in ("config", "run", "client", "pki", "secrets", "softhsm"):
        for path in (root / part).rglob("*"):
            if path.is_file():
                found[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def _up(data_dir: Path, nats_port: int, broker: str, ca_http: str) -> list[str]:
    return [
        str(BIN / "kmsctl"),
        "up",
        "--data-dir",
        str(data_dir),
        "--nats-port",
        str(nats_port),
        "--broker-listen",
        broker,
        "--ca-http",
        ca_http,
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_second_up_on_a_live_data_dir_is_refused_and_changes_nothing(
    kms_stack: KmsStack,
) -> None:
    before = _snapshot(kms_stack.data_dir)
    state_before = kms_stack.state()
    nats_port = int(kms_stack.nats_url.rpartition(":")[2])
    ca_http = kms_stack.ca_url.removeprefix("http://")
    for argv in (
        # The same ports as the running stack, then ports of its own: the lock refuses both.
        _up(kms_stack.data_dir, nats_port, kms_stack.broker, ca_http),
        _up(
            kms_stack.data_dir,
            free_port(),
            f"127.0.0.1:{free_port_pair()}",
            f"127.0.0.1:{free_port()}",
        ),
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60 * SLOWDOWN)
        assert result.returncode == 6, result.stderr
        assert "kmsctl: stack.already_running:" in result.stderr
        assert f"pid {kms_stack.process.pid}" in result.stderr
        assert "EdgeKMS is up" not in result.stderr
    assert _snapshot(kms_stack.data_dir) == before
    assert kms_stack.state() == state_before
    with kms_stack.client() as client:
        assert client.status().ok


def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            _up(data_dir, free_port(), f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"),
            capture_output=True,
            text=True,
            timeout=60 * SLOWDOWN,
        )
    assert result.returncode == 6, result.stderr
    assert "kmsctl: stack.port_in_use:" in result.stderr
    assert f"127.0.0.1:{port} (--broker-listen)" in result.stderr
    # Nothing was started or made but the (released) lock file.
    assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")) == [
        "run",
        "run/up.lock",
    ]
    assert (data_dir / "run" / "up.lock").read_text() == ""


def test_a_killed_supervisors_data_dir_is_taken_over_safely(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = start_stack(data_dir)
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        with stack.client() as client:
            client.create_key("lock/p256", "ec-p256")
            signature = client.sign("lock/p256", b"before the kill")
        state = stack.state()
        children = state["children"]
        assert isinstance(children, dict)
        leftovers = [int(p) for p in children.values()] + [int(str(state["nats_pid"]))]
        stack.process.send_signal(signal.SIGKILL)
        stack.process.wait()
        # The children run on in their own sessions, holding the ports and the store.
        assert all(_alive(p) for p in leftovers)
        # A pid the kernel gave to an unrelated process since must not be touched.
        children["not-ours"] = bystander.pid
        # (Left "ready" by the killed supervisor; the new one deletes it once it holds
        # the lock, but start_stack below could read it before that.)
        state["ready"] = False
        (data_dir / "run" / "state.json").write_text(json.dumps(state))

        nats_port = int(stack.nats_url.rpartition(":")[2])
        ca_http = stack.ca_url.removeprefix("http://")
        again = start_stack(
            data_dir,
            "--nats-port",
            str(nats_port),
            "--broker-listen",
            stack.broker,
            "--ca-http",
            ca_http,
        )
        try:
            assert _wait_gone(leftovers, 30) == []
            assert bystander.poll() is None
            assert (data_dir / "run" / "up.lock").read_text().strip() == str(again.process.pid)
            assert again.state()["pid"] == again.process.pid
            log = again.log_path.read_text()
            assert "took over the data dir of a stopped supervisor" in log
            with again.client() as client:
                assert client.verify("lock/p256", b"before the kill", signature)
                client.sign("lock/p256", b"after the takeover")
        finally:
            assert stop_stack(again) == 0
    finally:
        bystander.kill()
        bystander.wait()
        if stack.process.poll() is None:
            stop_stack(stack)
    assert (data_dir / "run" / "up.lock").read_text() == ""


def test_make_run_passes_the_data_dir_and_ports() -> None:
    """`make run` reads EDGEKMS_DATA_DIR as kmsctl does (DATA_DIR still works) and takes
    the ports; -n prints the command without running the set-up or the stack."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "EDGEKMS_DATA_DIR")}
    result = subprocess.run(
        ["make", "-s", "-n", "run", "NATS_PORT=14222", "BROKER_LISTEN=127.0.0.1:18443"],
        cwd=root,
        env={**env, "EDGEKMS_DATA_DIR": "/srv/kms", "CA_HTTP": "127.0.0.1:18180"},
        capture_output=True,
        text=True,
        check=True,
    )
    command = " ".join(result.stdout.replace("\\\n", " ").split())
    assert (
        "kmsctl up --data-dir /srv/kms --nats-port 14222 --broker-listen 127.0.0.1:18443 "
        "--ca-http 127.0.0.1:18180" in command
    )
    legacy = subprocess.run(
        ["make", "-s", "-n", "run", "DATA_DIR=/srv/old"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--data-dir /srv/old " in legacy.stdout


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--broker-listen", "8443", "stack.listen_invalid"),
        ("--ca-http", "127.0.0.1:http", "stack.listen_invalid"),
        # TEST-NET-1: no interface here has it, so nothing could listen there.
        ("--ca-http", "192.0.2.1:8180", "stack.port_unusable"),
    ],
)
def test_a_listen_address_that_cannot_be_used_is_refused_first(
    tmp_path: Path, option: str, value: str, reason: str
) -> None:
    data_dir = tmp_path / "data"
    argv = _up(data_dir, free_port(), f"127.0.0.1:{free_port_pair()}", f"127.0.0.1:{free_port()}")
    result = subprocess.run(
        [*argv, option, value], capture_output=True, text=True, timeout=60 * SLOWDOWN
    )
    assert result.returncode == 6, result.stderr
    assert result.stderr.startswith(f"kmsctl: {reason}: ")
    assert option in result.stderr
    assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")) == [
        "run",
        "run/up.lock",
    ]


def test_two_ups_started_at_once_on_one_data_dir_give_one_stack(tmp_path: Path) -> None:
    """Two `kmsctl up` launched together on a fresh data dir (a doubled systemd unit, a
    script run twice): exactly one runs the stack, the other is refused with the pid of
    the first, and the stack the winner made is whole (its ceremony not interleaved with
    another's)."""
    data_dir = tmp_path / "data"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    processes: list[tuple[subprocess.Popen[bytes], Path, str]] = []
    try:
        for name in ("first", "second"):
            broker = f"127.0.0.1:{free_port_pair()}"
            argv = [
                *_up(data_dir, free_port(), broker, f"127.0.0.1:{free_port()}"),
                "--start-timeout",
                str(30.0 * SLOWDOWN),
            ]
            log_path = tmp_path / f"{name}-up.log"
            with open(log_path, "wb") as log_file:
                processes.append(
                    (
                        subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                        log_path,
                        broker,
                    )
                )
        # The loser gives up at once; the winner runs on.
        deadline = time.monotonic() + 60 * SLOWDOWN
        while all(p.poll() is None for p, _, _ in processes):
            assert time.monotonic() < deadline, "neither `kmsctl up` was refused"
            time.sleep(0.05)
        loser = next(entry for entry in processes if entry[0].poll() is not None)
        winner = next(entry for entry in processes if entry is not loser)
        loser_output = loser[1].read_text()
        assert loser[0].returncode == 6, loser_output
        assert "kmsctl: stack.already_running:" in loser_output
        assert f"pid {winner[0].pid}" in loser_output
        assert "EdgeKMS is up" not in loser_output

        state_file = data_dir / "run" / "state.json"
        # Ready in its state file, and said so on its console (written just after).
        while not (
            state_file.exists()
            and json.loads(state_file.read_text() or "{}").get("ready")
            and "EdgeKMS is up" in winner[1].read_text()
        ):
            assert winner[0].poll() is None, winner[1].read_text()[-3000:]
            assert time.monotonic() < deadline, winner[1].read_text()[-3000:]
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        assert state["pid"] == winner[0].pid and state["broker"] == winner[2]
        assert (data_dir / "run" / "up.lock").read_text().strip() == str(winner[0].pid)
        assert winner[1].read_text().count("EdgeKMS is up") == 1
        stack = KmsStack(data_dir, str(state["nats_url"]), winner[2], winner[0], winner[1])
        with stack.client() as client:
            client.create_key("lock/race", "ec-p256")
            assert client.verify("lock/race", b"one stack", client.sign("lock/race", b"one stack"))
        assert stop_stack(stack) == 0
    finally:
        for process, _, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        reap_orphans(data_dir)  # what a killed winner left running
