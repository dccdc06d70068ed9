"""Certificate issuance: the same CSRs to EdgeKMS's CertificateAuthority gRPC service
through the broker (mutual TLS as the admin client; the broker authorises, writes the
audit record and forwards to the CA service, which checks the CSR against the
https-server profile, signs with the intermediate key in the token and stores the record
in the CA bucket) and to `cfssl serve` (Debian's golang-cfssl, CA key in software), at 1
and 16 in flight.

The load runs in one spawned process per run (asyncio: grpc.aio or aiohttp), measured
the same way as the Sign runs. `python -m bench.issuance` runs the EdgeKMS half alone on a
fresh stack and prints CPU per certificate per process (`--profile DIR`: py-spy stacks of
the CA, the broker and crypto-hsm0), for iterating on the issuance path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import Watch, wait_until
from bench.stats import RunResult, summarise
from edgekms.client_certs import self_signed_ca
from mgmt.natsserver import free_port, wait_for_port

if TYPE_CHECKING:
    from bench.profile import Spies

LEVELS = (1, 16)
PROFILE = "https-server"
CSR_COUNT = 64


@dataclass(frozen=True)
class IssueSpec:
    kind: str  # "edgekms" | "cfssl" | "cfssl-sqlite" | "step-ca"
    target: str  # the broker's host:port or the peer's base URL
    data_dir: str  # the stack's (admin credentials) or step-ca's (provisioner, root)
    csrs: tuple[bytes, ...]  # PEM
    inflight: int
    duration: float
    warmup: float


def make_csrs(count: int = CSR_COUNT) -> tuple[bytes, ...]:
    """P-256 CSRs for distinct host names, each with the SAN the profile requires."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = []
    for i in range(count):
        host = f"host{i}.bench.lan"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return tuple(out)


async def _edgekms_caller(spec: IssueSpec) -> tuple[Callable[[bytes], Awaitable[None]], Any]:
    import uuid

    import grpc

    from edgekms.v1 import ca_pb2, ca_pb2_grpc
    from mgmt.clientconfig import load_client_config

    config = load_client_config(Path(spec.data_dir) / "client" / "config.toml")
    ca_cert, cert, key = config.read_credentials()
    name = config.server_name or "edgekms-broker"
    channel = grpc.aio.secure_channel(
        spec.target,
        grpc.ssl_channel_credentials(ca_cert, key, cert),
        options=[("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)],
    )
    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

    async def call(csr: bytes) -> None:
        request = ca_pb2.IssueCertificateRequest(
            profile=PROFILE, csr=csr, request_id=str(uuid.uuid4())
        )
        response = await stub.IssueCertificate(request, timeout=30)
        if not response.certificate_der:
            raise RuntimeError("no certificate in the answer")

    return call, channel.close


async def _cfssl_caller(spec: IssueSpec) -> tuple[Callable[[bytes], Awaitable[None]], Any]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=spec.inflight))

    async def call(csr: bytes) -> None:
        body = {"certificate_request": csr.decode(), "profile": "server"}
        async with session.post(f"{spec.target}/api/v1/cfssl/sign", json=body) as resp:
            answer = await resp.json(content_type=None)
        if not answer.get("success") or not answer.get("result", {}).get("certificate"):
            raise RuntimeError(f"cfssl: {answer.get('errors')}")

    return call, session.close


async def _drive(spec: IssueSpec, start_at: float) -> tuple[list[float], int, str]:
    if spec.kind == "edgekms":
        call, close = await _edgekms_caller(spec)
    elif spec.kind == "step-ca":
        from bench.peers import stepca_caller

        call, close = await stepca_caller(spec)
    else:  # cfssl, with or without its SQLite certdb: the same API
        call, close = await _cfssl_caller(spec)
    latencies: list[float] = []
    errors = 0
    first_error = ""
    measure_from = start_at + spec.warmup
    end = measure_from + spec.duration
    try:
        await call(spec.csrs[0])

        async def one(index: int) -> None:
            nonlocal errors, first_error
            await asyncio.sleep(max(0.0, start_at - time.time()))
            n = index
            while time.time() < end:
                t0, wall = time.perf_counter(), time.time()
                try:
                    await call(spec.csrs[n % len(spec.csrs)])
                except Exception as exc:
                    errors += 1
                    first_error = first_error or str(exc)[:200]
                    continue
                finally:
                    n += spec.inflight
                if wall >= measure_from and time.time() < end:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(spec.inflight)))
    finally:
        await close()
    return latencies, errors, first_error


def _child(spec: IssueSpec, start_at: float, out: mp.Queue[tuple[list[float], int, str]]) -> None:
    try:
        out.put(asyncio.run(_drive(spec, start_at)))
    except Exception as exc:
        out.put(([], 1, f"load process failed: {exc!r}"[:300]))


