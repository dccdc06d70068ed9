"""A `kmsctl up` stack seals its records (edgekms.sealed) and still works end to end: keys
made and used, a client added and revoked, a certificate issued by the mini-CA. Then the
attack of issue 11 item 3 with the broker's own bus identity: the revoked client's record
rewritten back to ACTIVE and its revocation entry deleted. After a restart of the whole
stack the client stays revoked, and the broker logs the refused record."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
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

from edgekms import errors, kvread
from edgekms.sealed import WRITERS, RecordSeal, load_public_key
from edgekms.v1 import clients_pb2, sealed_pb2
from edgekms.v1 import common_pb2 as pb
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


def _policy(*roles: str) -> pb.KeyPolicy:
    return pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=list(roles), operations=[pb.KEY_OPERATION_SIGN])]
    )


def test_a_keys_older_looser_policy_written_back_does_not_return(
    stack: KmsStack, tmp_path: Path
) -> None:
    """Issue 11: with the broker's bus identity, a key's older genuine record (its
    looser policy) written back under the same key. The running broker refuses it as a
    replay (record.replayed in its log) and the key fails closed; the signer the old
    policy allowed never signs again; after the broker is killed and restarted it still
    refuses the record (its counters were kept on disk)."""
    loose, strict = _policy("signer", "admin"), _policy("admin")
    out = tmp_path / "replayer"
    _kmsctl(stack, "client", "add", "replayer", "--role", "signer", "--out-dir", str(out))
    with stack.client(timeout=30) as admin:
        admin.create_key("replay/app", "ec-p256", policy=loose)
        with KMSClient.from_config(out / "config.toml", timeout=30) as signer:
            assert signer.sign("replay/app", b"allowed while loose")
        admin.update_key_policy("replay/app", strict)
        with (
            KMSClient.from_config(out / "config.toml", timeout=30) as signer,
            pytest.raises(errors.PermissionDenied),
        ):
            signer.sign("replay/app", b"refused once strict")

    async def replay() -> None:
        nc = await nats.connect(stack.nats_url, **stack.nats_options("broker"))
        try:
            js = nc.jetstream(timeout=10)
            kv = await js.key_value("kms_keys")
            reader = _reader_seal(stack)
            for entry in await kvread.history(js, "kms_keys", "replay/app"):
                record = pb.KeyRecord()
                record.ParseFromString(reader.open("kms_keys", "replay/app", entry.value or b""))
                if record.state == pb.KEY_STATE_ACTIVE and record.policy == loose:
                    await kv.put("replay/app", entry.value or b"")  # genuine, and older
                    return
            raise AssertionError("no older record with the loose policy in the history")
        finally:
            await nc.close()

    asyncio.run(replay())
    broker_log = stack.data_dir / "logs" / "broker.log"

    def refused_in_log() -> int:
        return sum(
            "record.replayed" in line and "replay/app" in line
            for line in broker_log.read_text().splitlines()
        )

    deadline = time.monotonic() + 60
    with KMSClient.from_config(out / "config.toml", timeout=30) as signer:
        while refused_in_log() == 0:
            assert time.monotonic() < deadline, "the broker did not refuse the replay"
            time.sleep(0.2)
        with pytest.raises((errors.NotFound, errors.PermissionDenied)):
            signer.sign("replay/app", b"the loose policy must not return")
    with stack.client(timeout=30) as admin, pytest.raises(errors.NotFound):
        admin.get_key("replay/app")  # fails closed until its owner writes it again
    # Killed and restarted by `kmsctl up`: the broker reads the bucket afresh, with the
    # counters it kept, and refuses the record again.
    before = refused_in_log()
    os.kill(int(stack.state()["children"]["broker"]), signal.SIGKILL)  # type: ignore[index]
    deadline = time.monotonic() + 180
    while True:
        try:
            with stack.client(timeout=10) as admin:
                admin.get_key("replay/app")
            raise AssertionError("the restarted broker accepted the replayed record")
        except errors.NotFound:
            break
        except errors.Unavailable:
            assert time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.5)
    assert refused_in_log() > before
    with (
        KMSClient.from_config(out / "config.toml", timeout=30) as signer,
        pytest.raises((errors.NotFound, errors.PermissionDenied)),
    ):
        signer.sign("replay/app", b"still not")
