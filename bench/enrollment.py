"""Device enrollment: one-time token + CSR in, client certificate out, at 1 and 16 in
flight, through the broker's enrollment listener (server-only TLS; the broker checks the
token, reserves it, signs the client certificate with the internal CA key in the token,
stores the device and client records and consumes the token, each a KV write).

Tokens are made beforehand by the admin (not measured); each enrollment redeems a fresh
one for a fresh device name with a fresh P-256 key (CSRs made beforehand too). The CA is
pinned once per load process, as a device does on first contact, outside the window.
`python -m bench.enrollment` runs it alone on a stack of its own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Watch, wait_until
from bench.stats import RunResult, summarise

LEVELS = (1, 16)
# Enough tokens for the fastest rate seen on the development machine, with room.
TOKENS_PER_SECOND = 60


@dataclass(frozen=True)
class EnrollSpec:
    target: str  # the enrollment listener, host:port
    fingerprint: str
    work: tuple[tuple[str, bytes], ...]  # (token, CSR DER)
    inflight: int
    duration: float
    warmup: float


def make_work(client_config: Path, count: int, tag: str) -> tuple[tuple[str, bytes], ...]:
    """`count` tokens (for bench-<tag>-<i>) and CSRs of fresh P-256 keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mgmt.client import KMSClient

    def csr() -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        built = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        return built.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    with KMSClient.from_config(client_config, timeout=60, retries=3) as admin:

        def token(i: int) -> str:
            made = admin.create_enroll_token(f"bench-{tag}-{i}", ttl_seconds=3600)
            return made.token_string

        with ThreadPoolExecutor(8) as pool:
            tokens = list(pool.map(token, range(count)))
    return tuple((t, csr()) for t in tokens)


async def _drive(spec: EnrollSpec, start_at: float) -> tuple[list[float], int, str, int]:
    import grpc
    from cryptography.hazmat.primitives import serialization

    from edgekms.v1 import enroll_pb2, enroll_pb2_grpc
    from mgmt.enroll import _server_name, pinned_ca, split_server

    host, port = split_server(spec.target)
    ca, leaf = await asyncio.to_thread(pinned_ca, host, port, spec.fingerprint)
    name = _server_name(leaf)
    channel = grpc.aio.secure_channel(
        spec.target,
        grpc.ssl_channel_credentials(ca.public_bytes(serialization.Encoding.PEM)),
        options=[("grpc.ssl_target_name_override", name)] if name else [],
    )
    stub = enroll_pb2_grpc.EnrollmentServiceStub(channel)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    measure_from = start_at + spec.warmup
    end = measure_from + spec.duration
    queue = list(spec.work)
    used = 0

    async def one() -> None:
        nonlocal errors, first_error, used
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < end and queue:
            token, csr = queue.pop()
            used += 1
            t0, wall = time.perf_counter(), time.time()
            try:
                request = enroll_pb2.EnrollRequest(
                    token=token, csr=csr, request_id=os.urandom(8).hex()
                )
                await stub.Enroll(request, timeout=30)
            except Exception as exc:
                errors += 1
                first_error = first_error or str(exc)[:200]
                continue
            if wall >= measure_from and time.time() < end:
                latencies.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(one() for _ in range(spec.inflight)))
    finally:
        await channel.close(None)
    if not queue and time.time() < end:
        first_error = first_error or "ran out of tokens before the window ended"
    return latencies, errors, first_error, used


def _child(
    spec: EnrollSpec, start_at: float, out: mp.Queue[tuple[list[float], int, str, int]]
) -> None:
    try:
        out.put(asyncio.run(_drive(spec, start_at)))
    except Exception as exc:
        out.put(([], 1, f"load process failed: {exc!r}"[:300], 0))


def measure(spec: EnrollSpec, watch: Mapping[str, int]) -> RunResult:
    ctx = mp.get_context("spawn")
    out: mp.Queue[tuple[list[float], int, str, int]] = ctx.Queue()
    start_at = time.time() + 3.0
    proc = ctx.Process(target=_child, args=(spec, start_at, out))
    proc.start()
    wait_until(start_at + spec.warmup)
    sampler = Watch({**watch, "loadgen0": proc.pid or 0})
    sampler.start()
    wait_until(start_at + spec.warmup + spec.duration)
    sampler.stop()
    latencies, errors, first_error, _ = out.get(timeout=60 + spec.duration)
    proc.join(10)
    return summarise(
        "enroll", "hsm0", "ec-p256", spec.inflight, latencies, spec.duration,
        errors=errors, cpu=sampler.cpu, note=first_error,
    )  # fmt: skip


def run(stack: Any, duration: float, warmup: float, pids: Mapping[str, int]) -> list[RunResult]:
    """Enrollments per second at each level, on a running stack (bench.stackrun)."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    state = json.loads((Path(stack.data_dir) / "run" / "state.json").read_text())
    ca_pem = (Path(stack.data_dir) / "client" / "ca.crt").read_bytes()
    ca = x509.load_pem_x509_certificates(ca_pem)[0]
    fingerprint = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    runs = []
    for n in LEVELS:
        count = int((duration + warmup + 2) * TOKENS_PER_SECOND)
        work = make_work(stack.client_config, count, f"{n}-{os.urandom(3).hex()}")
        spec = EnrollSpec(str(state["enroll"]), fingerprint, work, n, duration, warmup)
        runs.append(measure(spec, pids))
    return runs


def main() -> None:
    """Alone: a stack of its own in a temporary directory, the two levels, JSON out."""
    import argparse
    import shutil
    import tempfile

    from bench import stackrun

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-enroll-bench-"))
    try:
        stack = stackrun.start(work / "data")
        try:
            runs = run(stack, args.duration, args.warmup, stack.pids())
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps([r.to_json() for r in runs], indent=1))


if __name__ == "__main__":
    main()
