"""The CA service end to end on real parts: nats-server with JetStream, kms-crypto on a
SoftHSM token (every CA signature comes from the token), openssl and curl as the
relying parties."""

from __future__ import annotations

import asyncio
import base64
import datetime
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca_service.crlstore import CRL_META_KEY
from ca_service.service import ServeConfig, serve
from ca_service.store import rfc3339
from edgekms.errors import AlreadyExists, FailedPrecondition, InvalidArgument, KMSError, NotFound
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.bundle import generate_key, pem_bundle, pkcs12_bundle
from mgmt.bundle import make_csr as make_bundle_csr
from mgmt.natsserver import NatsServer, free_port
from tests.ca.asn1 import csr_with_duplicate_san
from tests.ca.conftest import CAEnv, write
from tests.ca.helpers import LeafKey, make_csr, make_key, pkilint

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def key_pem(key: LeafKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a tool off the event loop: it may call back into the CA's HTTP side."""
    return await asyncio.to_thread(
        subprocess.run, list(argv), capture_output=True, text=True, timeout=60, check=False
    )


async def http_get(url: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, resp.content_type, await resp.read()


async def issue(
    env: CAEnv, profile: str, key: LeafKey, sans: tuple[str, ...], cn: str = "leaf"
) -> ca_pb2.IssueCertificateResponse:
    return await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile=profile, csr=make_csr(key, cn=cn, sans=sans), requester="admin"
        ),
        ca_pb2.IssueCertificateResponse,
    )


async def test_lifecycle_with_openssl(ca_env: CAEnv, tmp_path: Path) -> None:
    init = await ca_env.init()
    root = x509.load_der_x509_certificate(init.root_certificate_der)
    inter = x509.load_der_x509_certificate(init.intermediate_certificate_der)
    inter.verify_directly_issued_by(root)
    assert pkilint("cert", init.root_certificate_der, tmp_path) == ""
    assert pkilint("cert", init.intermediate_certificate_der, tmp_path) == ""
    with pytest.raises(AlreadyExists) as again:
        await ca_env.init()
    assert again.value.reason == "ca.already_initialized"

    key = make_key("ec-p256")
    issued = await issue(ca_env, "https-server", key, ("dns:nas.test", "ip:127.0.0.1"))
    record = issued.record
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID and record.profile == "https-server"
    assert record.sans == ["dns:nas.test", "ip:127.0.0.1"] and record.requester == "admin"
    leaf = x509.load_der_x509_certificate(issued.certificate_der)
    assert f"{leaf.serial_number:X}" == record.serial
    assert list(issued.chain_der) == [init.intermediate_certificate_der, init.root_certificate_der]
    assert pkilint("cert", issued.certificate_der, tmp_path) == ""
    stored, _ = await ca_env.store.get_record(record.serial)
    assert stored.certificate_der == issued.certificate_der

    root_pem = write(tmp_path / "root.pem", pem(init.root_certificate_der))
    inter_pem = write(tmp_path / "inter.pem", pem(init.intermediate_certificate_der))
    leaf_pem = write(tmp_path / "leaf.pem", pem(issued.certificate_der))

    async def fetch_crl(name: str) -> Path:
        status, ctype, body = await http_get(f"{ca_env.http_url}/crl")
        assert status == 200 and ctype == "application/pkix-crl"
        assert pkilint("crl", body, tmp_path) == ""
        crl = x509.load_der_x509_crl(body)
        return write(tmp_path / name, crl.public_bytes(serialization.Encoding.PEM))

    def verify_argv(crl: Path) -> list[str]:
        trust = ["-CAfile", str(root_pem), "-untrusted", str(inter_pem)]
        return ["openssl", "verify", *trust, "-crl_check", "-CRLfile", str(crl), str(leaf_pem)]

    ok = await run(*verify_argv(await fetch_crl("crl1.pem")))
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr

    def ocsp_argv() -> list[str]:
        what = ["-issuer", str(inter_pem), "-cert", str(leaf_pem)]
        trust = ["-CAfile", str(root_pem), "-verify_other", str(inter_pem)]
        return ["openssl", "ocsp", *what, "-url", f"{ca_env.http_url}/ocsp", *trust, "-resp_text"]

    good = await run(*ocsp_argv())
    assert f"{leaf_pem}: good" in good.stdout, good.stdout + good.stderr
    assert "Response verify OK" in good.stderr, good.stderr

    # RFC 6960 GET, and the response lints clean.
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, inter, hashes.SHA1()).build()  # noqa: S303
    b64 = base64.b64encode(req.public_bytes(serialization.Encoding.DER)).decode()
    status, ctype, body = await http_get(f"{ca_env.http_url}/ocsp/{b64}")
    assert status == 200 and ctype == "application/ocsp-response"
    assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert pkilint("ocsp", body, tmp_path) == ""

    crl_before = await ca_env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    revoked = await ca_env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(
            serial=record.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
        ),
        ca_pb2.RevokeCertificateResponse,
    )
    assert revoked.record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
    assert revoked.crl_number > crl_before.crl_number

    bad = await run(*verify_argv(await fetch_crl("crl2.pem")))
    assert bad.returncode != 0 and "certificate revoked" in bad.stdout + bad.stderr

    gone = await run(*ocsp_argv())
    assert f"{leaf_pem}: revoked" in gone.stdout, gone.stdout + gone.stderr
    assert "Key Compromise" in gone.stdout or "keyCompromise" in gone.stdout
    status, _, body = await http_get(f"{ca_env.http_url}/ocsp/{b64}")
    assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert pkilint("ocsp", body, tmp_path) == ""

    # Revoking again, or something unknown: typed errors, nothing changes.
    with pytest.raises(FailedPrecondition) as twice:
        await ca_env.call(
            "RevokeCertificate",
            ca_pb2.RevokeCertificateRequest(serial=record.serial),
            ca_pb2.RevokeCertificateResponse,
        )
    assert twice.value.reason == "cert.already_revoked"
    with pytest.raises(NotFound) as unknown:
        await ca_env.call(
            "RevokeCertificate",
            ca_pb2.RevokeCertificateRequest(serial="ABCDEF0123"),
            ca_pb2.RevokeCertificateResponse,
        )
    assert unknown.value.reason == "cert.not_found"
    after = await ca_env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    assert after.crl_number == revoked.crl_number

    # CA certificates over HTTP.
    status, ctype, body = await http_get(f"{ca_env.http_url}/ca.crt")
    assert status == 200 and body == init.intermediate_certificate_der
    status, ctype, body = await http_get(f"{ca_env.http_url}/chain.pem")
    assert body == pem(init.intermediate_certificate_der) + pem(init.root_certificate_der)


