"""Enrollment against the real stack (`kmsctl up`: nats-server, SoftHSM, kms-crypto, the
CA, the broker with its enrollment listener): a device enrolls from a one-time token and
signs through the broker with its own identity; bad tokens and CSRs are refused with
typed errors and spend nothing; a broker killed mid-enrollment loses no token; a denied
device (or group) is refused on its next request, cannot renew or enroll again."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgekms import errors
from edgekms.v1 import (
    audit_pb2,
    ca_pb2,
    clients_pb2,
    crypto_pb2,
    enroll_pb2,
    keys_pb2,
    sealed_pb2,
    workload_pb2,
)
from mgmt.cli import cli
from mgmt.cli.common import ExitCode
from mgmt.client import KMSClient
from mgmt.enroll import pinned_ca, send_enroll, split_server
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json


def enroll_address(stack: KmsStack) -> str:
    return str(stack.state()["enroll"])


def new_token(stack: KmsStack, tmp: Path, name: str, *extra: str) -> tuple[Path, str, str]:
    """(token file, fingerprint, token id) from `kmsctl enroll token create`."""
    path = tmp / f"{name}.token"
    made = run_json(
        stack, "enroll", "token", "create", name, "--profile", "device", "--token-out",
        str(path), *extra,
    )  # fmt: skip
    assert "token" not in made  # written to the file only
    return path, made["fingerprint"], made["id"]


def device_enroll(stack: KmsStack, token: Path, fingerprint: str, out: Path) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "enroll", "--server", enroll_address(stack), "--token", str(token),
            "--fingerprint", fingerprint, "--out-dir", str(out), "-o", "json",
        ],
    )  # fmt: skip


def enrolled(stack: KmsStack, tmp: Path, name: str, *extra: str) -> Path:
    token, fingerprint, _ = new_token(stack, tmp, name, *extra)
    result = device_enroll(stack, token, fingerprint, tmp / name)
    assert result.exit_code == 0, result.output
    return tmp / name / "config.toml"


def csr(key: Any, cn: str | None = None, sans: list[x509.GeneralName] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def redeem(stack: KmsStack, token: str, fingerprint: str, der: bytes, rid: str = "") -> Any:
    return send_enroll(
        enroll_address(stack),
        fingerprint,
        enroll_pb2.EnrollRequest(token=token, csr=der, request_id=rid or os.urandom(8).hex()),
        retries=0,
    )


def token_state(stack: KmsStack, token_id: str) -> str:
    listed = run_json(stack, "enroll", "token", "list", "--all")
    return str({t["id"]: t for t in listed}[token_id]["state"])


def test_a_device_enrolls_from_a_token_and_signs_with_its_own_identity(
    stack: KmsStack, tmp_path: Path
) -> None:
    run_json(stack, "key", "create", "devices/sensor-1/app", "--type", "ec-p256")
    run_json(stack, "key", "create", "nas/not-yours", "--type", "ec-p256")
    token, fingerprint, token_id = new_token(stack, tmp_path, "sensor-1", "--group", "lab")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    result = device_enroll(stack, token, fingerprint, tmp_path / "dev")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["name"] == "sensor-1" and out["role"] == "signer"
    assert out["keys"] == "devices/sensor-1/*"
    assert stat.S_IMODE((tmp_path / "dev" / "device.key").stat().st_mode) == 0o600

    with KMSClient.from_config(tmp_path / "dev" / "config.toml", timeout=20) as device:
        me = device.whoami()
        assert (me.client, me.role) == ("sensor-1", "signer")
        signature = device.sign("devices/sensor-1/app", b"reading 42")
        public = serialization.load_der_public_key(
            device.get_public_key("devices/sensor-1/app").der
        )
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, b"reading 42", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(errors.PermissionDenied) as refused:
            device.sign("nas/not-yours", b"x")
        assert refused.value.reason == "authz.key_pattern"
    shown = run_json(stack, "device", "show", "sensor-1")
    assert shown["group"] == "lab" and shown["status"] == "active"
    assert token_state(stack, token_id) == "used"
    # Replayed: the token is spent.
    again = device_enroll(stack, token, fingerprint, tmp_path / "dev2")
    assert again.exit_code == ExitCode.PERMISSION_DENIED, again.output
    assert "enroll.token_used" in again.output
    assert not (tmp_path / "dev2" / "device.key").exists()


def test_a_token_is_kept_only_as_the_hash_of_its_secret(stack: KmsStack, tmp_path: Path) -> None:
    """The token string is shown once (written to --token-out); what the broker keeps
    is the SHA-256 of its secret, and neither the listing, the audit log nor the
    stack's logs carry the secret."""
    token_file, _fingerprint, token_id = new_token(stack, tmp_path, "hash-only", "--ttl", "1h")
    token = token_file.read_text().strip()
    prefix, listed_id, secret = token.split(".")
    assert (prefix, listed_id) == ("ekt1", token_id)
    record = _read_token_record(stack, token_id)
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).digest()
    assert record.name == "hash-only" and record.profile == "device"
    raw = record.SerializeToString()
    assert secret.encode() not in raw
    assert base64.urlsafe_b64decode(secret + "=") not in raw
    listed = run(stack, "enroll", "token", "list", "--all", "-o", "json")
    audit = run(stack, "audit", "tail", "-o", "json")
    assert listed.exit_code == 0 and audit.exit_code == 0, listed.output + audit.output
    assert token_id in listed.stdout and secret not in listed.stdout
    created = [
        json.loads(line)["entry"]
        for line in audit.stdout.splitlines()
        if '"CreateEnrollToken"' in line
    ]
    assert any(e["target"] == "hash-only" for e in created), created  # the creation is there
    assert secret not in audit.stdout
    assert secret not in stack.log_path.read_text(errors="replace")


