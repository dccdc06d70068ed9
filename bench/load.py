"""The load generator: several processes, each a grpc.aio client holding its share of the
requests in flight against the broker's Sign RPC.

Processes (not threads) because one Python client process tops out near the rate the
broker can serve; `spawn`, because grpc's C core does not survive fork. Every worker
starts at the same wall-clock instant and counts only what completes inside the window.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.procs import Watch, wait_until


@dataclass(frozen=True)
class LoadSpec:
    target: str
    server_name: str
    ca_cert: bytes
    cert: bytes
    key: bytes
    key_name: str
    algorithm: Any  # edgekms.v1.common_pb2.SignatureAlgorithm
    data: bytes
    inflight: int
    duration: float
    warmup: float


@dataclass
class WorkerResult:
    latencies: bytes  # array('d') of seconds
    errors: int
    first_error: str
    pid: int


def split(inflight: int, processes: int) -> list[int]:
    """Share `inflight` among at most `processes` workers, as evenly as it divides."""
    processes = max(1, min(processes, inflight))
    base, extra = divmod(inflight, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


async def _drive(
    spec: LoadSpec, inflight: int, start_at: float
) -> tuple[array.array[float], int, str]:
    import grpc

    from edgekms.v1 import keys_pb2, keys_pb2_grpc

    creds = grpc.ssl_channel_credentials(spec.ca_cert, spec.key, spec.cert)
    options = [
        ("grpc.ssl_target_name_override", spec.server_name),
        ("grpc.default_authority", spec.server_name),
    ]
    latencies: array.array[float] = array.array("d")
    errors = 0
    first_error = ""
    async with grpc.aio.secure_channel(spec.target, creds, options=options) as channel:
        stub = keys_pb2_grpc.KeyServiceStub(channel)
        request = keys_pb2.SignRequest(name=spec.key_name, algorithm=spec.algorithm, data=spec.data)
        await stub.Sign(request, timeout=10)  # connect and warm the key path before the clock
        measure_from = start_at + spec.warmup
        end = measure_from + spec.duration

        async def one() -> None:
            nonlocal errors, first_error
            delay = start_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            clock = time.perf_counter
            while True:
                t0 = clock()
                wall = time.time()
                if wall >= end:
                    return
                try:
                    await stub.Sign(request, timeout=10)
                except grpc.RpcError as exc:
                    errors += 1
                    first_error = first_error or f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
                    continue
                if wall >= measure_from and time.time() < end:
                    latencies.append(clock() - t0)

        await asyncio.gather(*(one() for _ in range(inflight)))
    return latencies, errors, first_error


def _worker(spec: LoadSpec, inflight: int, start_at: float, out: mp.Queue[WorkerResult]) -> None:
    latencies, errors, first_error = asyncio.run(_drive(spec, inflight, start_at))
    out.put(WorkerResult(latencies.tobytes(), errors, first_error, os.getpid()))


@dataclass
class LoadOutcome:
    latencies: list[float]
    errors: int
    first_error: str
    cpu: dict[str, float]  # process -> CPU seconds inside the measured window
    peak_kb: dict[str, int]  # process -> peak VmRSS inside the window


def run_load(spec: LoadSpec, processes: int, watch: Mapping[str, int]) -> LoadOutcome:
    """Run the load; watch the named processes (and the workers, as "loadgen") while the
    measured window lasts."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[WorkerResult] = ctx.Queue()
    shares = split(spec.inflight, processes)
    start_at = time.time() + 3.0  # spawn + import + connect fit in this
    workers = [ctx.Process(target=_worker, args=(spec, n, start_at, out)) for n in shares]
    for w in workers:
        w.start()
    wait_until(start_at + spec.warmup)
    sampler = Watch(watch)
    for i, w in enumerate(workers):
        sampler.pids[f"loadgen{i}"] = w.pid or 0
    sampler.start()
    wait_until(start_at + spec.warmup + spec.duration)
    sampler.stop()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(10)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    for r in results:
        values: array.array[float] = array.array("d")
        values.frombytes(r.latencies)
        latencies.extend(values)
        errors += r.errors
        first_error = first_error or r.first_error
    return LoadOutcome(latencies, errors, first_error, sampler.cpu, sampler.peak_kb)