async def test_https_server_accepted_by_curl_for_its_name_only(
    ca_env: CAEnv, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    init = await ca_env.init()
    key = make_key("ec-p256")
    issued = await issue(ca_env, "https-server", key, ("dns:nas.test",), cn="nas.test")
    root_pem = write(tmp_path / "root.pem", pem(init.root_certificate_der))
    chain = write(tmp_path / "chain.pem", pem(init.intermediate_certificate_der))
    cert = write(tmp_path / "cert.pem", pem(issued.certificate_der))
    key_file = write(tmp_path / "key.pem", key_pem(key))
    port = free_port()
    s_server = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet"]
    server = await asyncio.create_subprocess_exec(
        *s_server,
        *("-cert", str(cert), "-key", str(key_file), "-cert_chain", str(chain)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "s_server did not listen"
                await asyncio.sleep(0.05)

        def curl(name: str) -> list[str]:
            quiet = ["-sS", "-o", "/dev/null", "-w", "%{http_code}"]
            where = ["--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"]
            return ["curl", *quiet, "--cacert", str(root_pem), *where]

        accepted = await run(*curl("nas.test"))
        assert accepted.returncode == 0 and accepted.stdout == "200", accepted.stderr
        refused = await run(*curl("other.test"))
        assert refused.returncode in (51, 60), (refused.returncode, refused.stderr)
    finally:
        server.terminate()
        await server.wait()


async def test_bad_requests_are_typed_and_store_nothing(ca_env: CAEnv) -> None:
    await ca_env.init()
    ec = make_key("ec-p256")
    unknown_ext = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\0"
    )
    ca_true = x509.BasicConstraints(ca=True, path_length=None)
    good = make_csr(ec)
    bad_sig = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    bad_sig[bad_sig.index(b"nas.example.com")] ^= 1
    garbage_pem = b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
    bad: list[tuple[str, bytes, int, str]] = [
        ("device", garbage_pem, 0, "csr.malformed"),
        ("device", b"\x30\x05\x02\x01\x01\x05\x00", 0, "csr.malformed"),
        ("device", bytes(bad_sig), 0, "csr.bad_signature"),
        ("nope", good, 0, "profile.unknown"),
        ("device", make_csr(make_key("rsa-1024")), 0, "csr.weak_key"),
        ("device", make_csr(make_key("ec-p521")), 0, "csr.curve_not_allowed"),
        ("https-server", make_csr(make_key("ed25519")), 0, "csr.ed25519_not_allowed"),
        ("https-server", make_csr(ec, sans=("email:a@b.example",)), 0, "csr.san_not_allowed"),
        ("device", make_csr(ec, extensions=[(ca_true, True)]), 0, "csr.ca_requested"),
        (
            "device",
            make_csr(ec, extensions=[(unknown_ext, True)]),
            0,
            "csr.unknown_critical_extension",
        ),
        ("device", csr_with_duplicate_san(), 0, "csr.duplicate_extension"),
        ("https-server", good, 400, "cert.validity_exceeds_profile"),
    ]
    cases = [
        (ca_pb2.IssueCertificateRequest(profile=p, csr=c, validity_days=d), InvalidArgument, r)
        for p, c, d, r in bad
    ]
    for request, error_type, reason in cases:
        with pytest.raises(error_type) as exc:
            await ca_env.call("IssueCertificate", request, ca_pb2.IssueCertificateResponse)
        assert exc.value.reason == reason, (reason, exc.value)
    # Not even a protobuf: refused as such.
    msg = await ca_env.nc.request("kms.ca.IssueCertificate", b"\xff\xff\xff", timeout=10)
    assert msg.headers and msg.headers["Nats-Service-Error-Code"] == "ERROR_CODE_INVALID_ARGUMENT"
    assert await ca_env.record_count() == 0


async def test_parallel_issuance_gives_distinct_serials_and_records(ca_env: CAEnv) -> None:
    await ca_env.init()
    keys = [make_key("ec-p256") for _ in range(16)]
    results = await asyncio.gather(
        *(issue(ca_env, "device", k, (f"dns:dev{i}.example.com",)) for i, k in enumerate(keys))
    )
    serials = {r.record.serial for r in results}
    assert len(serials) == 16
    records = await ca_env.store.list_records()
    assert {r.serial for r in records} == serials
    for r in results:
        cert = x509.load_der_x509_certificate(r.certificate_der)
        assert cert.serial_number.bit_length() <= 128


async def test_serial_collision_retries_with_a_new_serial(ca_env: CAEnv) -> None:
    await ca_env.init()
    first = await issue(ca_env, "device", make_key("ec-p256"), ("dns:a.example.com",))
    taken = int(first.record.serial, 16)
    handed: list[int] = []

    def colliding() -> int:
        handed.append(taken if not handed else 0x1234567890ABCDEF1234567890ABCDEF)
        return handed[-1]

    ca_env.ca._new_serial = colliding
    second = await issue(ca_env, "device", make_key("ec-p256"), ("dns:b.example.com",))
    assert handed == [taken, 0x1234567890ABCDEF1234567890ABCDEF]
    assert second.record.serial == "1234567890ABCDEF1234567890ABCDEF"
    kept, _ = await ca_env.store.get_record(first.record.serial)
    assert kept.certificate_der == first.certificate_der  # the first record was not touched
    assert await ca_env.record_count() == 2


async def test_crl_numbers_are_monotonic_under_contention(ca_env: CAEnv) -> None:
    numbers = await asyncio.gather(*(ca_env.store.next_crl_number() for _ in range(12)))
    assert sorted(numbers) == list(range(1, 13))


async def test_list_get_renew_and_profiles(ca_env: CAEnv) -> None:
    with pytest.raises(FailedPrecondition) as none:
        await ca_env.call(
            "GetCACertificates", ca_pb2.GetCACertificatesRequest(), ca_pb2.GetCACertificatesResponse
        )
    assert none.value.reason == "ca.not_initialized"
    await ca_env.init()
    short = await ca_env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="vpn-client", csr=make_csr(make_key("ed25519"), sans=()), validity_days=10
        ),
        ca_pb2.IssueCertificateResponse,
    )
    long = await issue(ca_env, "vpn-server", make_key("ec-p384"), ("dns:vpn.example.com",))
    expiring = await ca_env.call(
        "ListCertificates",
        ca_pb2.ListCertificatesRequest(expiring_within_days=30),
        ca_pb2.ListCertificatesResponse,
    )
    assert [r.serial for r in expiring.records] == [short.record.serial]
    everything = await ca_env.call(
        "ListCertificates", ca_pb2.ListCertificatesRequest(), ca_pb2.ListCertificatesResponse
    )
    assert {r.serial for r in everything.records} == {short.record.serial, long.record.serial}

    renewed = await ca_env.call(
        "RenewCertificate",
        ca_pb2.RenewCertificateRequest(serial=long.record.serial),
        ca_pb2.IssueCertificateResponse,
    )
    assert renewed.record.renewed_from == long.record.serial
    assert renewed.record.serial != long.record.serial
    old_cert = x509.load_der_x509_certificate(long.certificate_der)
    new_cert = x509.load_der_x509_certificate(renewed.certificate_der)
    assert new_cert.public_key() == old_cert.public_key()
    assert new_cert.subject == old_cert.subject
    got = await ca_env.call(
        "GetCertificate",
        ca_pb2.GetCertificateRequest(serial=renewed.record.serial.lower()),
        ca_pb2.GetCertificateResponse,
    )
    assert got.record == renewed.record

    await ca_env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(
            serial=short.record.serial, reason=ca_pb2.REVOCATION_REASON_SUPERSEDED
        ),
        ca_pb2.RevokeCertificateResponse,
    )
    revoked = await ca_env.call(
        "ListCertificates",
        ca_pb2.ListCertificatesRequest(revoked_only=True),
        ca_pb2.ListCertificatesResponse,
    )
    assert [r.serial for r in revoked.records] == [short.record.serial]
    with pytest.raises(FailedPrecondition) as exc:
        await ca_env.call(
            "RenewCertificate",
            ca_pb2.RenewCertificateRequest(serial=short.record.serial),
            ca_pb2.IssueCertificateResponse,
        )
    assert exc.value.reason == "cert.revoked"
    profiles = await ca_env.call(
        "ListProfiles", ca_pb2.ListProfilesRequest(), ca_pb2.ListProfilesResponse
    )
    assert {p.name for p in profiles.profiles} >= {
        "https-server",
        "vpn-server",
        "vpn-client",
        "device",
    }


