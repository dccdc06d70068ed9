"""`python -m bench.encryption`: Encrypt and Decrypt per second (issue 16, "Speed").

End to end: an AES-256 key in SoftHSM (provider hsm0) on a `kmsctl up` stack, 4 KiB
plaintexts with 64 bytes of AAD, over gRPC with mutual TLS as the stack's admin, at 1 and
64 in flight (one asyncio client process; every answer is checked: each Decrypt must give
back the plaintext). Next to it the raw token rate: the PKCS#11 provider class the crypto
service uses, called directly on a SoftHSM token of its own (1 thread and 4), so the
difference is what the bus, the broker and the audit log cost. Part of `make bench`;
alone about a minute. Results: bench/results/encryption.json and encryption.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import stackrun
from bench.raw import _timed
from bench.stats import RunResult, summarise

log = logging.getLogger("bench.encryption")

PAYLOAD = 4096
AAD = b"bench/encryption:" + b"a" * 47  # 64 bytes
INFLIGHT = (1, 64)
RAW_THREADS = (1, 4)
KEY = "bench/encryption-aes"
# Sign on the same stack in the same run: the yardstick, so that a loaded machine's
# figures still say what encryption costs next to the path docs/performance.md knows.
SIGN_KEY = "bench/encryption-p256"


@dataclass(frozen=True)
class _RawSpec:
    softhsm_conf: str
    module: str
    token_label: str
    pin: str
    duration: float


def _raw_measure(spec: _RawSpec) -> list[RunResult]:
    os.environ["SOFTHSM2_CONF"] = spec.softhsm_conf
    from crypto_service.config import Pkcs11Config
    from crypto_service.providers.base import KeyCreateOptions
    from crypto_service.providers.pkcs11 import Pkcs11Provider
    from edgekms.v1 import common_pb2 as pb

    provider = Pkcs11Provider(
        Pkcs11Config(spec.module, spec.token_label, sessions=max(RAW_THREADS)), spec.pin
    )
    plaintext = secrets.token_bytes(PAYLOAD)
    results: list[RunResult] = []
    try:
        key_id = secrets.token_bytes(8)
        provider.generate(key_id, "bench-aes", pb.KEY_TYPE_AES_256, KeyCreateOptions())
        sealed = provider.encrypt(key_id, plaintext, AAD)

        def encrypt() -> object:
            return provider.encrypt(key_id, plaintext, AAD)

        def decrypt() -> object:
            opened = provider.decrypt(
                key_id, sealed.algorithm, sealed.nonce, sealed.ciphertext, AAD
            )
            assert opened == plaintext
            return opened

        for op, fn in (("encrypt", encrypt), ("decrypt", decrypt)):
            for threads in RAW_THREADS:
                latencies, window = _timed(fn, threads, spec.duration)
                results.append(
                    summarise(f"raw-{op}", "softhsm", "aes-256", threads, latencies, window)
                )
        provider.destroy(key_id)
    finally:
        provider.close()
    return results


def _raw_child(spec: _RawSpec, out: mp.Queue[list[RunResult]]) -> None:
    out.put(_raw_measure(spec))


def run_raw(work: Path, duration: float) -> list[RunResult]:
    """The raw token rate, in a spawned process (SoftHSM reads its config at load)."""
    from mgmt.softhsm import init_token

    pin = secrets.token_hex(8)
    token = init_token(work / "enc-softhsm", "benchenc", pin=pin, so_pin=secrets.token_hex(8))
    spec = _RawSpec(str(token.conf), token.module, token.label, pin, duration)
    ctx = mp.get_context("spawn")
    out: mp.Queue[list[RunResult]] = ctx.Queue()
    proc = ctx.Process(target=_raw_child, args=(spec, out))
    proc.start()
    try:
        return out.get(timeout=120 + 8 * duration)
    finally:
        proc.join(10)


async def _load(
    stack: stackrun.RunningStack, op: str, inflight: int, duration: float, warmup: float
) -> RunResult:
    """`inflight` callers looping on one channel for warmup + duration; only calls begun
    and ended inside the measured window count."""
    import grpc

    from edgekms.v1 import common_pb2 as pb
    from edgekms.v1 import keys_pb2, keys_pb2_grpc
    from mgmt.client import KMSClient
    from mgmt.clientconfig import load_client_config

    config = load_client_config(stack.client_config)
    ca_cert, cert, key = config.read_credentials()
    plaintext = secrets.token_bytes(PAYLOAD)
    with KMSClient.from_config(stack.client_config, timeout=60) as kms:
        ciphertext = kms.encrypt(KEY, plaintext, AAD).ciphertext
    creds = grpc.ssl_channel_credentials(ca_cert, key, cert)
    name = config.server_name or "edgekms-broker"
    options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.secure_channel(stack.broker, creds, options=options) as channel:
        stub = keys_pb2_grpc.KeyServiceStub(channel)
        start = time.perf_counter() + warmup
        end = start + duration

        digest = secrets.token_bytes(32)

        async def one() -> None:
            if op == "sign":
                signed = await stub.Sign(
                    keys_pb2.SignRequest(
                        name=SIGN_KEY,
                        algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
                        data=digest,
                    ),
                    timeout=30,
                )
                assert signed.signature
            elif op == "encrypt":
                sealed = await stub.Encrypt(
                    keys_pb2.EncryptRequest(name=KEY, plaintext=plaintext, aad=AAD), timeout=30
                )
                assert sealed.key_name == KEY and len(sealed.ciphertext) > PAYLOAD
            else:
                opened = await stub.Decrypt(
                    keys_pb2.DecryptRequest(ciphertext=ciphertext, aad=AAD), timeout=30
                )
                assert opened.plaintext == plaintext

        async def worker() -> None:
            nonlocal errors
            clock = time.perf_counter
            while True:
                t0 = clock()
                if t0 >= end:
                    return
                try:
                    await one()
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = clock()
                if t0 >= start and t1 <= end:
                    latencies.append(t1 - t0)

        await asyncio.gather(*(worker() for _ in range(inflight)))
    key_type = "ec-p256" if op == "sign" else "aes-256"
    return summarise(f"e2e-{op}", "hsm0", key_type, inflight, latencies, duration, errors)


def run(stack: stackrun.RunningStack, duration: float, warmup: float) -> list[RunResult]:
    from mgmt.client import KMSClient

    with KMSClient.from_config(stack.client_config, timeout=60) as kms:
        for name, key_type in ((KEY, "aes-256"), (SIGN_KEY, "ec-p256")):
            try:
                kms.get_key(name)
            except Exception:
                kms.create_key(name, key_type, provider="hsm0")
    results = []
    for op in ("encrypt", "decrypt", "sign"):
        for inflight in INFLIGHT:
            result = asyncio.run(_load(stack, op, inflight, duration, warmup))
            log.warning(
                "e2e %s %d in flight: %.0f/s p50 %.1f ms", op, inflight, result.rate, result.p50_ms
            )
            results.append(result)
    return results


def write(results: list[RunResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "encryption.json").write_text(
        json.dumps([r.to_json() for r in results], indent=1) + "\n"
    )
    lines = [
        "# Encrypt and Decrypt per second",
        "",
        f"AES-256-GCM in SoftHSM, {PAYLOAD}-byte plaintexts, {len(AAD)} bytes of AAD.",
        "e2e: through gRPC, the broker (audit entry per call), NATS and kms-crypto;",
        "raw: the PKCS#11 provider called directly (threads instead of calls in flight).",
        "",
        "e2e-sign: Sign with a P-256 key on the same stack in the same run, for scale.",
        "",
        "| path | provider | key | in flight / threads | per second | p50 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r.path} | {r.provider} | {r.key_type} | {r.inflight} | {r.rate:.0f} "
            f"| {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.errors} |"
            for r in results
        ),
        "",
    ]
    (out / "encryption.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.encryption", description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-encryption-"))
    try:
        results = run_raw(work, args.duration)
        stack = stackrun.start(work / "data")
        try:
            results += run(stack, args.duration, args.warmup)
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(results, args.out)
    for r in results:
        print(f"{r.path:12} {r.provider:8} {r.inflight:3}  {r.rate:8.0f}/s  p50 {r.p50_ms:.2f} ms")


if __name__ == "__main__":
    main()
