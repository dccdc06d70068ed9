"""A `kmsctl up` stack seals its records (edgekms.sealed) and still works end to end: keys
made and used, a client added and revoked, a certificate issued by the mini-CA. Then the
attack of issue 11 item 3 with the broker's own bus identity: the revoked client's record
rewritten back to ACTIVE and its revocation entry deleted. After a restart of the whole
stack the client stays revoked, and the broker logs the refused record."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edgekms import errors
from edgekms.sealed import WRITERS, RecordSeal, load_public_key
from edgekms.v1 import clients_pb2, sealed_pb2
from mgmt.client import KMSClient
from mgmt.pki import point_client_at
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(300)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sealed") / "data"


def _kmsctl(stack: KmsStack, *args: str) -> str:
    env = {**os.environ, "EDGEKMS_DATA_DIR": str(stack.data_dir)}
    done = subprocess.run([KMSCTL, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def stack(data_dir: Path) -> Iterator[KmsStack]:
    running = start_stack(data_dir)
    try:
        yield running
    finally:
        stop_stack(running)


def _reader_seal(stack: KmsStack) -> RecordSeal:
    """A verifier built from the public keys `kmsctl up` put into the broker's config."""
    config = tomllib.loads((stack.data_dir / "config" / "broker.toml").read_text())
    return RecordSeal(
        None, None, {w: load_public_key(k) for w, k in config["seal_public_keys"].items()}
    )


def _csr(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


def test_keys_are_private_and_configs_carry_only_their_own(stack: KmsStack) -> None:
    secrets = stack.data_dir / "secrets" / "seal"
    for writer in WRITERS:
        assert stat.S_IMODE((secrets / f"{writer}.key").stat().st_mode) == 0o600
    for part, writer in (("broker", "broker"), ("ca", "ca")):
        config = tomllib.loads((stack.data_dir / "config" / f"{part}.toml").read_text())
        assert config["seal_writer"] == writer
        assert Path(config["seal_key_file"]).name == f"{writer}.key"
        assert set(config["seal_public_keys"]) == set(WRITERS)


def test_a_sealed_stack_works_and_a_revocation_survives_the_brokers_identity(
    stack: KmsStack, data_dir: Path, tmp_path: Path
) -> None:
    with stack.client(timeout=30) as admin:
        admin.create_key("sealed/app", "ec-p256")
        admin.ca_init(common_name="Sealed Test CA", timeout=120)
        issued = admin.issue_certificate("https-server", _csr("nas.home.arpa"))
        assert x509.load_der_x509_certificate(issued.certificate_der).subject
        assert admin.get_certificate(issued.record.serial).serial == issued.record.serial
    out = tmp_path / "victim"
    _kmsctl(stack, "client", "add", "victim", "--role", "signer", "--out-dir", str(out))
    with KMSClient.from_config(out / "config.toml", timeout=30) as victim:
        assert victim.verify("sealed/app", b"m", victim.sign("sealed/app", b"m"))
        serial = victim.whoami().serial
    _kmsctl(stack, "client", "revoke", "victim")

    async def inspect_and_attack() -> None:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            kv = await nc.jetstream(timeout=10).key_value("kms_clients")
            stored = (await kv.get("client.victim")).value or b""
            envelope = sealed_pb2.SealedRecord()
            envelope.ParseFromString(stored)
            assert envelope.writer == "broker"
            opened = clients_pb2.Client()
            opened.ParseFromString(_reader_seal(stack).open("kms_clients", "client.victim", stored))
            assert opened.status == clients_pb2.CLIENT_STATUS_REVOKED
            undone = clients_pb2.Client()
            undone.CopyFrom(opened)
            undone.status = clients_pb2.CLIENT_STATUS_ACTIVE
            undone.ClearField("revoked_at")
            undone.ClearField("revoked_by")
            await kv.put("client.victim", undone.SerializeToString())
            await kv.delete(f"revoked.{serial}")
        finally:
            await nc.close()

    asyncio.run(inspect_and_attack())
    stop_stack(stack)
    again = start_stack(data_dir)
    # The fixture stops whichever stack runs; the new one listens on new ports.
    stack.process, stack.log_path = again.process, again.log_path
    stack.nats_url, stack.broker = again.nats_url, again.broker
    point_client_at(out / "config.toml", again.broker)
    with KMSClient.from_config(out / "config.toml", timeout=30) as victim:
        with pytest.raises(errors.Unauthenticated) as refused:
            victim.sign("sealed/app", b"m")
        assert refused.value.reason == "auth.revoked"
    listed = json.loads(_kmsctl(stack, "client", "list", "--all", "-o", "json"))
    assert "victim" not in [c["name"] for c in listed]
    broker_log = (data_dir / "logs" / "broker.log").read_text()
    assert "record_tampered" in broker_log and "client.victim" in broker_log
    # The admin and the rest of the stack are unaffected.
    with again.client(timeout=30) as admin:
        assert admin.verify("sealed/app", b"n", admin.sign("sealed/app", b"n"))
