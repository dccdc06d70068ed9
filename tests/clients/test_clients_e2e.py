"""Clients, revocation, key patterns, policies and throttling against the real parts
(nats-server with JetStream, a SoftHSM token, kms-crypto, the ceremony, kms-broker as
processes), driven through kmsctl and KMSClient as an administrator and a client would."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgekms import errors
from edgekms.audit import parse_message
from edgekms.client_certs import INTERNAL_CA_KEY, client_certificate
from edgekms.crypto_client import CryptoClient
from edgekms.nats_signer import NatsDigestSigner
from edgekms.remote_key import remote_key
from edgekms.subjects import KEY_CLASS_INTERNAL
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from tests.e2e.conftest import Parts, running_parts

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


class Stack(Parts):
    def __post_init__(self) -> None:
        # gRPC core logs why a TLS handshake failed at INFO: an environment asking gRPC
        # for less must not hide from the broker's log the reasons wait_for_broker_log reads.
        self.broker_env["GRPC_VERBOSITY"] = "INFO"

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def data_dir(self) -> Path:
        return self.root

    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGEKMS_DATA_DIR": str(self.root)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_parts(tmp_path_factory.mktemp("clients"), Stack) as built:
        yield built


def kmsctl(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [KMSCTL, *args], env=stack.env(), capture_output=True, text=True, timeout=60
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def add_client(stack: Stack, tmp: Path, name: str, role: str, *extra: str) -> KMSClient:
    out = tmp / name
    kmsctl(stack, "client", "add", name, "--role", role, "--out-dir", str(out), *extra)
    return KMSClient.from_config(out / "config.toml", timeout=10)


NO_EKU: list[x509.ObjectIdentifier] = []  # shared_issue(eku=NO_EKU): no extendedKeyUsage at all


@dataclass(frozen=True)
class Issued:
    """A client certificate and its key as PEM, with what the test asked for."""

    cert: bytes
    key: bytes
    not_after: datetime.datetime

    def client(self, stack: Stack) -> KMSClient:
        ca_pem = (stack.data_dir / "client" / "ca.crt").read_bytes()
        return KMSClient(
            stack.broker,
            ca_cert=ca_pem,
            cert=self.cert,
            key=self.key,
            server_name="edgekms-broker",
            timeout=5,
        )


def shared_issue(
    stack: Stack,
    client: str,
    role: str,
    not_after: datetime.datetime | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> Issued:
    """A certificate from the stack's internal CA, signed in the token through the bus
    with the same template `kmsctl client add` uses (edgekms.client_certs), so that a
    test changing one property (validity, EKU) changes only that one. `eku=NO_EKU` drops
    the extension, which the template always writes, and signs the rest unchanged."""

    async def issue() -> Issued:
        nc = await nats.connect(stack.nats_url)
        try:
            kv = await nc.jetstream().key_value("kms_keys")
            record = pb.KeyRecord()
            record.ParseFromString((await kv.get(INTERNAL_CA_KEY)).value or b"")
            signer = NatsDigestSigner(
                CryptoClient(nc, key_class=KEY_CLASS_INTERNAL),
                asyncio.get_running_loop(),
                record.provider,
                record.key_id,
            )
            ca_key = remote_key(signer, record.public_key_der)
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            ca = x509.load_pem_x509_certificate((stack.data_dir / "client" / "ca.crt").read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            start = None
            if not_after is not None:
                start = not_after - datetime.timedelta(days=1)
            cert = await asyncio.to_thread(
                client_certificate,
                ca,
                ca_key,
                key.public_key(),
                client,
                role,
                not_before=start,
                not_after=not_after,
                eku=eku or None,
            )
            if eku is NO_EKU:
                cert = await asyncio.to_thread(_without_eku, cert, ca_key)
            pem_key = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            return Issued(
                cert.public_bytes(serialization.Encoding.PEM), pem_key, cert.not_valid_after_utc
            )
        finally:
            await nc.close()

    return asyncio.run(issue())


def _without_eku(cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if not isinstance(ext.value, x509.ExtendedKeyUsage):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(ca_key, hashes.SHA256())


def broker_log_size(stack: Stack) -> int:
    return (stack.root / "broker.log").stat().st_size


def wait_for_broker_log(stack: Stack, since: int, text: str, timeout: float = 30.0) -> str:
    """Poll the broker's log, from byte `since`, for a line containing `text`.

    A TLS refusal never reaches the broker's handlers, and gRPC closes the socket
    without a TLS alert, so the client sees only UNAVAILABLE "Socket closed", the same
    as for any broken connection. The reason exists in one place: the line gRPC core
    logs for the failed handshake (ssl_transport_security.cc, "Handshake failed with
    error ... CERTIFICATE_VERIFY_FAILED: <reason>")."""
    deadline = time.monotonic() + timeout
    while True:
        with open(stack.root / "broker.log", "rb") as log:
            log.seek(since)
            for line in log.read().decode(errors="replace").splitlines():
                if "Handshake failed" in line and text in line:
                    return line
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker logged no handshake failure with {text!r}")
        time.sleep(0.1)


def _audit(stack: Stack) -> list[dict[str, object]]:
    """Every audit entry so far (batched records expanded), read as the administrator."""
    with stack.client() as admin:
        return [
            entry
            for item in admin.tail_audit(1)
            if item.HasField("record")
            for entry in parse_message(item.record.raw)
        ]


@pytest.fixture(scope="module")
def keys(stack: Stack) -> list[str]:
    with stack.client() as admin:
        for name in ("nas/https", "vpn/x", "pol/web"):
            admin.create_key(name, "ec-p256")
    return ["nas/https", "vpn/x", "pol/web"]


def test_signer_added_signs_then_revoked_is_refused_at_once(
    stack: Stack, keys: list[str], tmp_path: Path
) -> None:
    signer = add_client(stack, tmp_path, "alice", "signer")
    with signer:
        assert signer.whoami().role == "signer"
        assert signer.verify("nas/https", b"m", signer.sign("nas/https", b"m"))
        listed = json.loads(kmsctl(stack, "client", "list", "-o", "json").stdout)
        alice = next(c for c in listed if c["name"] == "alice")
        assert (alice["role"], alice["status"]) == ("signer", "active")
        assert alice["serial"] == signer.whoami().serial
        kmsctl(stack, "client", "revoke", "alice")
        with pytest.raises(errors.Unauthenticated) as refused:
            signer.sign("nas/https", b"m")  # the very next request, same channel
        assert refused.value.reason == "auth.revoked"
    # Audited once, under the name and role the refused certificate carries.
    revoked = [e for e in _audit(stack) if e["outcome"] == "auth.revoked"]
    assert [(e["action"], e["target"], e["actor"]) for e in revoked] == [
        ("Sign", "nas/https", {"client": "alice", "role": "signer"})
    ]
    after = json.loads(kmsctl(stack, "client", "list", "--all", "-o", "json").stdout)
    assert next(c for c in after if c["name"] == "alice")["status"] == "revoked"
    names = [c["name"] for c in json.loads(kmsctl(stack, "client", "list", "-o", "json").stdout)]
    assert "alice" not in names
    # The name is free again, with a new certificate; the old serial stays revoked.
    again = add_client(stack, tmp_path / "again", "alice", "signer")
    with again:
        assert again.sign("nas/https", b"m")


def test_adding_an_active_name_twice_is_already_exists(stack: Stack, tmp_path: Path) -> None:
    add_client(stack, tmp_path, "bob", "operator").close()
    done = kmsctl(
        stack,
        "client",
        "add",
        "bob",
        "--role",
        "signer",
        "--out-dir",
        str(tmp_path / "b2"),
        check=False,
    )
    assert done.returncode == 5 and "client.exists" in done.stderr
    assert not (tmp_path / "b2" / "bob.key").exists()


def test_key_pattern_is_enforced(stack: Stack, keys: list[str], tmp_path: Path) -> None:
    with add_client(stack, tmp_path, "nas-signer", "signer", "--keys", "nas/*") as nas:
        assert nas.sign("nas/https", b"x")
        with pytest.raises(errors.PermissionDenied) as denied:
            nas.sign("vpn/x", b"x")
        assert denied.value.reason == "authz.key_pattern"
        assert [k.name for k in nas.list_keys()] == ["nas/https"]


def test_shared_issue_makes_certificates_that_work(stack: Stack) -> None:
    """The positive control for the refusals below: the helper's certificates, with no
    property changed, are accepted and name their holder."""
    issued = shared_issue(stack, "fine", "signer")
    with issued.client(stack) as fine:
        who = fine.whoami()
        assert (who.client, who.role) == ("fine", "signer")
    short = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    with shared_issue(stack, "short", "signer", not_after=short).client(stack) as c:
        assert c.whoami().client == "short"
    explicit = shared_issue(stack, "cauth", "admin", eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with explicit.client(stack) as c:
        assert c.whoami().client == "cauth"


def test_expired_certificate_refused(stack: Stack) -> None:
    # Expired before connecting: refused in the TLS handshake, for that reason.
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    since = broker_log_size(stack)
    old = shared_issue(stack, "old", "signer", not_after=past)
    with old.client(stack) as expired, pytest.raises(errors.Unavailable):
        expired.whoami()
    wait_for_broker_log(stack, since, "certificate has expired")
    # Expired while connected: TLS checked it once, at the handshake; the broker checks
    # on every request and refuses the next one as auth.expired. The window only has to
    # cover issuing plus one request; a machine too slow for it gets a longer one.
    for window in (10, 30, 90):
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=window)
        issued = shared_issue(stack, f"brief{window}", "signer", not_after=until)
        with issued.client(stack) as brief:
            try:
                assert brief.whoami().client == f"brief{window}"
            except errors.Unavailable:
                if datetime.datetime.now(datetime.UTC) < issued.not_after:
                    raise
                continue  # expired before the first request got through
            while datetime.datetime.now(datetime.UTC) <= issued.not_after:
                time.sleep(0.2)  # waiting for the wall clock to pass notAfter
            with pytest.raises(errors.Unauthenticated) as refused:
                brief.whoami()
            assert refused.value.reason == "auth.expired"
            refusals = [e for e in _audit(stack) if e["outcome"] == "auth.expired"]
            assert [(e["action"], e["actor"]) for e in refusals] == [
                ("WhoAmI", {"client": f"brief{window}", "role": "signer"})
            ]
            return
    pytest.fail("no certificate lived long enough to be used once")


def test_wrong_eku_refused(stack: Stack) -> None:
    # serverAuth only: TLS itself checks the purpose (OpenSSL's ssl_client) and refuses.
    since = broker_log_size(stack)
    wrong = shared_issue(stack, "srv", "admin", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with wrong.client(stack) as srv, pytest.raises(errors.Unavailable):
        srv.whoami()
    wait_for_broker_log(stack, since, "unsupported certificate purpose")
    # No extendedKeyUsage at all satisfies TLS (no EKU means any purpose); the broker
    # requires clientAuth explicitly.
    with shared_issue(stack, "noeku", "admin", eku=NO_EKU).client(stack) as noeku:
        with pytest.raises(errors.Unauthenticated) as refused:
            noeku.whoami()
        assert refused.value.reason == "auth.no_client_eku"


def test_wrong_role_refused(stack: Stack, keys: list[str], tmp_path: Path) -> None:
    with add_client(stack, tmp_path, "enrol", "enrollee") as enrollee:
        assert enrollee.whoami().role == "enrollee"
        with pytest.raises(errors.PermissionDenied) as denied:
            enrollee.sign("nas/https", b"x")
        assert denied.value.reason == "authz.role_denied"
        with pytest.raises(errors.PermissionDenied):
            enrollee.add_client("evil", "admin", public_key_der=b"x")


def test_policy_set_via_cli_is_enforced(stack: Stack, keys: list[str], tmp_path: Path) -> None:
    carol = add_client(stack, tmp_path, "carol", "signer")
    dave = add_client(stack, tmp_path, "dave", "signer")
    with carol, dave:
        kmsctl(stack, "key", "policy", "pol/web", "--allow", "carol:sign,verify:ecdsa-sha256")
        shown = json.loads(kmsctl(stack, "key", "policy", "pol/web", "-o", "json").stdout)
        assert shown["policy"] == [
            {
                "roles": [],
                "clients": ["carol"],
                "operations": ["sign", "verify"],
                "algorithms": ["ecdsa-sha256"],
            }
        ]
        assert carol.sign("pol/web", b"x", algorithm="ecdsa-sha256")
        with pytest.raises(errors.PermissionDenied) as denied:
            carol.sign("pol/web", b"x", algorithm="ecdsa-sha384")
        assert denied.value.reason == "authz.policy_denied"
        with pytest.raises(errors.PermissionDenied):
            dave.sign("pol/web", b"x", algorithm="ecdsa-sha256")
        bad = kmsctl(
            stack, "key", "policy", "pol/web", "--allow", "carol:sign:rsa-pss-sha256", check=False
        )
        assert bad.returncode == 3 and "policy.algorithm_mismatch" in bad.stderr
        reserved = kmsctl(
            stack, "key", "policy", INTERNAL_CA_KEY, "--allow", "admin:sign", check=False
        )
        assert reserved.returncode == 6 and "key.reserved" in reserved.stderr
        kmsctl(stack, "key", "policy", "pol/web", "--clear")
        assert dave.sign("pol/web", b"x", algorithm="ecdsa-sha256")


def test_pkcs12_opens_with_the_password(stack: Stack, keys: list[str], tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("s3cret-passphrase\n")
    out = tmp_path / "p12"
    kmsctl(
        stack,
        "client",
        "add",
        "phone",
        "--role",
        "signer",
        "--p12",
        "--password-file",
        str(password),
        "--out-dir",
        str(out),
    )
    bundle = (out / "phone.p12").read_bytes()
    assert (out / "phone.p12").stat().st_mode & 0o077 == 0
    key, cert, extra = pkcs12.load_key_and_certificates(bundle, b"s3cret-passphrase")
    assert key is not None and cert is not None and len(extra) == 1
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(bundle, b"wrong-password")
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = extra[0].public_bytes(serialization.Encoding.PEM)
    with KMSClient(
        stack.broker,
        ca_cert=ca,
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=pem_key,
        server_name="edgekms-broker",
    ) as phone:
        assert phone.whoami().client == "phone"
        assert phone.sign("nas/https", b"p12")


def test_repeated_failures_are_throttled(stack: Stack, keys: list[str], tmp_path: Path) -> None:
    with add_client(stack, tmp_path, "prober", "signer") as prober:
        for _ in range(10):  # FailureThrottle's default budget
            with pytest.raises(errors.PermissionDenied):
                prober.destroy_key("vpn/x")
        with pytest.raises(errors.ResourceExhausted) as throttled:
            prober.sign("nas/https", b"x")  # even a request it may make, for a while
        assert throttled.value.reason == "auth.throttled"
        assert int(throttled.value.details["retry_after_seconds"]) >= 1
    with stack.client() as admin:  # others are not affected
        assert admin.whoami().client == "admin"
        assert admin.get_key("vpn/x").state == pb.KEY_STATE_ACTIVE
