"""The Go load generator (bench/loadgen) against a small real gRPC server over mutual TLS.

The server implements KeyService/Sign with a real EC key, so what the Go client sends
(bytes serialized by Python) and what it hands back (raw response bytes) go through the
same parse-and-verify the bench applies. Skipped where Debian's Go toolchain and grpc
sources are absent: `make test` does not need Go, `make bench` installs it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from bench.floor import MutualTls, mutual_tls
from bench.load import BenchError, LoadSpec, build_loadgen, check_samples, go_available, run_load_go
from edgekms.v1 import common_pb2, keys_pb2
from mgmt.natsserver import free_port

SERVER_NAME = "loadgen-test-server"
KEY_NAME = "bench/test/ec-p256"
ECDSA_SHA256 = common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256

Handler = Callable[[keys_pb2.SignRequest, grpc.ServicerContext], keys_pb2.SignResponse]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = go_available()
    if missing:
        pytest.skip(f"Go load generator not buildable here: {missing}")
    return build_loadgen(tmp_path_factory.mktemp("loadgen") / "loadgen")


Pki = MutualTls


@pytest.fixture(scope="module")
def pki() -> Pki:
    return mutual_tls(SERVER_NAME)


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _serve(pki: Pki, handler: Handler) -> tuple[grpc.Server, str]:
    """A synchronous grpc server (threads) with the real KeyService/Sign wire types."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    method = grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=keys_pb2.SignRequest.FromString,
        response_serializer=keys_pb2.SignResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("edgekms.v1.KeyService", {"Sign": method}),)
    )
    creds = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)],
        root_certificates=pki.ca_cert,
        require_client_auth=True,
    )
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def serve(pki: Pki) -> Iterator[Callable[[Handler], str]]:
    servers: list[grpc.Server] = []

    def start(handler: Handler) -> str:
        server, target = _serve(pki, handler)
        servers.append(server)
        return target

    yield start
    for server in servers:
        server.stop(grace=None)


def _signer(key: ec.EllipticCurvePrivateKey) -> Handler:
    def sign(request: keys_pb2.SignRequest, context: grpc.ServicerContext) -> keys_pb2.SignResponse:
        signature = key.sign(request.data, ec.ECDSA(Prehashed(hashes.SHA256())))
        return keys_pb2.SignResponse(
            signature=signature, algorithm=request.algorithm, key_name=request.name
        )

    return sign


def _spec(pki: Pki, target: str, public_key_der: bytes, inflight: int = 4) -> LoadSpec:
    return LoadSpec(
        target=target,
        server_name=SERVER_NAME,
        ca_cert=pki.ca_cert,
        cert=pki.client_cert,
        key=pki.client_key,
        key_name=KEY_NAME,
        algorithm=ECDSA_SHA256,
        data=secrets.token_bytes(32),
        inflight=inflight,
        duration=1.0,
        warmup=0.2,
        public_key_der=public_key_der,
        timeout=5.0,
    )


def _der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_go_client_drives_sign_and_returns_verified_samples(
    loadgen: Path,
    pki: Pki,
    signing_key: ec.EllipticCurvePrivateKey,
    serve: Callable[[Handler], str],
) -> None:
    target = serve(_signer(signing_key))
    outcome = run_load_go(_spec(pki, target, _der(signing_key)), {}, binary=loadgen)
    assert outcome.errors == 0, outcome.first_error
    assert len(outcome.latencies) > 10
    assert all(0 < s < 5 for s in outcome.latencies)
    assert outcome.cpu["loadgen0"] > 0  # the Go process was watched, by that name
    assert outcome.peak_kb["loadgen0"] > 0
    assert outcome.generator == "go client (1 process, GOMAXPROCS=2, 1 HTTP/2 connection)"


def test_signature_by_another_key_is_a_bench_error(
    loadgen: Path,
    pki: Pki,
    signing_key: ec.EllipticCurvePrivateKey,
    serve: Callable[[Handler], str],
) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    target = serve(_signer(impostor))
    with pytest.raises(BenchError, match="does not verify"):
        run_load_go(_spec(pki, target, _der(signing_key), inflight=1), {}, binary=loadgen)


def test_errors_are_counted_with_the_first_status(
    loadgen: Path,
    pki: Pki,
    signing_key: ec.EllipticCurvePrivateKey,
    serve: Callable[[Handler], str],
) -> None:
    sign = _signer(signing_key)
    calls = [0]

    def every_third(
        request: keys_pb2.SignRequest, context: grpc.ServicerContext
    ) -> keys_pb2.SignResponse:
        calls[0] += 1
        if calls[0] % 3 == 0:  # calls 1 and 2 warm the two connections up
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "authz.denied: not this key")
        return sign(request, context)

    target = serve(every_third)
    outcome = run_load_go(
        _spec(pki, target, _der(signing_key), inflight=1), {}, connections=2, binary=loadgen
    )
    assert outcome.errors > 0 and len(outcome.latencies) > 0
    assert outcome.first_error == "PermissionDenied: authz.denied: not this key"
    assert "2 HTTP/2 connections" in outcome.generator


def test_samples_that_are_not_sign_responses_are_refused(
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    spec = _spec(Pki(b"", b"", b"", b"", b""), "127.0.0.1:1", _der(signing_key))
    with pytest.raises(BenchError, match="no sample"):
        check_samples(spec, [])
    with pytest.raises(BenchError, match="not a"):
        check_samples(spec, [b"\xff\xff\xff"])
    other = keys_pb2.SignResponse(signature=b"x", key_name="someone/else").SerializeToString()
    with pytest.raises(BenchError, match="not a signature by"):
        check_samples(spec, [other])