def test_a_wrong_fingerprint_never_sends_the_token(stack: KmsStack, tmp_path: Path) -> None:
    token, _fingerprint, token_id = new_token(stack, tmp_path, "pinned")
    wrong = "0" * 64
    result = device_enroll(stack, token, wrong, tmp_path / "pinned")
    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    assert "enroll.fingerprint_mismatch" in result.output
    assert token_state(stack, token_id) == "active"


def test_malformed_wrong_and_revoked_tokens_are_refused(stack: KmsStack, tmp_path: Path) -> None:
    token_file, fingerprint, token_id = new_token(stack, tmp_path, "victim")
    token = token_file.read_text().strip()
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.InvalidArgument) as bad:
        redeem(stack, "not-a-token", fingerprint, csr(key))
    assert bad.value.reason == "enroll.token_malformed"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(errors.Unauthenticated) as wrong:
        redeem(stack, forged, fingerprint, csr(key))
    assert wrong.value.reason == "enroll.token_invalid"
    run_json(stack, "enroll", "token", "revoke", token_id)
    with pytest.raises(errors.Unauthenticated) as revoked:
        redeem(stack, token, fingerprint, csr(key))
    assert revoked.value.reason == "enroll.token_revoked"
    assert "victim" not in {c["name"] for c in run_json(stack, "client", "list", "--all")}


def test_csrs_the_token_does_not_allow_are_refused_and_spend_nothing(
    stack: KmsStack, tmp_path: Path
) -> None:
    token_file, fingerprint, token_id = new_token(
        stack, tmp_path, "cam-1", "--san", "dns:cam-1.home.arpa"
    )
    token = token_file.read_text().strip()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = [
        (csr(ec_key, cn="cam-2"), "enroll.name_not_allowed"),
        (csr(ec_key, sans=[x509.DNSName("evil.example")]), "enroll.name_not_allowed"),
        (csr(rsa.generate_private_key(65537, 2048)), "enroll.key_not_allowed"),
    ]
    for der, reason in cases:
        with pytest.raises(errors.PermissionDenied) as refused:
            redeem(stack, token, fingerprint, der)
        assert refused.value.reason == reason
    with pytest.raises(errors.InvalidArgument) as malformed:
        redeem(stack, token, fingerprint, b"not a csr")
    assert malformed.value.reason == "enroll.csr_invalid"
    assert token_state(stack, token_id) == "active"
    # The names it does allow: enrolled.
    ok = redeem(
        stack, token, fingerprint, csr(ec_key, cn="cam-1", sans=[x509.DNSName("cam-1.home.arpa")])
    )
    assert ok.client.name == "cam-1"


def test_an_expired_token_is_refused(stack: KmsStack) -> None:
    with stack.client() as admin:
        made = admin.create_enroll_token("late-1", ttl_seconds=60)
    expires = datetime.datetime.fromisoformat(made.token.expires_at)
    deadline = time.monotonic() + 180 * SLOWDOWN
    while datetime.datetime.now(datetime.UTC) <= expires and time.monotonic() < deadline:
        time.sleep(1)
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.Unauthenticated) as expired:
        redeem(stack, made.token_string, made.ca_fingerprint, csr(key))
    assert expired.value.reason == "enroll.token_expired"


