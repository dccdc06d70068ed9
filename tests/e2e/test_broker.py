"""The broker's promises, against the real stack: mutual TLS, typed errors as gRPC
statuses, roles, health and reflection, and a crypto service that goes away and back."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import time
from typing import Any

import grpc
import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgekms import errors
from edgekms.client_certs import INTERNAL_CA_KEY
from edgekms.crypto_client import CryptoClient
from edgekms.identity import identity_uris
from edgekms.nats_signer import NatsDigestSigner
from edgekms.remote_key import remote_key
from edgekms.subjects import KEY_CLASS_INTERNAL
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import keys_pb2, keys_pb2_grpc
from mgmt.client import KMSClient
from mgmt.pki import InternalCA
from tests.e2e.conftest import KmsStack, Parts

SHA256_OF_HELLO = hashlib.sha256(b"hello").digest()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _channel(stack: KmsStack, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    ca = (stack.data_dir / "client" / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(
        stack.broker, creds, options=[("grpc.ssl_target_name_override", "edgekms-broker")]
    )


def _client_with(stack: KmsStack, cert: bytes, key: bytes) -> KMSClient:
    ca = (stack.data_dir / "client" / "ca.crt").read_bytes()
    return KMSClient(stack.broker, ca_cert=ca, cert=cert, key=key, server_name="edgekms-broker")


def issue_client_cert(stack: KmsStack, client: str, role: str) -> tuple[bytes, bytes]:
    """A client certificate from the stack's own internal CA (its key is in the token),
    signed as the broker signs client certificates: after the ceremony the broker's bus
    identity is the only one that may use the internal CA's key."""

    async def issue() -> tuple[bytes, bytes]:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            kv = await nc.jetstream().key_value("kms_keys")
            record = pb.KeyRecord()
            stored = (await kv.get(INTERNAL_CA_KEY)).value or b""
            record.ParseFromString(stack.open_record("kms_keys", INTERNAL_CA_KEY, stored))
            signer = NatsDigestSigner(
                CryptoClient(nc, key_class=KEY_CLASS_INTERNAL),
                asyncio.get_running_loop(),
                record.provider,
                record.key_id,
            )
            ca_key = remote_key(signer, record.public_key_der)
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            ca_cert = x509.load_pem_x509_certificate(
                (stack.data_dir / "pki" / "internal-ca.crt").read_bytes()
            )
            key = ec.generate_private_key(ec.SECP256R1())
            cert = await asyncio.to_thread(
                InternalCA(ca_cert, ca_key).issue_client, key.public_key(), client, role
            )
            return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
        finally:
            await nc.close()

    return asyncio.run(issue())


