"""The load generator against the broker's Sign RPC, in one of two forms.

The Go client (bench/loadgen, built here with Debian's toolchain) is the default when `go`
and Debian's grpc sources are installed: one process keeping every request in flight over
one HTTP/2 connection, as a real client does, at a fraction of the CPU per request, so the
stack under test keeps the cores. The request bytes are serialized here from the real
generated classes and sample responses are parsed and verified here, so the Go side needs
no generated code. Otherwise: several processes, each a grpc.aio client holding its share
of the requests in flight.

Processes (not threads) for Python because one Python client process tops out near the
rate the broker can serve; `spawn`, because grpc's C core does not survive fork. Every
worker starts at the same wall-clock instant and counts only what completes inside the
window.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Watch, wait_until

log = logging.getLogger("bench.load")

SIGN_METHOD = "/edgekms.v1.KeyService/Sign"
LOADGEN_SRC = Path(__file__).parent / "loadgen"
LOADGEN_BIN = LOADGEN_SRC / "build" / "loadgen"
# Debian's golang-*-dev packages put their sources in one GOPATH tree; building in GOPATH
# mode against it needs no module download (the module proxy is out of reach here).
DEBIAN_GOPATH = Path("/usr/share/gocode")
GENERATORS = ("auto", "go", "python")


class BenchError(RuntimeError):
    """The bench cannot trust a run: the generator failed or a response is not a real
    signature by the key under test."""


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
    # DER public key of key_name: sample responses must verify against it. Empty: the
    # samples are only parsed.
    public_key_der: bytes = b""
    timeout: float = 10.0


@dataclass
class WorkerResult:
    latencies: bytes  # array('d') of seconds
    errors: int
    first_error: str
    pid: int
    samples: list[bytes]


def split(inflight: int, processes: int) -> list[int]:
    """Share `inflight` among at most `processes` workers, as evenly as it divides."""
    processes = max(1, min(processes, inflight))
    base, extra = divmod(inflight, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


async def _drive(
    spec: LoadSpec, inflight: int, start_at: float
) -> tuple[array.array[float], int, str, list[bytes]]:
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
        # Connect and warm the key path before the clock; its answer is the sample checked.
        first = await stub.Sign(request, timeout=spec.timeout)
        samples = [first.SerializeToString()]
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
                    await stub.Sign(request, timeout=spec.timeout)
                except grpc.RpcError as exc:
                    errors += 1
                    first_error = first_error or f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
                    continue
                if wall >= measure_from and time.time() < end:
                    latencies.append(clock() - t0)

        await asyncio.gather(*(one() for _ in range(inflight)))
    return latencies, errors, first_error, samples


def _worker(spec: LoadSpec, inflight: int, start_at: float, out: mp.Queue[WorkerResult]) -> None:
    latencies, errors, first_error, samples = asyncio.run(_drive(spec, inflight, start_at))
    out.put(WorkerResult(latencies.tobytes(), errors, first_error, os.getpid(), samples))


@dataclass
class LoadOutcome:
    latencies: list[float]
    errors: int
    first_error: str
    cpu: dict[str, float]  # process -> CPU seconds inside the measured window
    peak_kb: dict[str, int]  # process -> peak VmRSS inside the window
    generator: str = ""  # which load generator ran, as the report says it


def go_available() -> str:
    """Why the Go client cannot be built here, or "" if it can."""
    if shutil.which("go") is None:
        return "no `go` on PATH (Debian package golang-go)"
    if not (DEBIAN_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        return f"no grpc sources under {DEBIAN_GOPATH}/src (Debian package golang-google-grpc-dev)"
    return ""


def build_loadgen(output: Path = LOADGEN_BIN) -> Path:
    """Build bench/loadgen with Debian's toolchain and libraries (GOPATH mode, nothing
    downloaded). Go's build cache makes a rebuild of unchanged sources take a second."""
    missing = go_available()
    if missing:
        raise BenchError(f"cannot build the Go load generator: {missing}")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(DEBIAN_GOPATH), "GOFLAGS": ""}
    if "GOCACHE" not in env and "HOME" not in env:
        env["GOCACHE"] = str(output.parent / "cache")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["go", "build", "-o", str(output), "."],
        cwd=LOADGEN_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise BenchError(f"go build of bench/loadgen failed: {done.stderr.strip()[-2000:]}")
    return output


_resolved: dict[str, str] = {}


def resolve_generator(choice: str = "auto") -> str:
    """The generator to use, "go" or "python". "auto" takes Go when it builds and logs why
    not otherwise; the Go binary is built once per bench process."""
    if choice not in GENERATORS:
        raise ValueError(f"load generator {choice!r} is not one of {GENERATORS}")
    if choice == "python":
        return "python"
    if "go" not in _resolved:
        try:
            build_loadgen()
            _resolved["go"] = ""
        except BenchError as exc:
            _resolved["go"] = str(exc)
    if not _resolved["go"]:
        return "go"
    if choice == "go":
        raise BenchError(_resolved["go"])
    log.warning("load generator: falling back to grpc.aio processes: %s", _resolved["go"])
    return "python"


