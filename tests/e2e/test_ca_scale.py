"""Issue 11 item 2 reproduced against a `kmsctl up` stack (bus max_payload 128 KiB): with
4,000 revoked certificates the CRL is about 160 KB. Before, revoking one more made the
CA's CRL write pass max_payload, nats-server dropped the CA's connection, the CA stayed
alive answering `ca.unavailable`, `/crl` gave 500, and `kmsctl status` said ok. Now the
revocation is taken, `kmsctl ca crl` and `/crl` give all 4,001 entries, the CA process is
the same one, listings page through every record, and `kmsctl status` notices a CA that
does not answer.

The 4,000 revocations are seeded through the CA's own store module with the CA's bus
identity (bench.seed); the revocation, CRL build, storage and delivery are the CA's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509

from bench.seed import seed_records
from ca_service.store import CAStore
from edgekms.sealed import WRITER_CA
from edgekms.v1 import ca_pb2
from mgmt.natsauth import CA_USER, local_credentials
from mgmt.sealkeys import local_seal
from tests.ca.helpers import make_csr, make_key
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(900)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
REVOKED = 4000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    started = start_stack(tmp_path_factory.mktemp("cascale") / "data")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


def kmsctl(stack: KmsStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMSCTL, *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def _seed(stack: KmsStack, certificate_der: bytes) -> list[str]:
    nc = await nats.connect(
        stack.nats_url, **local_credentials(stack.data_dir, CA_USER).connect_options()
    )
    try:
        # Sealed as the CA seals its records (edgekms.sealed): the CA refuses others.
        seal = local_seal(stack.data_dir / "secrets", WRITER_CA)
        store = await CAStore.open(nc.jetstream(), seal=seal)
        seeded = await seed_records(
            store, REVOKED, certificate_der, revoked=lambda i: True, prefix="gone"
        )
        return seeded.serials
    finally:
        await nc.close()


def _ca_pid(stack: KmsStack) -> int:
    children = stack.state()["children"]
    assert isinstance(children, dict)
    return int(children["ca"])


def test_ca_survives_4000_revoked_and_status_tells_when_it_does_not_answer(
    stack: KmsStack, tmp_path: Path
) -> None:
    init = kmsctl(stack, "ca", "init", "--name", "Scale CA", "--out-dir", str(tmp_path / "ca"))
    assert init.returncode == 0, init.stderr
    with stack.client(timeout=30) as client:
        real = client.issue_certificate(
            "device", make_csr(make_key("ec-p256"), cn="real", sans=("dns:real.home.arpa",))
        ).record
    seeded = asyncio.run(_seed(stack, real.certificate_der))
    pid = _ca_pid(stack)

    revoke = kmsctl(
        stack, "cert", "revoke", real.serial, "--reason", "key-compromise", "-o", "json"
    )
    assert revoke.returncode == 0, revoke.stderr
    reserved = json.loads(revoke.stdout)["crl_number"]

    # The CRL numbered `reserved` (or later) lists it; it is built in the background.
    crl_file = tmp_path / "crl.der"
    deadline = time.monotonic() + 120
    while True:
        fetched = kmsctl(stack, "ca", "crl", "--out", str(crl_file), "-o", "json")
        assert fetched.returncode == 0, fetched.stderr
        described = json.loads(fetched.stdout)
        if described["crl_number"] >= reserved:
            break
        assert time.monotonic() < deadline, f"no CRL {reserved} yet: {described}"
        time.sleep(0.5)
    der = crl_file.read_bytes()
    assert len(der) > 128 * 1024  # past the bus's max_payload: it travelled in chunks
    crl = x509.load_der_x509_crl(der)
    assert {f"{e.serial_number:X}" for e in crl} == {*seeded, real.serial}
    assert described["revoked"] == REVOKED + 1 and described["size"] == len(der)
    with urllib.request.urlopen(f"{stack.ca_url}/crl", timeout=30) as answer:  # noqa: S310
        assert answer.status == 200
        served = x509.load_der_x509_crl(answer.read())
    assert len(served) == REVOKED + 1

    listed = kmsctl(stack, "cert", "list", "--state", "revoked", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == REVOKED + 1
    assert all(len(r["serial"]) % 2 == 0 for r in rows)  # openssl's spelling
    first = kmsctl(stack, "cert", "list", "--limit", "5", "--match", "real.home", "-o", "json")
    assert [r["state"] for r in json.loads(first.stdout)] == ["revoked"]

    assert _ca_pid(stack) == pid, "the CA process died and was restarted"
    ok = kmsctl(stack, "status", "-o", "json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert {c["name"]: c["ok"] for c in json.loads(ok.stdout)["components"]}["ca"] is True

    # A CA that does not answer (here: stopped) is reported, and exit code 8 says so.
    os.kill(pid, signal.SIGSTOP)
    try:
        down = kmsctl(stack, "status", "-o", "json")
        assert down.returncode == 8, down.stdout + down.stderr
        components = {c["name"]: c for c in json.loads(down.stdout)["components"]}
        assert components["ca"]["ok"] is False and components["broker"]["ok"] is True
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while kmsctl(stack, "status").returncode != 0:
        assert time.monotonic() < deadline, "the CA did not answer again"
        time.sleep(0.5)
    with stack.client(timeout=30) as client:
        record = client.get_certificate(real.serial)
    assert record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED


def _operator_config(stack: KmsStack, where: Path) -> Path:
    """A client config for a new operator, its certificate from `client add` (the
    broker's own path), its key made here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with stack.client(timeout=30) as admin:
        added = admin.add_client(f"ops{os.getpid()}", "operator", public_key_der=public)
    where.mkdir()
    (where / "ops.crt").write_text(added.certificate_pem)
    (where / "ops.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (where / "ca.crt").write_bytes((stack.data_dir / "client" / "ca.crt").read_bytes())
    config = where / "config.toml"
    config.write_text(
        f'broker = "{stack.broker}"\nserver_name = "edgekms-broker"\n'
        'ca_cert = "ca.crt"\ncert = "ops.crt"\nkey = "ops.key"\n'
    )
    return config


def test_prune_serials_and_json_from_kmsctl(stack: KmsStack, tmp_path: Path) -> None:
    if kmsctl(stack, "ca", "certs", "-o", "json").returncode != 0:
        init = kmsctl(stack, "ca", "init", "--name", "Scale CA", "--out-dir", str(tmp_path))
        assert init.returncode == 0, init.stderr
    shown = kmsctl(stack, "ca", "certs", "--out-dir", str(tmp_path / "ca"), "-o", "json")
    assert shown.returncode == 0, shown.stderr
    certs = json.loads(shown.stdout)
    assert len(certs["files"]) == 3
    for which in ("root", "intermediate"):
        printed = subprocess.run(
            ["openssl", "x509", "-noout", "-serial", "-in", str(tmp_path / "ca" / f"{which}.crt")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert printed == f"serial={certs[which]['serial']}"  # leading zero and all
    # A certificate whose serial's hex has an odd number of digits prints with the zero.
    # One serial in 16 has a leading zero nibble: 64 tries missed 1.6% of the time, 400
    # miss once in ~10^11 runs (16 issuances on average).
    with stack.client(timeout=30) as client:
        for _ in range(400):
            record = client.issue_certificate(
                "device", make_csr(make_key("ec-p256"), cn="odd", sans=("dns:odd.home.arpa",))
            ).record
            if len(record.serial) % 2:
                break
    assert len(record.serial) % 2, "400 random serials, none with an odd digit count"
    show = kmsctl(stack, "cert", "show", record.serial, "-o", "json")
    assert json.loads(show.stdout)["serial"] == "0" + record.serial
    by_openssl_spelling = kmsctl(stack, "cert", "show", "0" + record.serial, "-o", "json")
    assert by_openssl_spelling.returncode == 0, by_openssl_spelling.stderr

    def count(*args: str) -> int:
        listed = kmsctl(stack, "cert", "list", *args, "-o", "json")
        assert listed.returncode == 0, listed.stderr
        return len(json.loads(listed.stdout))

    def crl_entries() -> int:
        described = kmsctl(stack, "ca", "crl", "-o", "json")
        assert described.returncode == 0, described.stderr
        return int(json.loads(described.stdout)["revoked"])

    # The first test's seeded revocations end between 100 days ago and 700 days ahead:
    # those that ended more than 30 days ago go, and only those.
    total, entries = count(), crl_entries()
    dry = kmsctl(stack, "ca", "prune", "--older-than", "30d", "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert would["dry_run"] is True and len(would["serials"]) == min(would["pruned"], 100)
    assert count() == total
    done = kmsctl(stack, "ca", "prune", "--older-than", "30d", "-o", "json")
    assert done.returncode == 0, done.stderr
    pruned = json.loads(done.stdout)
    assert pruned["pruned"] == would["pruned"]
    assert count() == total - pruned["pruned"]
    assert crl_entries() == entries - pruned["pruned"]  # every seeded one was revoked
    assert (
        kmsctl(stack, "ca", "prune", "--older-than", "30d", "-o", "json").stdout.count(
            '"pruned": 0'
        )
        == 1
    )
    bad = kmsctl(stack, "ca", "prune", "--older-than", "0d")
    assert bad.returncode == 3 and "cert.duration_invalid" in bad.stderr
    # Pruning is for administrators only.
    config = _operator_config(stack, tmp_path / "operator")
    denied = kmsctl(stack, "ca", "prune", "--older-than", "30d", "--config", str(config))
    assert denied.returncode == 7, denied.stdout + denied.stderr
    assert "authz.role_denied" in denied.stderr
