"""`python -m bench.sign_many`: signatures per second through SignBatch and SignStream
(issue 19, item 1), next to the raw one-thread SoftHSM rate measured in the same run.

The target is >= 10,000 ECDSA P-256 signatures/s and >= 75 % of the raw one-thread token
rate. Batches of BATCH items, 1 and 4 batches in flight; one SignStream kept full. The
load comes from this process (Python grpc), so on a two-core machine the client, the
broker, nats-server and the crypto service share the cores: the figure is what one box
does, not what the broker alone could. Part of `make bench`; alone about a minute.
Results: bench/results/sign_many.json and sign_many.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import stackrun
from bench.procs import cpu_seconds

log = logging.getLogger("bench.sign_many")

BATCH = 500
KEY = "bench/many-p256"


def _batches(client: Any, inflight: int, duration: float) -> dict[str, float]:
    from edgekms.v1 import common_pb2 as pb

    digests = [hashlib.sha256(f"many {i}".encode()).digest() for i in range(BATCH)]
    items = [(KEY, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, d) for d in digests]
    client.sign_digests(items)  # warm: key record, sessions, batcher

    def loop(deadline: float) -> tuple[int, int, list[float]]:
        signed = failed = 0
        latencies: list[float] = []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            results = client.sign_digests(items)
            latencies.append(time.perf_counter() - started)
            ok = sum(1 for r in results if isinstance(r, bytes))
            signed += ok
            failed += len(results) - ok
        return signed, failed, latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        parts = list(pool.map(loop, [started + duration] * inflight))
    window = time.perf_counter() - started
    signed = sum(p[0] for p in parts)
    latencies = sorted(x for p in parts for x in p[2])
    return {
        "inflight_batches": inflight,
        "batch": BATCH,
        "signatures_per_s": round(signed / window, 1),
        "failed": sum(p[1] for p in parts),
        "batch_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else 0.0,
    }


def _stream(client: Any, count: int) -> dict[str, float]:
    from edgekms.v1 import common_pb2 as pb

    digest = hashlib.sha256(b"stream").digest()
    items = ((KEY, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest) for _ in range(count))
    started = time.perf_counter()
    signed = failed = 0
    for _, result in client.sign_stream(items, timeout=600):
        if isinstance(result, bytes):
            signed += 1
        else:
            failed += 1
    window = time.perf_counter() - started
    return {"count": count, "signatures_per_s": round(signed / window, 1), "failed": failed}


# Whose CPU a run's signatures cost: the stack's processes that do the work.
CPU_OF = ("broker", "crypto-hsm0", "nats-server")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the stack's working processes and of this load process."""
    used = {name: cpu_seconds(pids[name]) for name in CPU_OF if name in pids}
    used["load (this process)"] = time.process_time()
    return used


def _profiled(client: Any, pids: dict[str, int], duration: float, out: Path) -> dict[str, Any]:
    """One more SignBatch x1 run while py-spy samples the broker and the crypto service
    (bench.profile's summary: self time per function, share per layer)."""
    from bench.profile import collect_spies, py_spy, start_spies

    binary = py_spy()
    if binary is None:
        return {"skipped": "py-spy not installed in the venv"}
    spies = start_spies(
        binary, pids, ("broker", "crypto-hsm0"), out / "profiles", duration + 2, "sign_many-"
    )
    result: dict[str, Any] = {"run": _batches(client, 1, duration)}
    result.update(collect_spies(spies))
    return result


def run(
    stack: stackrun.RunningStack,
    duration: float,
    profile_out: Path | None = None,
) -> dict[str, Any]:
    from mgmt.client import KMSClient

    pids = stack.pids()
    result: dict[str, Any] = {}
    with KMSClient.from_config(stack.client_config, timeout=120) as client:
        client.create_key(KEY, "ec-p256", provider="hsm0")
        batch: list[dict[str, Any]] = []
        for n in (1, 4):
            before = _cpu(pids)
            batch.append(_batches(client, n, duration))
            after = _cpu(pids)
            signed = batch[-1]["signatures_per_s"] * duration
            batch[-1]["cpu_us_per_signature"] = {
                name: round((after[name] - before[name]) / max(signed, 1) * 1e6, 1)
                for name in after
            }
            log.warning("SignBatch x%d in flight: %.0f/s", n, batch[-1]["signatures_per_s"])
        if profile_out is not None:
            result["profile"] = _profiled(client, pids, duration, profile_out)
        # As many as the best batch run signed in `duration`: the same work, one stream.
        count = max(1000, int(max(r["signatures_per_s"] for r in batch) * duration))
        stream = _stream(client, count)
        log.warning("SignStream: %.0f/s", stream["signatures_per_s"])
    return {**result, "batch": batch, "stream": stream, "load_average": os.getloadavg()[0]}


