"""`python -m bench.stackmem`: the resident memory of a whole stack, process by process.

The board (an STM32MP157 DK2) has 512 MB of RAM; issue 13 asks what the stack occupies on
ARM. This starts the stack as a user does (`kmsctl up` with SoftHSM and swtpm, see
bench.stackrun), signs through the broker with a SoftHSM and a TPM key so every part has
done real work, and records each process's VmRSS and PSS (bench.procs), idle after start
and again after the signing; then, for the board's target (issue 19: the stack ≤ 150 MB
PSS with the load running), a Sign load and a certificate-issuance load side by side for
--load-seconds while every process's RSS and PSS is sampled (bench.procs.PssWatch).
`--embedded` measures `kmsctl up --embedded` (the broker and the CA in one process).
scripts/test-arm.sh runs it (without the load) inside the armhf root under qemu-user and
natively; docs/arm.md says how to read the two side by side (qemu's own
memory is inside every emulated process's figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stackrun
from bench.procs import PssWatch, pss_kb, rss_kb


def _sample(pids: dict[str, int]) -> dict[str, dict[str, int]]:
    return {name: {"rss_kb": rss_kb(pid), "pss_kb": pss_kb(pid)} for name, pid in pids.items()}


def _versions() -> dict[str, str]:
    """The versions this ran on: they are the point of the measurement."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("grpcio", "protobuf", "cryptography", "python-pkcs11", "tpm2-pytss", "nats-py"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "absent"
    return found


def floor_kb() -> dict[str, int]:
    """RSS of processes that do almost nothing: /bin/sleep and an idle `python3 -c`. Under
    qemu-user that is mostly the emulator itself (its code, translation cache and guest
    address-space bookkeeping), which is inside every emulated process's figure; natively
    it is the true floor. The difference between the two runs is the emulation's share."""
    import subprocess
    import sys

    found: dict[str, int] = {}
    for name, argv in (
        ("sleep", ["sleep", "60"]),
        ("python", [sys.executable, "-c", "import sys; sys.stdin.read()"]),
    ):
        process = subprocess.Popen(argv, stdin=subprocess.PIPE)
        try:
            time.sleep(3.0)  # let the process reach its idle state: a measurement
            found[name] = rss_kb(process.pid)
        finally:
            process.kill()
            process.wait()
    return found


def under_load(
    stack: stackrun.RunningStack,
    pids: dict[str, int],
    seconds: float,
    sign_inflight: int,
    issue_inflight: int,
) -> dict[str, Any]:
    """RSS and PSS of every process of the stack while a Sign load (SoftHSM P-256, the
    Python generator) and an issuance load (CSR to stored certificate) run together.
    Each load runs in spawned processes of its own, which are not counted."""
    import threading

    from bench import issuance
    from bench.load import run_load

    issuance._init_ca(stack.client_config)
    csrs = issuance.make_csrs(16)
    warmup = 2.0
    sign_spec = stack.sign_spec("stackmem/hsm0", "ec-p256", sign_inflight, seconds, warmup)
    issue_spec = issuance.IssueSpec(
        "edgekms", stack.broker, str(stack.data_dir), csrs, issue_inflight, seconds, warmup
    )
    outcomes: dict[str, Any] = {}

    def sign() -> None:
        outcomes["sign"] = run_load(sign_spec, 1, {}, generator="python")

    def issue() -> None:
        outcomes["issue"] = issuance.measure(issue_spec, {})[0]

    threads = [threading.Thread(target=sign), threading.Thread(target=issue)]
    for thread in threads:
        thread.start()
    # Both loads start 3 s after their spawn and measure after their warm-up.
    time.sleep(3.0 + warmup)
    watch = PssWatch(pids)
    watch.start()
    for thread in threads:
        thread.join()
    watch.stop()
    signed, issued = outcomes["sign"], outcomes["issue"]
    sums = watch.sums_pss_kb
    without_supervisor = [name for name in pids if name != "kmsctl-up"]
    return {
        "seconds": seconds,
        "sign_inflight": sign_inflight,
        "issue_inflight": issue_inflight,
        "signs_per_s": round(len(signed.latencies) / seconds, 1),
        "sign_errors": signed.errors,
        "issued_per_s": round(issued.rate, 1),
        "issue_errors": issued.errors,
        "peak_rss_kb": watch.peak_rss_kb,
        "peak_pss_kb": watch.peak_pss_kb,
        "pss_sum_peak_kb": max(sums),
        "pss_sum_mean_kb": round(sum(sums) / len(sums)),
        # The board runs the services from systemd units, without kmsctl up's supervisor.
        "pss_peak_sum_without_supervisor_kb": sum(
            watch.peak_pss_kb[name] for name in without_supervisor
        ),
        "samples": len(sums),
        # CPU seconds of each process inside the sampled window: what a memory setting
        # (GOGC, fewer processes) costs in work.
        "cpu_seconds": watch.cpu,
    }


