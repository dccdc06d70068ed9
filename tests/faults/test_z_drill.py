"""The fault drill: under a steady stream of sign and issue requests, kill -9 in turn
nats-server, the broker, crypto-hsm0 and the CA service of a `kmsctl up` stack, which
restarts each. Clients retry with the same request id; the drill asserts that errors
were seen only while something was down and only of retryable kinds, that every
request eventually succeeded, that no serial was issued twice nor a certificate left
without its record, and that the audit chain still verifies. Runs last in the package:
it leaves the stack's parts restarted, not pristine.

"While something was down" is measured, not assumed: a part is down from its kill
until, after kmsctl up restarted it, three signs and three issues that began after
the restart have succeeded. Every failed attempt must have been in flight during such
a window. There is no bound on the drill's total time: every wait below polls for its
condition with a generous deadline, and speed belongs in bench/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from edgekms.errors import KMSError
from mgmt.client import RETRYABLE
from tests.e2e.conftest import BIN, KmsStack
from tests.faults.conftest import new_csr

# Long enough for any restart (the supervisor's backoff, a broker reconnecting).
OP_DEADLINE = 90.0
TARGETS = ("nats", "broker", "crypto-hsm0", "ca")
WARM_UP = 60.0  # for the first ten successes
RESTART = 60.0  # for kmsctl up to restart a killed part
RECOVER = 90.0  # for the restarted part to serve signs and issues again
ATTEMPT = 3.0  # each attempt's gRPC deadline
# The waits above, each at its limit, plus the workers' last attempts and the checks.
pytestmark = pytest.mark.timeout(
    int(WARM_UP + len(TARGETS) * (RESTART + RECOVER) + OP_DEADLINE + 10 + 120)
)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    signed: int = 0
    # (kind, code, reason, attempt began, attempt ended), monotonic seconds
    errors: list[tuple[str, str, str, float, float]] = field(default_factory=list)
    # (kind, attempt began) of every success
    successes: list[tuple[str, float]] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)


def _pid(stack: KmsStack, target: str) -> int:
    state = stack.state()
    if target == "nats":
        return int(str(state["nats_pid"]))
    children = state["children"]
    assert isinstance(children, dict)
    return int(children[target])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _worker(stack: KmsStack, index: int, stop: threading.Event, tally: Tally) -> None:
    with stack.client(timeout=ATTEMPT) as client:
        step = 0
        while not stop.is_set():
            step += 1
            rid = uuid.uuid4().hex
            csr = new_csr(f"drill-{index}-{step}") if step % 2 == 0 else b""
            give_up = time.monotonic() + OP_DEADLINE
            kind = "issue" if csr else "sign"
            while True:
                began = time.monotonic()
                try:
                    if csr:
                        # Every retry carries the same request id and body.
                        issued = client.issue_certificate("device", csr, request_id=rid)
                        with tally.lock:
                            tally.serials.append(issued.record.serial)
                    else:
                        client.sign("drill", f"{index}-{step}".encode())
                        with tally.lock:
                            tally.signed += 1
                    with tally.lock:
                        tally.ok += 1
                        tally.successes.append((kind, began))
                    break
                except KMSError as err:
                    ended = time.monotonic()
                    with tally.lock:
                        tally.errors.append((kind, err.code_name, err.reason, began, ended))
                    if time.monotonic() > give_up:
                        with tally.lock:
                            tally.gave_up.append(f"{err.code_name} {err.reason}")
                        break
                    time.sleep(0.1)
            time.sleep(0.02)


def _wait_progress(tally: Tally, more: int, timeout: float) -> None:
    with tally.lock:
        goal = tally.ok + more
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with tally.lock:
            if tally.ok >= goal:
                return
        time.sleep(0.1)
    raise AssertionError(f"no progress: {tally.ok} ok, last errors {tally.errors[-5:]}")


def _wait_recovered(tally: Tally, since: float, timeout: float) -> float:
    """Poll until three signs and three issues that began at or after `since` have
    succeeded; returns when that was seen (the end of the part's down window)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with tally.lock:
            kinds = [kind for kind, began in tally.successes if began >= since]
        if kinds.count("sign") >= 3 and kinds.count("issue") >= 3:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"not recovered: {tally.ok} ok, last errors {tally.errors[-5:]}")


def test_kill_9_each_part_under_load(fault_stack: KmsStack) -> None:
    with fault_stack.client() as client:
        client.create_key("drill", "ec-p256")
        records_before = {r.serial for r in client.list_certificates()}
    stop = threading.Event()
    tally = Tally()
    workers = [
        threading.Thread(target=_worker, args=(fault_stack, i, stop, tally)) for i in range(3)
    ]
    for worker in workers:
        worker.start()
    errors_during: dict[str, int] = {}
    down: dict[str, tuple[float, float]] = {}  # target: (killed, recovered)
    try:
        _wait_progress(tally, 10, WARM_UP)
        for target in TARGETS:
            pid = _pid(fault_stack, target)
            with tally.lock:
                errors_before = len(tally.errors)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + RESTART
            while time.monotonic() < deadline:
                new = _pid(fault_stack, target)
                if new != pid and _alive(new):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"kmsctl up did not restart {target}")
            assert fault_stack.process.poll() is None, "kmsctl up itself stopped"
            # Restarted and reconnected: signs and issues succeed again.
            recovered = _wait_recovered(tally, time.monotonic(), RECOVER)
            down[target] = (killed, recovered)
            with tally.lock:
                errors_during[target] = len(tally.errors) - errors_before
    finally:
        stop.set()
        for worker in workers:
            worker.join(OP_DEADLINE + 10)

    assert not any(w.is_alive() for w in workers)
    assert tally.gave_up == [], tally.gave_up
    # A dead broker refuses every connection. The other kills may go unseen: nats-py
    # holds requests through a quick bus restart, and a crypto or CA kill can fall
    # between requests; so only the broker's is required to show errors.
    assert errors_during["broker"] > 0, errors_during
    kinds = {code for _, code, _, _, _ in tally.errors}
    assert kinds <= RETRYABLE, sorted({(code, reason) for _, code, reason, _, _ in tally.errors})
    # Only while a part was down: every failed attempt overlaps a down window.
    outside = [
        (kind, code, reason)
        for kind, code, reason, began, ended in tally.errors
        if not any(began <= recovered and ended >= killed for killed, recovered in down.values())
    ]
    assert outside == [], outside

    assert len(tally.serials) == len(set(tally.serials)), "a serial was issued twice"
    with fault_stack.client() as client:
        records = [r for r in client.list_certificates() if r.serial not in records_before]
        assert client.sign("drill", b"after the drill")
    stored = [r.serial for r in records]
    assert len(stored) == len(set(stored))
    # Every issued certificate has its record, and retries made no extra ones.
    assert sorted(stored) == sorted(tally.serials)
    assert tally.ok > 40

    verify = subprocess.run(
        [
            str(BIN / "kmsctl"),
            "audit",
            "verify",
            "-o",
            "json",
            "--config",
            str(fault_stack.client_config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=fault_stack.env(),
    )
    report = json.loads(verify.stdout)
    assert verify.returncode == 0, report.get("problems")
    # Every signature handed out was recorded first (CA calls are the CA's to record).
    assert report["entries"] >= tally.signed, (report, tally.signed)