def raw_one_thread(work: Path, duration: float) -> float:
    """SoftHSM P-256 signatures/s from one thread, no bus, no broker (bench.raw)."""
    import secrets

    from bench.raw import RawSpec, run_raw
    from mgmt.softhsm import init_token
    from mgmt.swtpm import Swtpm

    work.mkdir(parents=True, exist_ok=True)
    pin = secrets.token_hex(8)
    token = init_token(work / "raw-softhsm", "bench", pin=pin, so_pin=secrets.token_hex(8))
    with Swtpm.on_free_port(work / "raw-swtpm") as tpm:
        runs = run_raw(
            RawSpec(
                softhsm_conf=str(token.conf),
                module=token.module,
                token_label="bench",
                pin=pin,
                tcti=tpm.tcti,
                tpm_state_dir=str(work / "raw-tpm-state"),
                duration=duration,
                key_types=("ec-p256",),
                threads=(1,),
            )
        )
    return raw_rate(runs)


def raw_rate(runs: list[Any]) -> float:
    """The one-thread SoftHSM P-256 rate among bench.raw's runs (0 when absent)."""
    for r in runs:
        if (r.provider, r.key_type, r.inflight) == ("softhsm", "ec-p256", 1):
            return float(r.rate)
    return 0.0


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sign_many.json").write_text(json.dumps(result, indent=2) + "\n")
    raw = result.get("raw_one_thread_per_s") or 0.0
    lines = [
        "# Many signatures per call (SignBatch, SignStream)",
        "",
        f"SoftHSM ECDSA P-256; raw one-thread token rate in the same run: {raw:,.0f}/s"
        + (
            " (mean of {:,.0f}/s before and {:,.0f}/s after the stack's runs).".format(
                *result["raw_one_thread_runs_per_s"]
            )
            if len(result.get("raw_one_thread_runs_per_s") or ()) == 2
            else "."
        ),
        "",
        "| path | signatures/s | share of raw one-thread | failed |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in result["batch"]:
        share = f"{row['signatures_per_s'] / raw:.0%}" if raw else "n/a"
        lines.append(
            f"| SignBatch of {row['batch']}, {row['inflight_batches']} in flight "
            f"(p50 {row['batch_p50_ms']} ms per batch) | {row['signatures_per_s']:,.0f} "
            f"| {share} | {row['failed']} |"
        )
    stream = result["stream"]
    share = f"{stream['signatures_per_s'] / raw:.0%}" if raw else "n/a"
    lines.append(
        f"| one SignStream | {stream['signatures_per_s']:,.0f} | {share} | {stream['failed']} |"
    )
    if "load_average" in result:
        lines += ["", f"Load average at the end of the run: {result['load_average']:.1f}."]
    cpu_rows = [row for row in result["batch"] if "cpu_us_per_signature" in row]
    if cpu_rows:
        names = list(cpu_rows[0]["cpu_us_per_signature"])
        lines += [
            "",
            "CPU per signature (µs) while the batches ran:",
            "",
            "| path | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(names),
        ]
        for row in cpu_rows:
            cpu = row["cpu_us_per_signature"]
            lines.append(
                f"| SignBatch, {row['inflight_batches']} in flight | "
                + " | ".join(f"{cpu[n]:.0f}" for n in names)
                + " |"
            )
    profile = result.get("profile") or {}
    for name in ("broker", "crypto-hsm0"):
        summary = profile.get(name)
        if not isinstance(summary, dict) or not summary.get("samples"):
            continue
        lines += ["", f"py-spy, {name} ({summary['samples']} samples), share of samples:", ""]
        lines += ["| layer | share |", "| --- | ---: |"]
        lines += [f"| {layer} | {share_:.0f} % |" for layer, share_ in summary["layers"]]
        lines += ["", "| self time (top) | share |", "| --- | ---: |"]
        lines += [f"| `{fn}` | {share_:.1f} % |" for fn, share_ in summary["self"][:8]]
    (out / "sign_many.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sign_many", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--profile", action="store_true", help="also py-spy the broker and crypto-hsm0"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-bench-many-"))
    try:
        # Raw before and after the stack's runs: on a shared machine the load moves, and
        # the share is taken against the mean of the two.
        raw_before = raw_one_thread(work / "before", args.duration)
        stack = stackrun.start(work / "data")
        try:
            result = run(stack, args.duration, args.out if args.profile else None)
        finally:
            stack.stop()
        raw_after = raw_one_thread(work / "after", args.duration)
        result["raw_one_thread_runs_per_s"] = [raw_before, raw_after]
        result["raw_one_thread_per_s"] = round((raw_before + raw_after) / 2, 1)
        write(result, args.out)
        print((args.out / "sign_many.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
