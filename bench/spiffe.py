"""SPIFFE at the agent: X.509-SVIDs minted per second (a new workload to its SVID), and
what a rotation costs with 100 workloads registered on one device.

A stack of its own (`kmsctl up`), a mini-CA, the trust domain, one enrolled device and
its `kmsctl spiffe agent`. Minting: N entries for this (root) process, so one
FetchX509SVID makes the agent mint N SVIDs (key on the device, CSR, the KMS's signature
in the token) before it answers: SVIDs per second = N / time to the first answer. Then
a fresh workload's latency, connection to first SVID, for an entry minted on demand.
Rotation: 100 entries with a 40 s TTL, all minted, then the agent's own
`spiffe_rotation_pass` log line (renewed, seconds) at half their lifetime: the wall time
of renewing 100 SVIDs in one pass, and the agent's CPU seconds over that pass.
`python -m bench.spiffe` prints JSON; on a shared 2-core machine the figures are
loaded ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TD = "bench.arpa"
DEVICE = "bench-device"


def _kmsctl(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args], env=env, check=True, capture_output=True, text=True,
        timeout=300,
    ).stdout  # fmt: skip


def _enroll(env: dict[str, str], work: Path, enroll_address: str) -> Path:
    token = work / "device.token"
    made = json.loads(
        _kmsctl(env, "enroll", "token", "create", DEVICE, "--profile", "device",
                "--token-out", str(token), "-o", "json")
    )  # fmt: skip
    _kmsctl(env, "enroll", "--server", enroll_address, "--token", str(token),
            "--fingerprint", made["fingerprint"], "--out-dir", str(work / "device"))  # fmt: skip
    return work / "device" / "config.toml"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_answer(socket_path: Path, timeout: float = 300) -> tuple[float, int]:
    """(seconds from a fresh connection to the first FetchX509SVID answer, SVIDs in it),
    from a separate process with the Workload API's own stubs (py-spiffe's generated
    code, without its certificate parsing, which is the client's cost, not the agent's)."""
    code = (
        "import sys, time, grpc\n"
        "from spiffe._proto import workload_pb2 as w, workload_pb2_grpc as g\n"
        "t = time.monotonic()\n"
        "stub = g.SpiffeWorkloadAPIStub(grpc.insecure_channel('unix:' + sys.argv[1]))\n"
        "stream = stub.FetchX509SVID(w.X509SVIDRequest(),"
        " metadata=(('workload.spiffe.io', 'true'),), timeout=300)\n"
        "first = next(stream)\n"
        "print(time.monotonic() - t, len(first.svids))\n"
        "stream.cancel()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(socket_path)],
        check=True, capture_output=True, text=True, timeout=timeout,
    ).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1])


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("msg") == name:
                found.append(entry)
    return found


def run(mint_count: int, rotate_count: int) -> dict[str, Any]:
    from bench import stackrun

    work = Path(tempfile.mkdtemp(prefix="edgekms-spiffe-bench-"))
    agent = None
    stack = stackrun.start(work / "data")
    try:
        env = {**os.environ, "EDGEKMS_DATA_DIR": str(stack.data_dir)}
        _kmsctl(env, "ca", "init", "--name", "Bench CA")
        _kmsctl(env, "spiffe", "init", "--trust-domain", TD)
        state = json.loads((stack.data_dir / "run" / "state.json").read_text())
        device = _enroll(env, work, str(state["enroll"]))
        exe = os.path.realpath(sys.executable)
        from mgmt.client import KMSClient

        admin = KMSClient.from_config(stack.client_config, timeout=60)
        for i in range(mint_count):
            admin.spiffe_create_entry(
                f"spiffe://{TD}/mint/{i}", DEVICE, ["unix:uid:0", f"unix:path:{exe}"]
            )
        socket_path = work / "run" / "workload.sock"
        log = work / "agent.log"
        with log.open("ab") as out:
            agent = subprocess.Popen(
                [str(BIN / "kmsctl"), "spiffe", "agent", "--client-config", str(device),
                 "--socket", f"unix://{socket_path}", "--sync-interval", "1"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not _events(log, "spiffe_synced") and time.monotonic() < deadline:
            time.sleep(0.1)
        mint_seconds, minted = _first_answer(socket_path)
        again_seconds, _ = _first_answer(socket_path)  # all held now: served from memory

        for i in range(rotate_count):
            admin.spiffe_create_entry(
                f"spiffe://{TD}/rot/{i}", DEVICE, ["unix:uid:0", "unix:gid:0"], ttl_seconds=40
            )
        admin.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            synced = _events(log, "spiffe_synced")
            if synced and int(synced[-1]["entries"]) == mint_count + rotate_count:
                break
            time.sleep(0.2)
        held_seconds, held = _first_answer(socket_path)
        cpu_before = _cpu_seconds(agent.pid)
        deadline = time.monotonic() + 120
        passes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            # Only the 40 s entries rotate within the run (the others live an hour).
            passes = _events(log, "spiffe_rotation_pass")
            if sum(int(p["renewed"]) for p in passes) >= rotate_count:
                break
            time.sleep(0.2)
        cpu_after = _cpu_seconds(agent.pid)
        renewed = sum(int(p["renewed"]) for p in passes)
        pass_count = len(passes)
        seconds = sum(float(p["seconds"]) for p in passes)
        return {
            "mint": {
                "svids": minted,
                "seconds": round(mint_seconds, 3),
                "svids_per_second": round(minted / mint_seconds, 1),
                "held_answer_seconds": round(again_seconds, 4),
            },
            "rotation": {
                "workloads_registered": held,
                "first_answer_seconds": round(held_seconds, 3),
                "renewed": renewed,
                "passes": pass_count,
                "pass_seconds": round(seconds, 3),
                "ms_per_svid": round(1000 * seconds / renewed, 1) if renewed else None,
                "agent_cpu_seconds_during": round(cpu_after - cpu_before, 2),
            },
            "machine": "shared 2-core machine, loaded by other work",
        }
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def listing(entries: int, nodes: int = 50, writers: int = 8) -> dict[str, Any]:
    """`entry list` over a CA holding `entries` registration entries on `nodes` nodes:
    the first page (1000) and the whole listing of all of them, then one node's. Each
    page reads the entries' keys without values and unseals only its own 1000."""
    import concurrent.futures

    from bench import stackrun
    from mgmt.client import KMSClient

    work = Path(tempfile.mkdtemp(prefix="edgekms-spiffe-list-"))
    stack = stackrun.start(work / "data")
    try:
        env = {**os.environ, "EDGEKMS_DATA_DIR": str(stack.data_dir)}
        _kmsctl(env, "ca", "init", "--name", "Bench CA")
        _kmsctl(env, "spiffe", "init", "--trust-domain", TD)

        def create(first: int) -> None:
            with KMSClient.from_config(stack.client_config, timeout=60) as kms:
                for i in range(first, entries, writers):
                    kms.spiffe_create_entry(
                        f"spiffe://{TD}/w/{i}", f"node-{i % nodes}", [f"unix:uid:{i % 60000}"]
                    )

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(writers) as pool:
            list(pool.map(create, range(writers)))
        created = time.monotonic() - started
        out: dict[str, Any] = {"entries": entries, "create_seconds": round(created, 1)}
        with KMSClient.from_config(stack.client_config, timeout=120) as kms:
            for name, node in (("all", ""), ("one_node", "node-7")):
                started = time.monotonic()
                listed = kms.spiffe_iter_entries(node=node)
                next(listed)
                first = time.monotonic() - started
                count = 1 + sum(1 for _ in listed)
                out[name] = {
                    "listed": count,
                    "first_page_seconds": round(first, 3),
                    "all_seconds": round(time.monotonic() - started, 3),
                }
        out["machine"] = "shared 2-core machine, loaded by other work"
        return out
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    import signal

    # A SIGTERM ends the run through its finally: the stack and the agent are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mint", type=int, default=20, help="entries minted at once")
    parser.add_argument("--rotate", type=int, default=100, help="workloads that rotate")
    parser.add_argument(
        "--listing", type=int, default=0, metavar="N",
        help="instead: time `entry list` over N registration entries (not part of make bench)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.listing:
        print(json.dumps(listing(args.listing), indent=1))
        return
    print(json.dumps(run(args.mint, args.rotate), indent=1))


if __name__ == "__main__":
    main()