def test_without_a_client_certificate_only_enrollment_and_health_answer(
    stack: KmsStack, tmp_path: Path
) -> None:
    """The enrollment listener asks for no client certificate, so it must serve nothing
    else: every method of every other service of the contract, and reflection, is
    UNIMPLEMENTED there; health answers. (The main port refuses the handshake itself
    without a client certificate: tests/e2e/test_broker.py.)"""
    _token, fingerprint, _ = new_token(stack, tmp_path, "no-cert-probe")
    host, port = split_server(enroll_address(stack))
    ca, leaf = pinned_ca(host, port, fingerprint)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    credentials = grpc.ssl_channel_credentials(ca.public_bytes(serialization.Encoding.PEM))
    options = [("grpc.ssl_target_name_override", names.get_values_for_type(x509.DNSName)[0])]
    modules = (
        audit_pb2, ca_pb2, clients_pb2, crypto_pb2, enroll_pb2, keys_pb2, sealed_pb2,
        workload_pb2,
    )  # fmt: skip
    paths = [
        f"/{service.full_name}/{method.name}"
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        if service.full_name != "edgekms.v1.EnrollmentService"
        for method in service.methods
    ]
    paths += [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    assert "/edgekms.v1.KeyService/Sign" in paths and len(paths) > 40, paths
    with grpc.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=20 * SLOWDOWN
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answered = {}
        for path in paths:
            call = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
            try:
                call(b"", timeout=20 * SLOWDOWN)
                answered[path] = "OK"
            except grpc.RpcError as exc:
                answered[path] = exc.code().name
    assert {p: c for p, c in answered.items() if c != "UNIMPLEMENTED"} == {}


def test_tokens_are_throttled_after_repeated_failures(stack: KmsStack, tmp_path: Path) -> None:
    token_file, fingerprint, _ = new_token(stack, tmp_path, "brute")
    token = token_file.read_text().strip()
    key = ec.generate_private_key(ec.SECP256R1())
    seen: list[str] = []
    for i in range(12):
        guess = token[:-6] + f"{i:06d}"
        try:
            redeem(stack, guess, fingerprint, csr(key))
        except errors.KMSError as err:
            seen.append(err.reason)
    assert "enroll.token_invalid" in seen
    assert seen[-1] == "auth.throttled"
    # Even the right token is refused while the guesser's backoff runs.
    with pytest.raises(errors.ResourceExhausted):
        redeem(stack, token, fingerprint, csr(key))
    audit = run(stack, "audit", "tail", "-o", "json")
    assert audit.exit_code == 0, audit.output
    assert "enroll.token_invalid" in audit.stdout


def _read_token_record(stack: KmsStack, token_id: str) -> enroll_pb2.EnrollToken:
    async def read() -> bytes:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            kv = await nc.jetstream().key_value("kms_clients")
            entry = await kv.get(f"token.{token_id}")
            return stack.open_record("kms_clients", f"token.{token_id}", entry.value or b"")
        finally:
            await nc.close()

    record = enroll_pb2.EnrollToken()
    record.ParseFromString(asyncio.run(read()))
    return record


def _rewrite_token_record(stack: KmsStack, token_id: str) -> None:
    """Write the token's record again unchanged (as another broker replica might): its
    revision moves on, so the next compare-and-set on the old revision loses."""

    async def rewrite() -> None:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            kv = await nc.jetstream().key_value("kms_clients")
            entry = await kv.get(f"token.{token_id}")
            await kv.update(f"token.{token_id}", entry.value or b"", last=entry.revision)
        finally:
            await nc.close()

    asyncio.run(rewrite())


def _device_serial(stack: KmsStack, name: str) -> str:
    async def read() -> bytes:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            kv = await nc.jetstream().key_value("kms_clients")
            entry = await kv.get(f"device.{name}")
            return stack.open_record("kms_clients", f"device.{name}", entry.value or b"")
        finally:
            await nc.close()

    record = enroll_pb2.Device()
    record.ParseFromString(asyncio.run(read()))
    return record.serial


@dataclass
class Reserved:
    """An enrollment caught between "reserve" and "store": the token is reserved and the
    broker waits on kms-crypto, which is stopped (SIGSTOP) until `resume()`."""

    name: str
    token: str
    fingerprint: str
    token_id: str
    key: ec.EllipticCurvePrivateKey
    request_id: str
    broker_pid: int
    crypto_pid: int
    thread: threading.Thread
    outcome: list[BaseException | None]
    resumed: bool = False

    def resume(self) -> None:
        """Let kms-crypto run again and wait for the attempt to end."""
        if not self.resumed:
            self.resumed = True
            os.kill(self.crypto_pid, signal.SIGCONT)
        self.thread.join(60 * SLOWDOWN)


@pytest.fixture
def reserved(stack: KmsStack, tmp_path: Path) -> Iterator[Reserved]:
    """A token brought to "reserved" with kms-crypto stopped: the attempt (a thread) hangs
    on the token's signature until the test resumes it (always resumed at teardown)."""
    name = "crashy-" + os.urandom(3).hex()
    token_file, fingerprint, token_id = new_token(stack, tmp_path, name)
    token = token_file.read_text().strip()
    key = ec.generate_private_key(ec.SECP256R1())
    request_id = "crash-" + os.urandom(4).hex()
    children = dict(stack.state()["children"])  # type: ignore[call-overload]
    crypto_pid, broker_pid = int(children["crypto-hsm0"]), int(children["broker"])
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            redeem(stack, token, fingerprint, csr(key), request_id)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    state = Reserved(
        name, token, fingerprint, token_id, key, request_id, broker_pid, crypto_pid,
        threading.Thread(target=attempt), outcome,
    )  # fmt: skip
    os.kill(crypto_pid, signal.SIGSTOP)
    try:
        state.thread.start()
        deadline = time.monotonic() + 60 * SLOWDOWN
        while _read_token_record(stack, token_id).state != enroll_pb2.ENROLL_TOKEN_STATE_RESERVED:
            if time.monotonic() > deadline:
                pytest.fail("the token was never reserved")
            time.sleep(0.05)
        yield state
    finally:
        state.resume()


def until_enrolled(stack: KmsStack, reserved: Reserved, request_id: str) -> Any:
    """Redeem the reserved token (its key) with `request_id` once the broker is back."""
    deadline = time.monotonic() + 120 * SLOWDOWN
    while True:
        try:
            return redeem(
                stack, reserved.token, reserved.fingerprint, csr(reserved.key), request_id
            )
        except errors.KMSError as err:
            if err.code_name not in ("ERROR_CODE_UNAVAILABLE", "ERROR_CODE_DEADLINE_EXCEEDED"):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_broker_killed_mid_enrollment_leaves_the_token_usable(
    stack: KmsStack, reserved: Reserved
) -> None:
    # The token's signature hangs (crypto service stopped), so the broker is caught
    # between reserving the token and storing a certificate; then it is killed.
    os.kill(reserved.broker_pid, signal.SIGKILL)
    reserved.resume()
    assert reserved.outcome and reserved.outcome[0] is not None  # did not get through
    # Reserved, not consumed, no device: the token is still there to use.
    record = _read_token_record(stack, reserved.token_id)
    assert record.state == enroll_pb2.ENROLL_TOKEN_STATE_RESERVED
    # kmsctl up restarts the broker; the device's retry (same request id) enrolls.
    done = until_enrolled(stack, reserved, reserved.request_id)
    assert done.client.name == reserved.name
    record = _read_token_record(stack, reserved.token_id)
    assert record.state == enroll_pb2.ENROLL_TOKEN_STATE_USED


def test_a_broker_killed_after_store_before_consume_never_spends_the_token_twice(
    stack: KmsStack, reserved: Reserved
) -> None:
    """The state a broker killed between step 3 (store) and step 4 (consume) leaves,
    made deterministic: while the broker waits on the crypto service (token reserved),
    the token record is rewritten, so step 4's compare-and-set loses after the device and
    client records are stored; then the broker is killed and restarted by kmsctl up."""
    name, token_id = reserved.name, reserved.token_id
    _rewrite_token_record(stack, token_id)
    reserved.resume()
    outcome = reserved.outcome
    assert len(outcome) == 1 and isinstance(outcome[0], errors.Unavailable), outcome
    assert outcome[0].reason == "enroll.token_busy"
    # Stored, not consumed: the device and its client exist, the token is still reserved.
    record = _read_token_record(stack, token_id)
    assert record.state == enroll_pb2.ENROLL_TOKEN_STATE_RESERVED
    stored_serial = _device_serial(stack, name)
    clients = {c["name"]: c for c in run_json(stack, "client", "list", "--all")}
    assert clients[name]["serial"] == stored_serial
    # The broker dies in that state; kmsctl up starts it again.
    os.kill(reserved.broker_pid, signal.SIGKILL)
    # Someone else with the token, another request id: refused, and the token consumed.
    with pytest.raises(errors.Unauthenticated) as thief:
        until_enrolled(stack, reserved, "thief-" + os.urandom(4).hex())
    assert thief.value.reason == "enroll.token_used"
    assert _read_token_record(stack, token_id).state == enroll_pb2.ENROLL_TOKEN_STATE_USED
    # The device's own retry (same request id) gets the certificate that was stored.
    done = until_enrolled(stack, reserved, reserved.request_id)
    assert done.client.name == name and done.client.serial == stored_serial
    issued = x509.load_pem_x509_certificate(done.certificate_pem.encode())
    assert issued.public_key() == reserved.key.public_key()
    assert format(issued.serial_number, "x") == stored_serial
    assert _read_token_record(stack, token_id).state == enroll_pb2.ENROLL_TOKEN_STATE_USED
    # And only one client certificate was ever made for the name.
    clients = {c["name"]: c for c in run_json(stack, "client", "list", "--all")}
    assert clients[name]["serial"] == stored_serial