def describe(generator: str, processes: int, connections: int = 1, gomaxprocs: int = 2) -> str:
    """What ran, in the words the results use."""
    if generator == "go":
        plural = "" if connections == 1 else "s"
        return (
            f"go client (1 process, GOMAXPROCS={gomaxprocs}, "
            f"{connections} HTTP/2 connection{plural})"
        )
    plural = "" if processes == 1 else "es"
    return f"python grpc.aio client ({processes} process{plural})"


def check_samples(spec: LoadSpec, samples: Sequence[bytes]) -> None:
    """Each sample must parse as a SignResponse for the key and algorithm asked for and,
    when the public key is known, verify: a bench fast at returning garbage proves nothing."""
    from edgekms.algorithms import verify_signature
    from edgekms.v1 import keys_pb2

    if not samples:
        raise BenchError("the load generator returned no sample response to check")
    for raw in samples:
        response = keys_pb2.SignResponse()
        try:
            response.ParseFromString(raw)
        except Exception as exc:  # protobuf's DecodeError has no stable import path
            raise BenchError(f"sample response is not a SignResponse: {exc}") from exc
        if not response.signature or response.key_name != spec.key_name:
            raise BenchError(
                f"sample response is not a signature by {spec.key_name!r}: "
                f"key_name={response.key_name!r}, {len(response.signature)} signature bytes"
            )
        if spec.public_key_der and not verify_signature(
            spec.public_key_der, spec.algorithm, spec.data, response.signature
        ):
            raise BenchError(f"sample signature does not verify with {spec.key_name}'s public key")


def _request_bytes(spec: LoadSpec) -> bytes:
    from edgekms.v1 import keys_pb2

    request = keys_pb2.SignRequest(name=spec.key_name, algorithm=spec.algorithm, data=spec.data)
    return request.SerializeToString()


def _decode_latencies(encoded: str) -> list[float]:
    values: array.array[float] = array.array("d")
    values.frombytes(base64.b64decode(encoded))
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def run_load_go(
    spec: LoadSpec,
    watch: Mapping[str, int],
    connections: int = 1,
    gomaxprocs: int = 2,
    binary: Path = LOADGEN_BIN,
) -> LoadOutcome:
    """Run the Go client; watch the named processes and the client (as "loadgen0")."""
    with tempfile.TemporaryDirectory(prefix="edgekms-loadgen-") as tmp:
        # The client's key goes to the Go side as a 0600 file in a 0700 dir, never in argv.
        paths = {}
        for field, blob in (("ca_cert", spec.ca_cert), ("cert", spec.cert), ("key", spec.key)):
            path = Path(tmp) / f"{field}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            paths[field] = str(path)
        start_at = time.time() + 1.5  # exec + TLS handshake + first Sign fit in this
        request = {
            "target": spec.target,
            "server_name": spec.server_name,
            **paths,
            "method": SIGN_METHOD,
            "request_b64": base64.b64encode(_request_bytes(spec)).decode(),
            "inflight": spec.inflight,
            "connections": connections,
            "gomaxprocs": gomaxprocs,
            "warmup": spec.warmup,
            "duration": spec.duration,
            "start_at": start_at,
            "timeout": spec.timeout,
            "samples": 4,
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(request))
        with spec_path.open("rb") as stdin:
            proc = subprocess.Popen(
                [str(binary)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        try:
            wait_until(start_at + spec.warmup)
            sampler = Watch({**watch, "loadgen0": proc.pid})
            sampler.start()
            wait_until(start_at + spec.warmup + spec.duration)
            sampler.stop()
            out, err = proc.communicate(timeout=spec.timeout + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise BenchError(
            f"Go load generator exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
        )
    result = json.loads(out)
    check_samples(spec, [base64.b64decode(s) for s in result["samples_b64"]])
    first = result.get("first_error")
    latencies = _decode_latencies(result["latencies_f64le_b64"])
    if len(latencies) != result["count"]:
        raise BenchError(f"Go load generator sent {len(latencies)} latencies for {result['count']}")
    return LoadOutcome(
        latencies,
        int(result["errors"]),
        f"{first['code']}: {first['message']}" if first else "",
        sampler.cpu,
        sampler.peak_kb,
        describe("go", 1, connections, gomaxprocs),
    )


def run_load(
    spec: LoadSpec,
    processes: int,
    watch: Mapping[str, int],
    generator: str = "auto",
    connections: int = 1,
    gomaxprocs: int = 2,
) -> LoadOutcome:
    """Run the load; watch the named processes (and the generator's, as "loadgen*") while
    the measured window lasts. `processes` only applies to the Python generator."""
    if resolve_generator(generator) == "go":
        return run_load_go(spec, watch, connections, gomaxprocs)
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
    samples: list[bytes] = []
    for r in results:
        values: array.array[float] = array.array("d")
        values.frombytes(r.latencies)
        latencies.extend(values)
        errors += r.errors
        first_error = first_error or r.first_error
        samples.extend(r.samples)
    check_samples(spec, samples)
    return LoadOutcome(
        latencies,
        errors,
        first_error,
        sampler.cpu,
        sampler.peak_kb,
        describe("python", len(workers)),
    )