def measure(
    work: Path,
    signs: int,
    embedded: bool = False,
    load_seconds: float = 20.0,
    sign_inflight: int = 16,
    issue_inflight: int = 4,
) -> dict[str, Any]:
    """Start a stack under `work`, sign `signs` times per provider, then run the loads;
    return the samples."""
    from mgmt.client import KMSClient

    extra = ("--embedded",) if embedded else ()
    stack = stackrun.start(work / "data", timeout=600.0, extra=extra)
    try:
        pids = stack.pids()
        time.sleep(2.0)  # let start-up garbage settle: this is a measurement, not a test
        idle = _sample(pids)
        with KMSClient.from_config(stack.client_config, timeout=120) as client:
            for provider in ("hsm0", "tpm0"):
                name = f"stackmem/{provider}"
                client.create_key(name, "ec-p256", provider=provider)
                for _ in range(signs):
                    client.sign(name, b"\x00" * 32)
        loaded = _sample(pids)
        loads = (
            under_load(stack, pids, load_seconds, sign_inflight, issue_inflight)
            if load_seconds > 0
            else None
        )
        return {
            "versions": _versions(),
            "embedded": embedded,
            "ready_seconds": round(stack.ready_seconds, 2),
            "signs_per_provider": signs,
            "floor_rss_kb": floor_kb(),
            "idle": idle,
            "after_signing": loaded,
            "under_load": loads,
        }
    finally:
        stack.stop()


def table(result: dict[str, Any]) -> str:
    """A Markdown table of one measurement, MB with one decimal."""
    lines = [
        "| process | idle RSS MB | idle PSS MB | after signing RSS MB | after signing PSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    idle, loaded = result["idle"], result["after_signing"]
    totals = [0, 0, 0, 0]
    for name in sorted(idle):
        row = [
            idle[name]["rss_kb"],
            idle[name]["pss_kb"],
            loaded[name]["rss_kb"],
            loaded[name]["pss_kb"],
        ]
        totals = [t + v for t, v in zip(totals, row, strict=True)]
        lines.append(f"| {name} | " + " | ".join(f"{v / 1024:.1f}" for v in row) + " |")
    lines.append("| **total** | " + " | ".join(f"**{v / 1024:.1f}**" for v in totals) + " |")
    load = result.get("under_load")
    if load:
        lines += [
            "",
            f"Under load ({load['seconds']:g} s: Sign SoftHSM P-256 at {load['sign_inflight']} "
            f"in flight, {load['signs_per_s']}/s; issuance at {load['issue_inflight']} in "
            f"flight, {load['issued_per_s']}/s; PSS sampled {load['samples']} times):",
            "",
            "| process | peak RSS MB | peak PSS MB | CPU s |",
            "|---|---:|---:|---:|",
        ]
        cpu = load.get("cpu_seconds", {})
        for name in sorted(load["peak_rss_kb"]):
            lines.append(
                f"| {name} | {load['peak_rss_kb'][name] / 1024:.1f} "
                f"| {load['peak_pss_kb'][name] / 1024:.1f} | {cpu.get(name, 0.0):.2f} |"
            )
        lines += [
            "",
            f"Stack PSS under load, peak of the sum: **{load['pss_sum_peak_kb'] / 1024:.1f} MB** "
            f"(mean {load['pss_sum_mean_kb'] / 1024:.1f} MB); sum of the peaks without "
            f"kmsctl up's supervisor: {load['pss_peak_sum_without_supervisor_kb'] / 1024:.1f} MB",
        ]
    floor = result.get("floor_rss_kb", {})
    if floor:
        lines.append("")
        lines.append(
            "Floor (RSS of an idle process): "
            + ", ".join(f"{name} {kb / 1024:.1f} MB" for name, kb in sorted(floor.items()))
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stackmem", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--label", default="", help="what this run is (arch, emulated or not)")
    parser.add_argument("--signs", type=int, default=20, help="signs per provider")
    parser.add_argument(
        "--embedded", action="store_true", help="kmsctl up --embedded: broker and CA in one"
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=20.0,
        help="measured load window; 0: no load (under qemu-user, scripts/test-arm.sh)",
    )
    parser.add_argument("--sign-inflight", type=int, default=16, help="Sign calls in flight")
    parser.add_argument("--issue-inflight", type=int, default=4, help="issuances in flight")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-stackmem-"))
    try:
        result = measure(
            work,
            args.signs,
            args.embedded,
            args.load_seconds,
            args.sign_inflight,
            args.issue_inflight,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["label"] = args.label
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"{args.label}: {json.dumps(result['versions'])}")
    print(table(result))


if __name__ == "__main__":
    main()
