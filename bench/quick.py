"""`python -m bench.quick`: one end-to-end Sign point against a fresh stack, for iterating.

`make bench` measures everything and takes minutes; while working on a hot path one wants a
single figure and where the CPU went, in under half a minute. Same stack (`kmsctl up`), same
load generator, same CPU accounting as the full run; nothing is written to bench/results.
Then (unless --no-floor) the do-nothing grpc.aio server of bench/floor.py at the same
in-flight levels with the same client, and both side by side: the unary targets are
ratios to that floor, and the machine's load moves both.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench import floor, stackrun
from bench.load import GENERATORS, resolve_generator, run_load
from bench.procs import rss_kb
from bench.stats import RunResult, summarise


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quick", description=__doc__)
    parser.add_argument("--provider", default="hsm0", help="hsm0 or tpm0")
    parser.add_argument("--key", default="ec-p256", help="key type, as kmsctl names it")
    parser.add_argument("--inflight", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--loadgen", choices=GENERATORS, default="auto", help="Go client (auto: if it builds)"
    )
    parser.add_argument("--processes", type=int, default=2, help="Python load generator processes")
    parser.add_argument("--connections", type=int, default=1, help="Go client HTTP/2 connections")
    parser.add_argument("--gomaxprocs", type=int, default=2, help="Go client GOMAXPROCS")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the grpc.aio floor (bench/floor.py)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from mgmt.client import KMSClient

    generator = resolve_generator(args.loadgen)
    work = Path(tempfile.mkdtemp(prefix="edgekms-quick-"))
    e2e: list[RunResult] = []
    try:
        stack = stackrun.start(work / "data")
        try:
            print(f"ready in {stack.ready_seconds:.2f} s")
            pids = stack.pids()
            time.sleep(1.0)
            print("idle RSS MB:", {n: round(rss_kb(p) / 1024, 1) for n, p in pids.items()})
            name = f"quick/{args.provider}/{args.key}"
            with KMSClient.from_config(stack.client_config, timeout=120) as client:
                client.create_key(name, args.key, provider=args.provider)
            for inflight in args.inflight:
                spec = stack.sign_spec(name, args.key, inflight, args.duration, args.warmup)
                outcome = run_load(
                    spec, args.processes if inflight > 1 else 1, pids,
                    generator=generator, connections=args.connections, gomaxprocs=args.gomaxprocs,
                )  # fmt: skip
                run = summarise(
                    "e2e", args.provider, args.key, inflight, outcome.latencies, args.duration,
                    errors=outcome.errors, cpu=outcome.cpu, note=outcome.first_error,
                )  # fmt: skip
                e2e.append(run)
                per_request = {
                    n: round(c / args.duration / max(run.rate, 1) * 1e6)
                    for n, c in sorted(outcome.cpu.items())
                    if c > 0.01
                }
                print(
                    f"in flight {inflight}: {run.rate:,.0f}/s p50 {run.p50_ms:.2f} ms "
                    f"p99 {run.p99_ms:.2f} ms errors {run.errors} {run.note}"
                )
                print(f"  load from: {outcome.generator}")
                print(f"  CPU µs per request: {per_request}")
                print("  peak RSS MB:", {n: round(k / 1024, 1) for n, k in outcome.peak_kb.items()})
        finally:
            stack.stop()
        if not args.no_floor and generator == "go":
            # After the stack stopped: the floor gets the machine as the stack had it.
            floor_runs = floor.run(work, args.duration, args.warmup, tuple(args.inflight))
            print(side_by_side(e2e, floor_runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def side_by_side(e2e: list[RunResult], floor_runs: list[RunResult]) -> str:
    """One line per in-flight level: EdgeKMS unary beside the floor, rate share and the
    p50 difference (what the two unary targets judge)."""
    lines = ["unary Sign vs the grpc.aio floor (same client, same machine, minutes apart):"]
    by_level = {r.inflight: r for r in floor_runs}
    for run in e2e:
        base = by_level.get(run.inflight)
        if base is None:
            continue
        lines.append(
            f"  in flight {run.inflight}: {run.rate:,.0f}/s vs floor {base.rate:,.0f}/s "
            f"({run.rate / max(base.rate, 1):.0%}); p50 {run.p50_ms:.2f} vs "
            f"{base.p50_ms:.2f} ms (+{run.p50_ms - base.p50_ms:.2f}); "
            f"floor CPU µs per call {_per_call(base)}"
        )
    return "\n".join(lines)


def _per_call(run: RunResult) -> dict[str, int]:
    return {n: round(c / run.seconds / max(run.rate, 1) * 1e6) for n, c in sorted(run.cpu.items())}


if __name__ == "__main__":
    main()
