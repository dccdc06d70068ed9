"""`python -m bench.quick`: one end-to-end Sign point against a fresh stack, for iterating.

`make bench` measures everything and takes minutes; while working on a hot path one wants a
single figure and where the CPU went, in under half a minute. Same stack (`kmsctl up`), same
load generator, same CPU accounting as the full run; nothing is written to bench/results.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench import stackrun
from bench.load import GENERATORS, resolve_generator, run_load
from bench.procs import rss_kb
from bench.stats import summarise


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from mgmt.client import KMSClient

    generator = resolve_generator(args.loadgen)
    work = Path(tempfile.mkdtemp(prefix="edgekms-quick-"))
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
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
