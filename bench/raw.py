"""Raw provider sign rate: the provider classes the crypto services use, called directly
(python-pkcs11 on SoftHSM, tpm2-pytss on swtpm) on a token and TPM of their own, so the
figure is what the token path costs without NATS, gRPC or the broker.

Runs in a spawned process: SoftHSM reads SOFTHSM2_CONF when the module loads, and the
PKCS#11 module must be initialised by this code first (see providers.pkcs11._load_module).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import RunResult, summarise


@dataclass(frozen=True)
class RawSpec:
    softhsm_conf: str
    module: str
    token_label: str
    pin: str
    tcti: str
    tpm_state_dir: str
    duration: float
    key_types: tuple[str, ...]  # kmsctl spellings: "ec-p256", "rsa-2048"
    threads: tuple[int, ...]  # PKCS#11 thread counts to try; the TPM is one queue


def _timed(sign: object, threads: int, duration: float) -> tuple[list[float], float]:
    """Call sign() from `threads` threads for `duration` s; latencies and the true window."""
    assert callable(sign)
    sign()  # warm: session, key handle, public key cache
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = time.perf_counter() + 0.05
    end = start + duration

    def loop(out: list[float]) -> None:
        clock = time.perf_counter
        while clock() < start:
            time.sleep(0.001)
        while True:
            t0 = clock()
            if t0 >= end:
                return
            sign()
            out.append(clock() - t0)

    workers = [threading.Thread(target=loop, args=(out,)) for out in latencies]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [v for out in latencies for v in out], duration


def _measure(spec: RawSpec) -> list[RunResult]:
    os.environ["SOFTHSM2_CONF"] = spec.softhsm_conf
    from crypto_service.config import Pkcs11Config, Tpm2Config
    from crypto_service.providers.base import KeyCreateOptions
    from crypto_service.providers.pkcs11 import Pkcs11Provider
    from crypto_service.providers.tpm2 import Tpm2Provider
    from edgekms.algorithms import KEY_TYPE_BY_CLI, key_type_info

    digest = secrets.token_bytes(32)
    results: list[RunResult] = []
    p11 = Pkcs11Provider(
        Pkcs11Config(spec.module, spec.token_label, sessions=max(spec.threads)), spec.pin
    )
    tpm = Tpm2Provider(Tpm2Config(tcti=spec.tcti, state_dir=Path(spec.tpm_state_dir)))
    try:
        for cli in spec.key_types:
            info = KEY_TYPE_BY_CLI[cli]
            algorithm = key_type_info(info.key_type).default_algorithm
            for name, provider, threads in (
                ("softhsm", p11, spec.threads),
                ("swtpm", tpm, (1,)),
            ):
                key_id = secrets.token_bytes(8)
                provider.generate(key_id, f"bench-{cli}", info.key_type, KeyCreateOptions())
                try:

                    def sign(p: Any = provider, k: bytes = key_id, a: Any = algorithm) -> bytes:
                        return bytes(p.sign(k, a, digest))

                    for n in threads:
                        lat, window = _timed(sign, n, spec.duration)
                        results.append(summarise("raw", name, cli, n, lat, window))
                finally:
                    provider.destroy(key_id)
    finally:
        p11.close()
        tpm.close()
    return results


def _child(spec: RawSpec, out: mp.Queue[list[RunResult]]) -> None:
    out.put(_measure(spec))


def run_raw(spec: RawSpec) -> list[RunResult]:
    ctx = mp.get_context("spawn")
    out: mp.Queue[list[RunResult]] = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, out))
    proc.start()
    budget = 120 + spec.duration * len(spec.key_types) * (len(spec.threads) + 1)
    results = out.get(timeout=budget)
    proc.join(10)
    return results