def measure(
    spec: IssueSpec, watch: Mapping[str, int], lead: float = 3.0
) -> tuple[RunResult, list[float], dict[str, int]]:
    """One run in a spawned load process; `lead` seconds for it to start (and prepare,
    e.g. step-ca's tokens) before the warm-up begins."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[tuple[list[float], int, str]] = ctx.Queue()
    start_at = time.time() + lead
    proc = ctx.Process(target=_child, args=(spec, start_at, out))
    proc.start()
    wait_until(start_at + spec.warmup)
    sampler = Watch({**watch, "loadgen0": proc.pid or 0})
    sampler.start()
    wait_until(start_at + spec.warmup + spec.duration)
    sampler.stop()
    latencies, errors, first_error = out.get(timeout=20 + spec.duration)
    proc.join(10)
    run = summarise(
        "issue", spec.kind, "ec-p256", spec.inflight, latencies, spec.duration,
        errors=errors, cpu=sampler.cpu, note=first_error,
    )  # fmt: skip
    return run, latencies, sampler.peak_kb


def _init_ca(client_config: Path) -> None:
    """The CA (P-256 root and intermediate in hsm0) through the broker, as an admin does."""
    from edgekms.errors import AlreadyExists
    from mgmt.client import KMSClient

    # AlreadyExists: a second run on the same data dir.
    with (
        KMSClient.from_config(client_config, timeout=60) as client,
        contextlib.suppress(AlreadyExists),
    ):
        client.ca_init("Bench CA", "ec-p256", provider="hsm0")


def _start_cfssl(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`cfssl serve` with a P-256 CA key in software and a "server" signing profile."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    binary = shutil.which("cfssl")
    if binary is None:
        raise RuntimeError("cfssl not found: apt-get install golang-cfssl")
    directory = work / "cfssl"
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cfssl Bench CA")])
    cert = self_signed_ca(key, name, datetime.timedelta(days=30))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca-key.pem").chmod(0o600)
    config = {
        "signing": {
            "default": {"expiry": "9528h", "usages": ["digital signature", "server auth"]},
            "profiles": {
                "server": {"expiry": "9528h", "usages": ["digital signature", "server auth"]}
            },
        }
    }
    (directory / "config.json").write_text(json.dumps(config))
    port = free_port()
    log = open(directory / "cfssl.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            binary, "serve", "-address", "127.0.0.1", "-port", str(port),
            "-ca", str(directory / "ca.pem"), "-ca-key", str(directory / "ca-key.pem"),
            "-config", str(directory / "config.json"), "-loglevel", "3",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    wait_for_port("127.0.0.1", port, 15.0, proc)
    return proc, f"http://127.0.0.1:{port}"


def run(
    stack: Any,
    work: Path,
    duration: float,
    warmup: float,
    pids: Mapping[str, int],
    csrs: tuple[bytes, ...] | None = None,
) -> tuple[list[RunResult], dict[str, list[float]], dict[str, int]]:
    """EdgeKMS then cfssl (no DB) at each level; `csrs` so that bench/peers.py can sign
    the very same ones."""
    csrs = csrs or make_csrs()
    _init_ca(stack.client_config)
    runs: list[RunResult] = []
    samples: dict[str, list[float]] = {}
    peak: dict[str, int] = {}
    for n in LEVELS:
        run_, lat, kb = measure(
            IssueSpec("edgekms", stack.broker, str(stack.data_dir), csrs, n, duration, warmup),
            pids,
        )
        runs.append(run_)
        samples[f"issue/edgekms/{n}"] = lat
        for name, value in kb.items():
            if not name.startswith("loadgen"):
                peak[name] = max(peak.get(name, 0), value)
    cfssl, url = _start_cfssl(work)
    try:
        for n in LEVELS:
            spec = IssueSpec("cfssl", url, "", csrs, n, duration, warmup)
            run_, lat, _ = measure(spec, {"cfssl": cfssl.pid})
            runs.append(run_)
            samples[f"issue/cfssl/{n}"] = lat
    finally:
        cfssl.terminate()
        cfssl.wait(10)
    return runs, samples, peak


def _profile_start(pids: Mapping[str, int], out: Path, seconds: float) -> Spies:
    """py-spy on the CA service, the broker and crypto-hsm0 for `seconds` (raw stacks)."""
    from bench.profile import py_spy, start_spies

    binary = py_spy()
    if binary is None:
        return {}
    return start_spies(binary, pids, ("ca", "broker", "crypto-hsm0"), out, seconds, "issue-")


def main() -> None:
    """`python -m bench.issuance`: EdgeKMS issuance alone on a fresh stack, for iterating
    on the issuance path (rate, CPU per certificate per process; `--profile`: py-spy)."""
    import argparse
    import tempfile

    from bench import stackrun
    from bench.profile import collect_spies

    parser = argparse.ArgumentParser(prog="python -m bench.issuance", description=main.__doc__)
    parser.add_argument("--inflight", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-issue-"))
    try:
        stack = stackrun.start(work / "data")
        try:
            pids = stack.pids()
            csrs = make_csrs()
            _init_ca(stack.client_config)
            for n in args.inflight:
                spec = IssueSpec(
                    "edgekms", stack.broker, str(stack.data_dir), csrs, n,
                    args.duration, args.warmup,
                )  # fmt: skip
                spies: Spies = {}
                if args.profile is not None:
                    spies = _profile_start(
                        pids, args.profile / str(n), args.duration + args.warmup + 3.5
                    )
                result, _, _ = measure(spec, pids)
                per_cert = {
                    name: round(cpu / args.duration / max(result.rate, 1) * 1e6)
                    for name, cpu in sorted(result.cpu.items())
                    if cpu > 0.01
                }
                print(
                    f"in flight {n}: {result.rate:,.0f}/s p50 {result.p50_ms:.2f} ms "
                    f"p99 {result.p99_ms:.2f} ms errors {result.errors} {result.note}"
                )
                print(f"  CPU µs per certificate: {per_cert}")
                for name, summary in collect_spies(spies, top=15).items():
                    if "error" in summary:
                        print(f"  py-spy {name}: {summary['error']}")
                        continue
                    print(f"  py-spy {name}: {summary['samples']} samples")
                    for fn, share in summary["self"]:
                        print(f"    {share:5.1f}%  {fn}")
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
