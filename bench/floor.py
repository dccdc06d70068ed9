"""The floor under the broker: one grpc.aio process that answers Sign and does nothing else.

The broker is one CPython process serving unary gRPC calls over mutual TLS on uvloop. How
many such calls can a process like that serve on this machine at all? This starts exactly
that (same grpc, same TLS, same event loop, same Go client at the same concurrency) with a
handler that returns one precomputed, valid signature: no authorisation, no bus, no token,
no audit. Whatever the broker loses against this figure is EdgeKMS's; what this figure
cannot reach, no change inside the broker's Python reaches either.

`python -m bench.floor --serve PORT DIR` is the server (spawned by `run`); `run` is called
by `python -m bench` and prints nothing itself.
"""

from __future__ import annotations

import datetime
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadSpec, run_load
from bench.stats import RunResult, summarise

KEY_NAME = "floor/ec-p256"
SERVER_NAME = "floor-server"


@dataclass(frozen=True)
class MutualTls:
    """PEM of a throwaway CA, a server certificate and key, a client certificate and key."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def mutual_tls(server_name: str, client_name: str = "bench") -> MutualTls:
    """Certificates for a test gRPC server that requires client certificates, made with
    the same template as EdgeKMS's own (edgekms.client_certs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from edgekms.client_certs import host_names, leaf_certificate, self_signed_ca

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench test CA")])
    ca = self_signed_ca(ca_key, name, datetime.timedelta(days=1))
    made = []
    for cn, eku in ((server_name, ExtendedKeyUsageOID.SERVER_AUTH),
                    (client_name, ExtendedKeyUsageOID.CLIENT_AUTH)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = leaf_certificate(ca, ca_key, cn, key.public_key(), host_names([cn]), [eku])
        made.append((cert.public_bytes(serialization.Encoding.PEM), pem_key(key)))
    (server_cert, server_key), (client_cert, client_key) = made
    ca_cert = ca.public_bytes(serialization.Encoding.PEM)
    return MutualTls(ca_cert, server_cert, server_key, client_cert, client_key)


def _pki(directory: Path) -> dict[str, bytes]:
    """The floor server's TLS material and the one signature it answers with, as files."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    tls = mutual_tls(SERVER_NAME)
    signing_key = ec.generate_private_key(ec.SECP256R1())
    digest = secrets.token_bytes(32)
    signature = signing_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    files = {
        "ca.crt": tls.ca_cert,
        "server.crt": tls.server_cert,
        "server.key": tls.server_key,
        "client.crt": tls.client_cert,
        "client.key": tls.client_key,
        "signature": signature,
        "digest": digest,
        "public.der": signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for file_name, blob in files.items():
        (directory / file_name).write_bytes(blob)
        (directory / file_name).chmod(0o600)
    return files


async def _serve(port: int, directory: Path) -> None:
    from edgekms.v1 import common_pb2, keys_pb2

    answer = keys_pb2.SignResponse(
        signature=(directory / "signature").read_bytes(),
        algorithm=common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        key_name=KEY_NAME,
    ).SerializeToString()

    async def sign(request: bytes, context: Any) -> bytes:
        return answer

    await serve_sign(port, directory, sign)


async def serve_sign(
    port: int, directory: Path, sign: Callable[[bytes, Any], Awaitable[bytes]]
) -> None:
    """Serve `sign` as KeyService/Sign on raw bytes over the floor's mutual TLS (its
    files in `directory`) until the process ends: one set-up for every floor server."""
    import grpc

    handler = grpc.method_handlers_generic_handler(
        "edgekms.v1.KeyService", {"Sign": grpc.unary_unary_rpc_method_handler(sign)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [((directory / "server.key").read_bytes(), (directory / "server.crt").read_bytes())],
        root_certificates=(directory / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    await server.wait_for_termination()


def run(
    work: Path, duration: float, warmup: float, inflights: tuple[int, ...] = (1, 64)
) -> list[RunResult]:
    """The trivial server's latency, rate and CPU per call at each of `inflights`, with
    the bench's client. Both unary targets compare against it: the rate at 64 in flight,
    and the p50 at 1 in flight (one call's wake-ups through grpc and TLS, nothing else)."""
    from mgmt.natsserver import free_port, wait_for_port

    directory = work / "floor"
    directory.mkdir(mode=0o700)
    files = _pki(directory)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--serve", str(port), str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = []
    try:
        wait_for_port("127.0.0.1", port, 15.0, server)
        time.sleep(0.3)
        for inflight in inflights:
            watch = {"grpc.aio server": server.pid}
            results.append(measure("floor", port, files, inflight, duration, warmup, watch))
    finally:
        server.terminate()
        server.wait(10)
    return results


def measure(
    name: str, port: int, files: dict[str, bytes], inflight: int, duration: float,
    warmup: float, watch: dict[str, int],
) -> RunResult:  # fmt: skip
    """One run of the bench's client against a floor server on `port` (the floor's TLS
    files and signature), as RunResult path `name`, with `watch`'s processes' CPU."""
    from edgekms.v1 import common_pb2

    spec = LoadSpec(
        target=f"127.0.0.1:{port}",
        server_name=SERVER_NAME,
        ca_cert=files["ca.crt"],
        cert=files["client.crt"],
        key=files["client.key"],
        key_name=KEY_NAME,
        algorithm=common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        data=files["digest"],
        inflight=inflight,
        duration=duration,
        warmup=warmup,
        public_key_der=files["public.der"],
    )
    outcome = run_load(spec, 2 if inflight > 1 else 1, watch)
    return summarise(
        name, "none", "ec-p256", inflight, outcome.latencies, duration,
        errors=outcome.errors, cpu=outcome.cpu, note=outcome.generator,
    )  # fmt: skip


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] != "--serve":
        raise SystemExit("usage: python -m bench.floor --serve PORT DIR (spawned by the bench)")
    from edgekms import aio

    aio.run(_serve(int(sys.argv[2]), Path(sys.argv[3])))


if __name__ == "__main__":
    main()
