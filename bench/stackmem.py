"""`python -m bench.stackmem`: the resident memory of a whole stack, process by process.

The board (an STM32MP157 DK2) has 512 MB of RAM; issue 13 asks what the stack occupies on
ARM. This starts the stack as a user does (`kmsctl up` with SoftHSM and swtpm, see
bench.stackrun), signs through the broker with a SoftHSM and a TPM key so every part has
done real work, and records each process's VmRSS and PSS (bench.procs), idle after start
and again after the signing. scripts/test-arm.sh runs it inside the armhf root under
qemu-user and natively; docs/arm.md says how to read the two side by side (qemu's own
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
from bench.procs import pss_kb, rss_kb


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


def measure(work: Path, signs: int) -> dict[str, Any]:
    """Start a stack under `work`, sign `signs` times per provider, return the samples."""
    from mgmt.client import KMSClient

    stack = stackrun.start(work / "data", timeout=600.0)
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
        return {
            "versions": _versions(),
            "ready_seconds": round(stack.ready_seconds, 2),
            "signs_per_provider": signs,
            "floor_rss_kb": floor_kb(),
            "idle": idle,
            "after_signing": loaded,
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-stackmem-"))
    try:
        result = measure(work, args.signs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["label"] = args.label
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"{args.label}: {json.dumps(result['versions'])}")
    print(table(result))


if __name__ == "__main__":
    main()