def _self_signed_client(client: str, role: str) -> tuple[bytes, bytes]:
    """A certificate with a perfect EdgeKMS identity, from a CA the broker never saw."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(identity_uris(client, role)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _trailing(error: grpc.RpcError) -> dict[str, bytes]:
    metadata: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    return {m.key: m.value if isinstance(m.value, bytes) else m.value.encode() for m in metadata}


def test_status_reports_every_part(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client:
        status = client.status()
    names = {c.name: c.ok for c in status.components}
    assert names == {
        "broker": True,
        "bus": True,
        "crypto/hsm0": True,
        "ca": True,
        # One line per audit writer's stream (docs/security.md, "Fail closed").
        "audit/broker": True,
        "audit/ca": True,
        "audit/crypto-hsm0": True,
        # The broker's archiver (docs/security.md, "Retention").
        "audit/archive": True,
    }
    assert status.ok


def test_whoami_reads_the_identity_from_the_certificate(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client:
        me = client.whoami()
    assert (me.client, me.role) == ("admin", "admin")


def test_no_client_certificate_fails_the_handshake(kms_stack: KmsStack) -> None:
    with _channel(kms_stack) as channel:
        stub = keys_pb2_grpc.SystemServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.WhoAmI(keys_pb2.WhoAmIRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_foreign_ca_certificate_fails_the_handshake(kms_stack: KmsStack) -> None:
    cert, key = _self_signed_client("admin", "admin")
    with _channel(kms_stack, cert, key) as channel:
        stub = keys_pb2_grpc.SystemServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.WhoAmI(keys_pb2.WhoAmIRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_reflection_answer(kms_stack: KmsStack) -> None:
    cert = (kms_stack.data_dir / "client" / "admin.crt").read_bytes()
    key = (kms_stack.data_dir / "client" / "admin.key").read_bytes()
    with _channel(kms_stack, cert, key) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(
            health_pb2.HealthCheckRequest(service="edgekms.v1.KeyService"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "edgekms.v1.KeyService",
        "edgekms.v1.SystemService",
        "grpc.health.v1.Health",
    } <= services


def test_unknown_key_is_not_found(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client, pytest.raises(errors.NotFound) as info:
        client.sign_digest("no/such-key", pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, SHA256_OF_HELLO)
    assert info.value.reason == "key.not_found"


@pytest.mark.parametrize(
    ("algorithm", "data", "reason"),
    [
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, b"\x00" * 31, "sign.digest_length"),
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA384, SHA256_OF_HELLO, "sign.digest_length"),
        (99, SHA256_OF_HELLO, "sign.algorithm_unknown"),
        (pb.SIGNATURE_ALGORITHM_UNSPECIFIED, SHA256_OF_HELLO, "sign.algorithm_missing"),
        (pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, SHA256_OF_HELLO, "sign.algorithm_mismatch"),
        (pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, b"", "sign.data_missing"),
    ],
)
def test_bad_sign_requests_are_invalid_argument(
    kms_stack: KmsStack, algorithm: int, data: bytes, reason: str
) -> None:
    with kms_stack.client() as client:
        if not _exists(client, "bad-input/p256"):
            client.create_key("bad-input/p256", "ec-p256")
        with pytest.raises(errors.InvalidArgument) as info:
            client.sign_digest("bad-input/p256", algorithm, data)  # type: ignore[arg-type]
    assert info.value.reason == reason


def _exists(client: KMSClient, name: str) -> bool:
    try:
        client.get_key(name)
        return True
    except errors.NotFound:
        return False


def test_empty_request_is_invalid_argument(kms_stack: KmsStack) -> None:
    cert = (kms_stack.data_dir / "client" / "admin.crt").read_bytes()
    key = (kms_stack.data_dir / "client" / "admin.key").read_bytes()
    with _channel(kms_stack, cert, key) as channel:
        stub = keys_pb2_grpc.KeyServiceStub(channel)
        calls: list[tuple[Any, Any]] = [
            (stub.Sign, keys_pb2.SignRequest()),
            (stub.CreateKey, keys_pb2.CreateKeyRequest()),
            (stub.GetKey, keys_pb2.GetKeyRequest()),
        ]
        for call, empty in calls:
            with pytest.raises(grpc.RpcError) as info:
                call(empty, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            trailing = _trailing(info.value)
            err = errors.from_bytes(trailing[errors.ERROR_METADATA_KEY])
            assert err.reason == "key.name_missing"


def test_disabled_and_destroyed_keys_are_failed_precondition(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client:
        client.create_key("lifecycle/p256", "ec-p256")
        client.sign("lifecycle/p256", b"before")
        client.disable_key("lifecycle/p256")
        with pytest.raises(errors.FailedPrecondition) as info:
            client.sign("lifecycle/p256", b"while disabled")
        assert info.value.reason == "key.disabled"
        client.enable_key("lifecycle/p256")
        client.sign("lifecycle/p256", b"enabled again")
        destroyed = client.destroy_key("lifecycle/p256")
        assert destroyed.state == pb.KEY_STATE_DESTROYED
        with pytest.raises(errors.FailedPrecondition) as info:
            client.sign("lifecycle/p256", b"after")
        assert info.value.reason == "key.destroyed"
        with pytest.raises(errors.FailedPrecondition):
            client.enable_key("lifecycle/p256")
        assert "lifecycle/p256" not in {k.name for k in client.list_keys()}
        assert "lifecycle/p256" in {k.name for k in client.list_keys(include_destroyed=True)}


def test_create_twice_is_already_exists_and_leaves_one_key(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client:
        first = client.create_key("dup/p256", "ec-p256")
        with pytest.raises(errors.AlreadyExists):
            client.create_key("dup/p256", "ec-p384")
        assert client.get_key("dup/p256").key_id == first.key_id


@pytest.mark.parametrize(
    ("name", "key_type", "provider", "reason"),
    [
        ("Upper/Case", pb.KEY_TYPE_EC_P256, "", "key.name_invalid"),
        ("a" * 129, pb.KEY_TYPE_EC_P256, "", "key.name_invalid"),
        ("ok-name", pb.KEY_TYPE_UNSPECIFIED, "", "key.type_missing"),
        ("ok-name", 42, "", "key.type_unknown"),
        ("ok-name", pb.KEY_TYPE_EC_P256, "nosuch", "provider.unknown"),
    ],
)
def test_bad_create_requests_store_nothing(
    kms_stack: KmsStack, name: str, key_type: int, provider: str, reason: str
) -> None:
    """Sent as raw gRPC: the broker itself must refuse, whatever a client checks first."""
    cert = (kms_stack.data_dir / "client" / "admin.crt").read_bytes()
    key = (kms_stack.data_dir / "client" / "admin.key").read_bytes()
    with kms_stack.client() as client:
        before = {k.name for k in client.list_keys(include_destroyed=True)}
    with _channel(kms_stack, cert, key) as channel:
        stub = keys_pb2_grpc.KeyServiceStub(channel)
        request = keys_pb2.CreateKeyRequest(name=name, key_type=key_type, provider=provider)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateKey(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = _trailing(info.value)
    assert errors.from_bytes(trailing[errors.ERROR_METADATA_KEY]).reason == reason
    with kms_stack.client() as client:
        assert {k.name for k in client.list_keys(include_destroyed=True)} == before


def test_signer_role_may_sign_but_not_create_or_destroy(kms_stack: KmsStack) -> None:
    with kms_stack.client() as admin:
        admin.create_key("roles/p256", "ec-p256")
    cert, key = issue_client_cert(kms_stack, "app1", "signer")
    with _client_with(kms_stack, cert, key) as signer:
        assert signer.whoami().role == "signer"
        signer.sign("roles/p256", b"allowed")
        with pytest.raises(errors.PermissionDenied) as info:
            signer.create_key("roles/other", "ec-p256")
        assert info.value.reason == "authz.role_denied"
        with pytest.raises(errors.PermissionDenied):
            signer.destroy_key("roles/p256")


def test_key_policy_limits_who_signs(kms_stack: KmsStack) -> None:
    policy = pb.KeyPolicy(
        rules=[
            pb.PolicyRule(
                clients=["app2"],
                operations=[pb.KEY_OPERATION_SIGN],
                algorithms=[pb.SIGNATURE_ALGORITHM_ECDSA_SHA256],
            )
        ]
    )
    with kms_stack.client() as admin:
        admin.create_key("policy/p256", "ec-p256", policy=policy)
    allowed = _client_with(kms_stack, *issue_client_cert(kms_stack, "app2", "signer"))
    other = _client_with(kms_stack, *issue_client_cert(kms_stack, "app3", "signer"))
    with allowed, other:
        allowed.sign("policy/p256", b"ok")
        with pytest.raises(errors.PermissionDenied) as info:
            allowed.sign("policy/p256", b"x", algorithm="ecdsa-sha384")
        assert info.value.reason == "authz.policy_denied"
        with pytest.raises(errors.PermissionDenied):
            other.sign("policy/p256", b"not app3")


def test_crypto_service_down_is_unavailable_then_recovers(parts: Parts) -> None:
    """With its crypto service gone the broker answers UNAVAILABLE provider.unavailable
    at once: NATS reports no responders, which is told apart from a slow service by the
    type, not by a stopwatch (a service that does not answer in time is DEADLINE_EXCEEDED
    provider.deadline, the client's own deadline DEADLINE_EXCEEDED too). Once the
    service is back, signing and the status recover; both are polled for."""
    with parts.client(timeout=60) as client:
        client.create_key("fault/p256", "ec-p256")
        client.sign("fault/p256", b"before")
        parts.stop("crypto")
        with pytest.raises(errors.Unavailable) as info:
            client.sign("fault/p256", b"while down")
        assert info.value.reason == "provider.unavailable"
        status = client.status()
        assert not status.ok
        assert {c.name: c.ok for c in status.components}["crypto/hsm0"] is False
        parts.start_crypto()
        signature = _until_ok(lambda: client.sign("fault/p256", b"after restart"))
        assert client.verify("fault/p256", b"after restart", signature)
        assert _until_ok(lambda: client.status().ok or None) is True


def _until_ok(attempt: Any, timeout: float = 60.0) -> Any:
    """Poll `attempt` until it returns something other than None without a retryable
    error; a crypto service that has just registered may still be warming up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = attempt()
            if result is not None:
                return result
        except (errors.Unavailable, errors.DeadlineExceeded):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not recovered within {timeout}s")
        time.sleep(0.2)
