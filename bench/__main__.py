"""`python -m bench` / `make bench`: one run, one machine, every figure of issue 7.

Order: raw provider rates on a token and swtpm of their own; then `kmsctl up` (cold, then
warm restart) for time-to-ready; idle memory; end-to-end Sign over gRPC at 1/16/64 in
flight per provider; certificate issuance against `cfssl serve`, and beside it step-ca
and cfssl + SQLite built from Debian's packages (bench/peers.py, issuance_peers.md); py-spy
profiles of the hot path; then the CA with 50,000 certificates stored (bench/ca_scale.py),
and a broker start with 50,000 sealed key records (bench/sealed_start.py); on the main
stack also the audit bytes per Sign and per certificate (bench/audit_bytes.py) and SignBatch /
SignStream rates (bench/sign_many.py); then the compose stack
(bench/containers.py: image sizes, `compose up` to first signature, RSS per container).
Results land in bench/results/ (results.json, results.md, chart.png, ca_scale.md,
sealed_start.md, audit_bytes.md, sign_many.md, containers.md, encryption.md: Encrypt/Decrypt
per second end to end next to the raw token rate, bench/encryption.py; unlock.md: remote
unlock round trips per second next to the raw TPM2_Quote rate, bench/unlock.py;
spiffe.json: bench/spiffe.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report
from bench.load import GENERATORS, describe, resolve_generator, run_load
from bench.procs import pss_kb, rss_kb
from bench.raw import RawSpec, run_raw
from bench.stats import RunResult, summarise

if TYPE_CHECKING:
    from bench.stackrun import RunningStack

log = logging.getLogger("bench")

E2E_KEYS = (("hsm0", "ec-p256"), ("tpm0", "ec-p256"), ("hsm0", "rsa-2048"), ("tpm0", "rsa-2048"))
INFLIGHT = (1, 16, 64)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--loadgen", choices=GENERATORS, default="auto", help="Go client (auto: if it builds)"
    )
    parser.add_argument("--processes", type=int, default=2, help="Python load generator processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-issuance", action="store_true")
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip step-ca and cfssl + SQLite beside issuance (bench/peers.py)",
    )
    parser.add_argument("--no-enrollment", action="store_true")
    parser.add_argument(
        "--no-ca-scale", action="store_true", help="skip the 50,000-certificate CA figures"
    )
    parser.add_argument("--no-acme", action="store_true", help="skip ACME orders per second")
    parser.add_argument(
        "--no-spiffe", action="store_true", help="skip SVIDs minted/s and rotation cost"
    )
    parser.add_argument(
        "--no-containers", action="store_true", help="skip the compose stack's figures"
    )
    parser.add_argument(
        "--no-sealed-start",
        action="store_true",
        help="skip the broker start with 50,000 sealed records",
    )
    parser.add_argument(
        "--no-audit-bytes", action="store_true", help="skip the audit bytes per operation"
    )
    parser.add_argument(
        "--no-relay-floor",
        action="store_true",
        help="skip the relay floors beside the grpc.aio floor (bench/relayfloor.py)",
    )
    parser.add_argument(
        "--no-sign-many", action="store_true", help="skip SignBatch and SignStream rates"
    )
    parser.add_argument(
        "--no-encryption", action="store_true", help="skip Encrypt/Decrypt per second"
    )
    parser.add_argument(
        "--no-unlock", action="store_true", help="skip remote unlock round trips per second"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    return parser.parse_args()


def _raw(work: Path, duration: float) -> list[RunResult]:
    from mgmt.softhsm import init_token
    from mgmt.swtpm import Swtpm

    pin = secrets.token_hex(8)
    token = init_token(work / "raw-softhsm", "bench", pin=pin, so_pin=secrets.token_hex(8))
    with Swtpm.on_free_port(work / "raw-swtpm") as tpm:
        return run_raw(
            RawSpec(
                softhsm_conf=str(token.conf),
                module=token.module,
                token_label="bench",
                pin=pin,
                tcti=tpm.tcti,
                tpm_state_dir=str(work / "raw-tpm-state"),
                duration=duration,
                key_types=("ec-p256", "rsa-2048"),
                threads=(1, 4),
            )
        )


def _e2e(
    stack: RunningStack,
    duration: float,
    warmup: float,
    processes: int,
    pids: dict[str, int],
    generator: str = "auto",
) -> tuple[list[RunResult], dict[str, list[float]], dict[str, int]]:
    from mgmt.client import KMSClient

    runs: list[RunResult] = []
    samples: dict[str, list[float]] = {}
    peak: dict[str, int] = {}
    with KMSClient.from_config(stack.client_config, timeout=60) as client:
        for provider, cli in E2E_KEYS:
            client.create_key(f"bench/{provider}/{cli}", cli, provider=provider)
    digest = secrets.token_bytes(32)
    for provider, cli in E2E_KEYS:
        levels = INFLIGHT if cli == "ec-p256" else (16,)
        for inflight in levels:
            spec = stack.sign_spec(
                f"bench/{provider}/{cli}", cli, inflight, duration, warmup, data=digest
            )
            outcome = run_load(spec, processes if inflight > 1 else 1, pids, generator)
            run = summarise(
                "e2e", provider, cli, inflight, outcome.latencies, duration,
                errors=outcome.errors, cpu=outcome.cpu, note=outcome.first_error,
            )  # fmt: skip
            runs.append(run)
            samples[f"{provider}/{cli}/{inflight}"] = outcome.latencies
            for name, kb in outcome.peak_kb.items():
                if not name.startswith("loadgen"):
                    peak[name] = max(peak.get(name, 0), kb)
            log.warning(
                "e2e provider=%s key=%s inflight=%d rate=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d",
                provider, cli, inflight, run.rate, run.p50_ms, run.p99_ms, run.errors,
            )  # fmt: skip
    return runs, samples, peak


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from bench import stackrun

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgekms-bench-"))
    started = time.time()
    results: dict[str, Any] = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "loadgen_processes": args.processes,
        },
    }
    generator = resolve_generator(args.loadgen)
    results["settings"]["loadgen"] = describe(generator, args.processes) + (
        ", 1 at 1 in flight" if generator == "python" else ""
    )
    try:
        raw = _raw(work, args.duration)
        for r in raw:
            log.warning(
                "raw provider=%s key=%s threads=%d rate=%.0f",
                r.provider,
                r.key_type,
                r.inflight,
                r.rate,
            )
        results["raw"] = [r.to_json() for r in raw]

        data = work / "stack" / "data"
        data.parent.mkdir()
        cold = stackrun.start(data)
        cold.stop()
        stack = stackrun.start(data)
        results["ready_seconds"] = {"cold": cold.ready_seconds, "warm": stack.ready_seconds}
        log.warning("ready cold=%.2fs warm=%.2fs", cold.ready_seconds, stack.ready_seconds)
        try:
            from bench import cli

            # Before the load runs: what a person at the shell waits for kmsctl.
            results["cli"] = cli.measure(stack.data_dir, work=work)
            (args.out / "cli.md").write_text(cli.render(results["cli"]))
            pids = stack.pids()
            results["pids"] = pids
            time.sleep(1.0)
            idle = {name: rss_kb(pid) for name, pid in pids.items()}
            idle_pss = {name: pss_kb(pid) for name, pid in pids.items()}
            runs, samples, peak = _e2e(
                stack, args.duration, args.warmup, args.processes, pids, generator
            )
            results["e2e"] = [r.to_json() for r in runs]
            # At 1 and at 64 in flight, as the unary targets compare (issue 19 item 2); and
            # beside it the cheapest chain of the broker's shape (bench/relayfloor.py).
            if args.no_relay_floor:
                from bench import floor

                floor_runs = floor.run(work, args.duration, args.warmup)
            else:
                from bench import relayfloor

                load_before = os.getloadavg()[0]
                floor_runs = relayfloor.run(work, args.duration, args.warmup)
                results["relayfloor"] = [r.to_json() for r in floor_runs]
                (args.out / "relayfloor.md").write_text(
                    relayfloor.report(floor_runs, (load_before, os.getloadavg()[0]))
                )
            results["floor"] = [r.to_json() for r in floor_runs if r.path == "floor"]
            results["memory_kb"] = {"idle": idle, "peak": peak, "idle_pss": idle_pss}
            if not args.no_issuance:
                from bench import issuance

                csrs = issuance.make_csrs()
                issue_runs, issue_samples, issue_peak = issuance.run(
                    stack, work, args.duration, args.warmup, pids, csrs
                )
                results["issuance"] = [r.to_json() for r in issue_runs]
                samples.update(issue_samples)
                results["memory_kb"]["peak_issuance"] = issue_peak
                if not args.no_peers:
                    from bench import peers

                    # The peer CAs on the same CSRs at the same levels, the stack idle.
                    results["peers"] = peers.run_block(
                        work / "peers", csrs, args.duration, args.warmup
                    )
                    peers.write(results, out)
            if not args.no_enrollment:
                from bench import enrollment

                enroll_runs = enrollment.run(stack, args.duration, args.warmup, pids)
                results["enrollment"] = [r.to_json() for r in enroll_runs]
            if not args.no_sign_many:
                from bench import sign_many

                results["sign_many"] = sign_many.run(stack, args.duration)
                results["sign_many"]["raw_one_thread_per_s"] = sign_many.raw_rate(raw)
                sign_many.write(results["sign_many"], out)
            if not args.no_audit_bytes:
                from bench import audit_bytes

                results["audit_bytes"] = audit_bytes.run(stack)
                audit_bytes.write(results["audit_bytes"], out)
            if not args.no_encryption:
                from bench import encryption

                enc_runs = encryption.run_raw(work, args.duration)
                enc_runs += encryption.run(stack, args.duration, args.warmup)
                results["encryption"] = [r.to_json() for r in enc_runs]
                encryption.write(enc_runs, out)
            if not args.no_unlock:
                from bench import unlock

                # A stack and a device TPM of its own (bench/unlock.py).
                unlock_runs = unlock.run(work / "unlock", args.duration)
                results["unlock"] = [r.to_json() for r in unlock_runs]
                unlock.write(unlock_runs, out)
            if not args.no_profile:
                from bench import profile

                results["profiles"] = profile.run(stack, pids, out, args.processes)
            results["latency_samples_ms"] = {
                k: [round(v * 1000, 3) for v in vs[:: max(1, len(vs) // 2000)]]
                for k, vs in samples.items()
            }
        finally:
            stack.stop()
        if not args.no_acme:
            # On a stack of its own, with ACME on (bench.acme).
            from bench import acme

            results["acme"] = [
                r.to_json() for r in acme.run_fresh(work / "acme", args.duration, args.warmup)
            ]
        if not args.no_spiffe:
            # On a stack of its own, with the device's SPIFFE agent (bench.spiffe).
            from bench import spiffe

            results["spiffe"] = spiffe.run(20, 100)
            (out / "spiffe.json").write_text(json.dumps(results["spiffe"], indent=1) + "\n")
        if not args.no_ca_scale:
            # On a stack of its own: 100,000 seeded records would weigh on the rest.
            from bench import ca_scale

            results["ca_scale"] = ca_scale.run_fresh(work / "ca-scale")
            ca_scale.write(results["ca_scale"], out)
        if not args.no_sealed_start:
            # A broker start with 50,000 sealed records, on a stack of its own too.
            from bench import sealed_start

            results["sealed_start"] = sealed_start.run_fresh(work / "sealed-start")
            sealed_start.write(results["sealed_start"], out)
        if not args.no_containers:
            # Last: the images' build and the stack's start weigh on nothing measured after.
            from bench import containers

            results["containers"] = containers.measure()
            containers.write(results["containers"], out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["bench_seconds"] = time.time() - started
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    report.write(results, out)
    print(f"results in {out} ({results['bench_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