async def test_crl_is_rebuilt_before_next_update(ca_env: CAEnv) -> None:
    await ca_env.init()
    first = await ca_env.ca.current_crl()
    # Same CRL while it is fresh...
    assert (await ca_env.ca.current_crl()).crl_number == first.crl_number
    # ...a new one, with a higher number, once nextUpdate is near.
    entry = await ca_env.store.kv.get(CRL_META_KEY)
    stale = ca_pb2.StoredCRL()
    stale.ParseFromString(entry.value)
    stale.next_update = rfc3339(datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
    await ca_env.store.kv.update(CRL_META_KEY, stale.SerializeToString(), last=entry.revision)
    fresh = await ca_env.ca.current_crl()
    assert fresh.crl_number > first.crl_number
    crl = x509.load_der_x509_crl(fresh.crl_der)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=6)


async def test_generate_path_pkcs12_and_pem(ca_env: CAEnv, tmp_path: Path) -> None:
    """What `kmsctl cert issue --generate` does: key made locally, bundle read by openssl."""
    init = await ca_env.init()
    key = generate_key("rsa-2048")
    issued = await ca_env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="vpn-client", csr=make_bundle_csr(key, "alice", ["email:alice@example.com"])
        ),
        ca_pb2.IssueCertificateResponse,
    )
    chain = list(issued.chain_der)
    p12 = write(
        tmp_path / "alice.p12",
        pkcs12_bundle("alice", key, issued.certificate_der, chain, b"s3cret"),
    )
    pw = write(tmp_path / "pw", b"s3cret\n")
    out = await run(
        "openssl", "pkcs12", "-in", str(p12), "-passin", f"file:{pw}", "-nokeys", "-info"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("BEGIN CERTIFICATE") == 3
    wrong = write(tmp_path / "wrong", b"nope\n")
    refused = await run("openssl", "pkcs12", "-in", str(p12), "-passin", f"file:{wrong}", "-nokeys")
    assert refused.returncode != 0
    bundle = pem_bundle(issued.certificate_der, chain)
    assert bundle.startswith(pem(issued.certificate_der))
    assert bundle.endswith(pem(init.root_certificate_der))
    leaf = write(tmp_path / "leaf.pem", pem(issued.certificate_der))
    root = write(tmp_path / "root.pem", pem(init.root_certificate_der))
    inter = write(tmp_path / "inter.pem", pem(init.intermediate_certificate_der))
    ok = await run(
        "openssl",
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        str(root),
        "-untrusted",
        str(inter),
        str(leaf),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


async def test_serve_runs_nats_and_http(ca_nats: NatsServer, ca_crypto: object) -> None:
    """`kmsctl ca serve`'s entry point: NATS endpoints and HTTP up, then a clean stop."""
    import nats

    port = free_port()
    bucket = "kms_ca_serve"
    stop = asyncio.Event()
    config = ServeConfig(
        nats_url=ca_nats.url, http_port=port, base_url=f"http://127.0.0.1:{port}", bucket=bucket
    )
    task = asyncio.create_task(serve(config, stop))
    nc = await nats.connect(ca_nats.url)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                msg = await nc.request(
                    "kms.ca.ListProfiles",
                    ca_pb2.ListProfilesRequest().SerializeToString(),
                    timeout=1,
                )
                break
            except Exception:
                assert time.monotonic() < deadline and not task.done(), "CA service did not start"
                await asyncio.sleep(0.1)
        assert b"https-server" in msg.data
        init = ca_pb2.InitCARequest(
            provider="hsm0", key_type=pb.KEY_TYPE_EC_P384, common_name="Serve CA"
        )
        reply = await nc.request("kms.ca.Init", init.SerializeToString(), timeout=60)
        assert not reply.headers, reply.data
        status, _, body = await http_get(f"http://127.0.0.1:{port}/root.crt")
        assert status == 200
        assert x509.load_der_x509_certificate(body).subject.rfc4514_string() == "CN=Serve CA"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await nc.jetstream().delete_key_value(bucket)
        await nc.close()


async def test_rsa_ca_on_the_token(ca_env: CAEnv, tmp_path: Path) -> None:
    init = await ca_env.init(pb.KEY_TYPE_RSA_2048)
    root = x509.load_der_x509_certificate(init.root_certificate_der)
    assert root.signature_hash_algorithm is not None
    assert root.signature_hash_algorithm.name == "sha256"
    issued = await issue(ca_env, "vpn-server", make_key("ec-p256"), ("dns:vpn.example.com",))
    for der in (
        init.root_certificate_der,
        init.intermediate_certificate_der,
        issued.certificate_der,
    ):
        assert pkilint("cert", der, tmp_path) == ""
    crl = await ca_env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    assert pkilint("crl", crl.crl_der, tmp_path) == ""
    leaf = write(tmp_path / "leaf.pem", pem(issued.certificate_der))
    rootf = write(tmp_path / "root.pem", pem(init.root_certificate_der))
    inter = write(tmp_path / "inter.pem", pem(init.intermediate_certificate_der))
    ok = await run(
        "openssl",
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        str(rootf),
        "-untrusted",
        str(inter),
        str(leaf),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


async def test_failed_init_leaves_nothing(ca_env: CAEnv) -> None:
    with pytest.raises(KMSError) as exc:
        await ca_env.call(
            "Init",
            ca_pb2.InitCARequest(provider="absent", key_type=pb.KEY_TYPE_EC_P256, common_name="X"),
            ca_pb2.InitCAResponse,
        )
    assert exc.value.reason == "provider.unavailable"
    assert await ca_env.store.get_state() is None
    for bad, reason in [
        (ca_pb2.InitCARequest(provider="hsm0", common_name="X"), "key.type_unknown"),
        (
            ca_pb2.InitCARequest(provider="Bad Id", key_type=pb.KEY_TYPE_EC_P256, common_name="X"),
            "ca.provider_invalid",
        ),
        (ca_pb2.InitCARequest(provider="hsm0", key_type=pb.KEY_TYPE_EC_P256), "ca.name_missing"),
    ]:
        with pytest.raises(InvalidArgument) as iexc:
            await ca_env.call("Init", bad, ca_pb2.InitCAResponse)
        assert iexc.value.reason == reason
    assert await ca_env.store.get_state() is None
    # Nothing issued without a CA, and the refusal says why.
    with pytest.raises(FailedPrecondition) as fexc:
        await issue(ca_env, "device", make_key("ec-p256"), ("dns:a.example.com",))
    assert fexc.value.reason == "ca.not_initialized"


async def test_signer_refuses_to_block_the_event_loop(ca_env: CAEnv) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    await ca_env.init()
    key = (await ca_env.ca.issuer()).key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with pytest.raises(RuntimeError, match="worker thread"):
        key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    signature = await asyncio.to_thread(key.sign, b"x", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"x", ec.ECDSA(hashes.SHA256()))
