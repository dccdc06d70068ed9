"""Where the time goes on the hot path: py-spy samples the broker and the crypto
service while the load generator holds 64 Signs in flight, and the collapsed stacks
become a per-function table (self time, and time inside each top-level layer).

`python -m bench.profile --inflight 1` profiles one level against a fresh stack of its own
and prints the tables (the 1-in-flight path is a different shape: every call wakes each
process on its own, nothing is shared between calls).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.load import run_load

if TYPE_CHECKING:
    from bench.stackrun import RunningStack

PROFILED = ("broker", "crypto-hsm0")
LOOP_SELF = "asyncio loop and select, self time"
# Layers a reader cares about, matched against "function (file)" frames of a stack.
LAYERS = {
    "grpc server (C core + aio glue)": ("grpc/_cython", "grpc/aio"),
    "protobuf": ("google/protobuf",),
    "nats client": ("nats/aio", "nats/micro", "nats/protocol"),
    "ssl": ("ssl.py",),
    "pkcs11 (token call)": ("pkcs11/", "sign (crypto_service/providers/pkcs11.py"),
    "logging": ("logging/",),
    "edgekms code": ("broker/", "crypto_service/", "edgekms/"),
}


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


Spies = dict[str, tuple["subprocess.Popen[bytes]", Path]]


def start_spies(
    binary: str,
    pids: Mapping[str, int],
    names: tuple[str, ...],
    out: Path,
    seconds: float,
    prefix: str = "",
) -> Spies:
    """py-spy recording each named process (those in `pids`) for `seconds`, raw stacks
    into OUT/<prefix><name>.collapsed.txt, without stopping it (--nonblocking)."""
    out.mkdir(parents=True, exist_ok=True)
    spies: Spies = {}
    for name in names:
        if name not in pids:
            continue
        target = out / f"{prefix}{name}.collapsed.txt"
        spies[name] = (
            subprocess.Popen(
                [binary, "record", "--pid", str(pids[name]), "--duration", str(int(seconds)),
                 "--rate", "200", "--format", "raw", "--output", str(target), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            ),
            target,
        )  # fmt: skip
    return spies


def collect_spies(spies: Spies, top: int = 12) -> dict[str, Any]:
    """Each recorder waited for: its summary (summarise_collapsed), or its error."""
    result: dict[str, Any] = {}
    for name, (proc, target) in spies.items():
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0 or not target.exists():
            result[name] = {"error": err.decode(errors="replace")[-300:]}
            continue
        result[name] = summarise_collapsed(target.read_text(), top=top)
    return result


def summarise_collapsed(text: str, top: int = 12) -> dict[str, Any]:
    """Self time per function and the share of samples that pass through each layer."""
    self_counts: Counter[str] = Counter()
    layer_counts: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        self_counts[_short(leaf)] += count
        if "asyncio/" in leaf or "selectors.py" in leaf:
            layer_counts[LOOP_SELF] += count
        # Every stack starts in the service's main() and edgekms.aio.run() (the event loop's
        # entry): they say nothing about where time goes.
        inner = [f for f in frames if "__main__.py" not in f and "edgekms/aio.py" not in f]
        for layer, needles in LAYERS.items():
            if any(n in frame for frame in inner for n in needles):
                layer_counts[layer] += count
    if not total:
        return {"samples": 0, "self": [], "layers": []}
    return {
        "samples": total,
        "self": [(name, 100.0 * c / total) for name, c in self_counts.most_common(top)],
        "layers": [(name, 100.0 * c / total) for name, c in layer_counts.most_common()],
    }


def _short(frame: str) -> str:
    """`sign (crypto_service/providers/pkcs11.py:560)` -> `sign (…/pkcs11.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").split(":")[0]
    parts = path.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if path else name


def run(
    stack: RunningStack,
    pids: Mapping[str, int],
    out: Path,
    processes: int,
    inflight: int = 64,
    key_name: str = "bench/hsm0/ec-p256",
) -> dict[str, Any]:
    binary = py_spy()
    if binary is None:
        return {"skipped": "py-spy not installed in the venv"}
    duration = 6.0
    spec = stack.sign_spec(key_name, "ec-p256", inflight, duration, 1.0)
    spies = start_spies(binary, pids, PROFILED, out / "profiles", duration + 4)
    outcome = run_load(spec, processes, pids)
    result: dict[str, Any] = {
        "rate_while_profiled": len(outcome.latencies) / duration,
    }
    result.update(collect_spies(spies))
    return result


def main() -> None:
    import argparse
    import json
    import shutil
    import tempfile

    from bench import stackrun
    from mgmt.client import KMSClient

    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="functions listed per process")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    try:
        stack = stackrun.start(work / "data")
        try:
            name = "profile/hsm0/ec-p256"
            with KMSClient.from_config(stack.client_config, timeout=120) as client:
                client.create_key(name, "ec-p256", provider="hsm0")
            result = run(stack, stack.pids(), out, 2, args.inflight, name)
        finally:
            stack.stop()
        print(f"rate while profiled: {result.get('rate_while_profiled', 0):,.0f}/s")
        for proc in PROFILED:
            stacks = out / "profiles" / f"{proc}.collapsed.txt"
            if not stacks.exists():
                print(proc, json.dumps(result.get(proc)))
                continue
            summary = summarise_collapsed(stacks.read_text(), args.top)
            print(f"== {proc}: {summary['samples']} samples")
            for label, share in summary["layers"]:
                print(f"   layer {share:5.1f}%  {label}")
            for label, share in summary["self"]:
                print(f"   self  {share:5.1f}%  {label}")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
