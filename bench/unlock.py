"""`python -m bench.unlock`: remote unlock round trips per second with swtpm, next to the
raw TPM2_Quote rate (issue 16, "Speed").

One `kmsctl up` stack trusting a local TPM "manufacturer" (swtpm_localca), one device
swtpm with an EK certificate, enrolled with `kmsctl enroll --attest`, one volume secret
with a PCR policy. A round trip is the whole `kmsctl unlock fetch` path: pin the CA,
BeginUnlock, TPM2_Quote, Unlock (quote checks, KMS Decrypt in SoftHSM, MakeCredential),
TPM2_ActivateCredential and the AES-GCM open; sequential, one at a time (swtpm serves one
client). The broker rations challenges to 20 a minute per address, so the run is at most
ROUND_TRIPS of them and the rate is count / elapsed. Raw: TPM2_Quote over the same PCRs
on one open ESAPI context for `--duration` seconds. Results: bench/results/unlock.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import stackrun
from bench.stats import RunResult, summarise

log = logging.getLogger("bench.unlock")

PCRS = [0, 2, 4, 7]
ROUND_TRIPS = 15


def _manufacturer(base: Path) -> tuple[Path, Path]:
    """(swtpm_setup config, CA bundle) of a fresh local manufacturer CA."""
    ca = base / "ca"
    ca.mkdir(parents=True)
    (base / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (base / "localca.options").write_text("")
    setup = base / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {base}/localca.conf\n"
        f"create_certs_tool_options = {base}/localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    return setup, ca


def _provision(setup: Path, state: Path) -> None:
    state.mkdir(parents=True, mode=0o700)
    subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpm-state",
            str(state),
            "--create-ek-cert",
            "--config",
            str(setup),
            "--logfile",
            str(state / "setup.log"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _kmsctl(stack: stackrun.RunningStack, *args: str) -> str:
    from click.testing import CliRunner

    from mgmt.cli import cli

    done = CliRunner().invoke(cli, [*args, "--data-dir", str(stack.data_dir)])
    if done.exit_code != 0:
        raise RuntimeError(f"kmsctl {' '.join(args)}: {done.output}")
    return done.stdout


def run(work: Path, duration: float) -> list[RunResult]:
    from click.testing import CliRunner

    from mgmt.cli import cli
    from mgmt.swtpm import Swtpm
    from mgmt.tpmdevice import DeviceTpm
    from mgmt.unlock import fetch, target_from

    setup, ca = _manufacturer(work / "maker")
    _provision(setup, work / "first-tpm")
    bundle = work / "maker" / "bundle.pem"
    bundle.write_bytes(
        (ca / "swtpm-localca-rootca-cert.pem").read_bytes() + (ca / "issuercert.pem").read_bytes()
    )
    _provision(setup, work / "device-tpm")
    tpm = Swtpm.private(work / "device-tpm").start()
    stack = stackrun.start(work / "data", extra=("--ek-ca", str(bundle)))
    try:
        token = work / "dev.token"
        made = json.loads(
            _kmsctl(
                stack,
                "enroll",
                "token",
                "create",
                "bench-dev",
                "--attest",
                "--token-out",
                str(token),
                "-o",
                "json",
            )
        )
        enroll_addr = json.loads((stack.data_dir / "run" / "state.json").read_text())["enroll"]
        out = work / "device"
        done = CliRunner().invoke(
            cli,
            [
                "enroll",
                "--attest",
                "--tpm-tcti",
                tpm.tcti,
                "--server",
                enroll_addr,
                "--token",
                str(token),
                "--fingerprint",
                made["fingerprint"],
                "--out-dir",
                str(out),
            ],
        )
        if done.exit_code != 0:
            raise RuntimeError(done.output)
        _kmsctl(stack, "key", "create", "unlock", "--type", "aes-256")
        with DeviceTpm(tpm.tcti) as device:
            digest = device.pcr_digest(PCRS).hex()
        _kmsctl(
            stack,
            "unlock",
            "add",
            "bench-dev",
            "--volume",
            "data",
            "--pcrs",
            ",".join(map(str, PCRS)),
            "--pcr-digest",
            digest,
            "--generate",
            "--secret-out",
            str(work / "data.key"),
        )
        target = target_from(out)
        latencies: list[float] = []
        started = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            fetch(target, "data", tpm.tcti)
            latencies.append(time.perf_counter() - t0)
        e2e = summarise(
            "unlock", "swtpm", "ek-rsa2048", 1, latencies, time.perf_counter() - started
        )
        quotes: list[float] = []
        with DeviceTpm(tpm.tcti) as device:
            device.quote(PCRS, b"warm")
            end = time.perf_counter() + duration
            q_start = time.perf_counter()
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                device.quote(PCRS, b"n" * 32)
                quotes.append(time.perf_counter() - t0)
            raw = summarise(
                "raw-quote", "swtpm", "ak-p256", 1, quotes, time.perf_counter() - q_start
            )
        return [e2e, raw]
    finally:
        stack.stop()
        tpm.stop()


def write(results: list[RunResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "unlock.json").write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    lines = [
        "# Remote unlock round trips per second",
        "",
        f"swtpm, one device, PCRs {','.join(map(str, PCRS))}, sequential (swtpm serves one",
        "client); the broker rations 20 challenges a minute per address, so the unlock",
        f"row is {ROUND_TRIPS} round trips. raw-quote: TPM2_Quote on one open context.",
        "",
        "| path | tpm | key | in flight | per second | p50 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r.path} | {r.provider} | {r.key_type} | {r.inflight} | {r.rate:.1f} "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} |"
            for r in results
        ),
        "",
    ]
    (out / "unlock.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.unlock", description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of raw quotes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-unlock-"))
    try:
        results = run(work, args.duration)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(results, args.out)
    for r in results:
        print(f"{r.path:10} {r.rate:8.1f}/s  p50 {r.p50_ms:.1f} ms  p99 {r.p99_ms:.1f} ms")


if __name__ == "__main__":
    main()
