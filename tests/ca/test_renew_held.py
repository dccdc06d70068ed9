"""Renewal by the holder of a mini-CA certificate (RenewHeldCertificate) on real parts:
nats-server with JetStream, kms-crypto on the SoftHSM token. Proof of possession, the old
certificate revoked as superseded only after the new one is stored (OCSP shows it), the
retry by request id, and each refusal leaving the records as they were."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ca_service.store import rfc3339
from edgekms.errors import FailedPrecondition, InvalidArgument, KMSError, PermissionDenied
from edgekms.renewal_proof import sign_renewal
from edgekms.v1 import ca_pb2
from mgmt.renew import holder_csr
from tests.ca.conftest import CAEnv
from tests.ca.helpers import LeafKey, make_csr, make_key


async def issue(env: CAEnv, key: LeafKey) -> ca_pb2.IssueCertificateResponse:
    return await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="https-server",
            csr=make_csr(key, cn="nas.test", sans=("dns:nas.test",)),
            requester="device-7",
        ),
        ca_pb2.IssueCertificateResponse,
    )


async def renew(
    env: CAEnv,
    cert_der: bytes,
    csr: bytes,
    request_id: str,
    proof: bytes = b"",
    requester: str = "device-7",
) -> ca_pb2.IssueCertificateResponse:
    return await env.call(
        "RenewHeldCertificate",
        ca_pb2.RenewHeldCertificateRequest(
            certificate_der=cert_der,
            csr=csr,
            old_key_signature=proof,
            requester=requester,
            request_id=request_id,
        ),
        ca_pb2.IssueCertificateResponse,
    )


async def ocsp_status(env: CAEnv, cert_der: bytes) -> ocsp.OCSPResponse:
    state = await env.store.require_state()
    issuer = x509.load_der_x509_certificate(state.intermediate_certificate_der)
    leaf = x509.load_der_x509_certificate(cert_der)
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
    return ocsp.load_der_ocsp_response(
        await env.ca.ocsp(req.public_bytes(serialization.Encoding.DER))
    )


async def test_same_key_renewal_supersedes_the_old_and_a_retry_gets_the_same(
    ca_env: CAEnv,
) -> None:
    await ca_env.init()
    key = make_key("ec-p256")
    first = await issue(ca_env, key)
    old = x509.load_der_x509_certificate(first.certificate_der)
    csr = holder_csr(old, key)
    renewed = await renew(ca_env, first.certificate_der, csr, "r-1")
    new = x509.load_der_x509_certificate(renewed.certificate_der)
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    assert new.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ) == old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert new.public_key() == old.public_key()
    assert renewed.record.profile == "https-server"
    assert renewed.record.renewed_from == first.record.serial
    # The device stays the requester, whoever presented the proof.
    assert renewed.record.requester == "device-7"
    # The old lifetime again.
    assert new.not_valid_after_utc - new.not_valid_before_utc == (
        old.not_valid_after_utc - old.not_valid_before_utc
    )
    stored, _ = await ca_env.store.get_record(first.record.serial)
    assert stored.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
    assert stored.revocation_reason == ca_pb2.REVOCATION_REASON_SUPERSEDED
    answer = await ocsp_status(ca_env, first.certificate_der)
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.superseded
    assert (
        await ocsp_status(ca_env, renewed.certificate_der)
    ).certificate_status == ocsp.OCSPCertStatus.GOOD

    # The answer was lost: the same request id gets the same certificate.
    again = await renew(ca_env, first.certificate_der, csr, "r-1")
    assert again.certificate_der == renewed.certificate_der
    # Any other request for the superseded certificate is refused.
    with pytest.raises(FailedPrecondition) as refused:
        await renew(ca_env, first.certificate_der, csr, "r-2")
    assert refused.value.reason == "cert.superseded"


async def test_rekey_needs_the_old_keys_signature(ca_env: CAEnv) -> None:
    await ca_env.init()
    key = make_key("ec-p256")
    first = await issue(ca_env, key)
    old = x509.load_der_x509_certificate(first.certificate_der)
    new_key = make_key("ec-p256")
    csr = holder_csr(old, new_key)
    count = len(await ca_env.store.list_records())
    for proof, reason in (
        (b"", "renew.proof_invalid"),
        (sign_renewal(make_key("ec-p256"), csr), "renew.proof_invalid"),  # a stranger's key
        (sign_renewal(key, holder_csr(old, make_key("ec-p256"))), "renew.proof_invalid"),
    ):
        with pytest.raises(PermissionDenied) as refused:
            await renew(ca_env, first.certificate_der, csr, "rk-bad", proof)
        assert refused.value.reason == reason
    assert len(await ca_env.store.list_records()) == count
    stored, _ = await ca_env.store.get_record(first.record.serial)
    assert stored.status == ca_pb2.CERTIFICATE_STATUS_VALID and not stored.superseded_by

    renewed = await renew(ca_env, first.certificate_der, csr, "rk-1", sign_renewal(key, csr))
    new = x509.load_der_x509_certificate(renewed.certificate_der)
    assert new.public_key() == new_key.public_key()
    assert new.subject == old.subject


async def test_revoked_expired_and_foreign_certificates_are_not_renewed(ca_env: CAEnv) -> None:
    await ca_env.init()
    key = make_key("ec-p256")
    revoked = await issue(ca_env, key)
    await ca_env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(serial=revoked.record.serial, requester="admin"),
        ca_pb2.RevokeCertificateResponse,
    )
    old = x509.load_der_x509_certificate(revoked.certificate_der)
    with pytest.raises(FailedPrecondition) as refused:
        await renew(ca_env, revoked.certificate_der, holder_csr(old, key), "x-1")
    assert refused.value.reason == "cert.revoked"

    # An expired certificate on record (written as the CA writes its records).
    live = await issue(ca_env, key)
    record, _ = await ca_env.store.get_record(live.record.serial)
    now = datetime.datetime.now(datetime.UTC)
    throwaway = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old.test")])
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(throwaway, hashes.SHA256())
    )
    record.serial = f"{expired.serial_number:X}"
    record.certificate_der = expired.public_bytes(serialization.Encoding.DER)
    record.not_after = rfc3339(expired.not_valid_after_utc)
    await ca_env.store.create_record(record)
    with pytest.raises(FailedPrecondition) as refused:
        await renew(ca_env, record.certificate_der, holder_csr(expired, key), "x-2")
    assert refused.value.reason == "cert.expired"

    # A certificate this CA never issued, and bytes that are no certificate.
    with pytest.raises(InvalidArgument) as bad:
        await renew(ca_env, b"\x30\x03\x02\x01\x01", holder_csr(old, key), "x-3")
    assert bad.value.reason == "renew.certificate_invalid"
    with pytest.raises(InvalidArgument) as bad:
        await renew(ca_env, revoked.certificate_der, b"not a csr", "")
    assert bad.value.reason == "renew.request_id_invalid"
    stored, _ = await ca_env.store.get_record(live.record.serial)
    assert stored.status == ca_pb2.CERTIFICATE_STATUS_VALID and not stored.superseded_by


async def test_a_crash_before_the_old_is_superseded_leaves_it_valid_and_the_retry_finishes(
    ca_env: CAEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ca_env.init()
    key = make_key("ec-p256")
    first = await issue(ca_env, key)
    old = x509.load_der_x509_certificate(first.certificate_der)
    csr = holder_csr(old, key)

    async def crash(*_: object, **__: object) -> None:
        raise RuntimeError("killed between storing the new certificate and revoking the old")

    # The CA dies right after the new certificate is stored (fault injected at the one
    # call that would supersede the old one).
    original = ca_env.store.revoke
    monkeypatch.setattr(ca_env.store, "revoke", crash)
    with pytest.raises(KMSError):
        await renew(ca_env, first.certificate_der, csr, "c-1")
    monkeypatch.setattr(ca_env.store, "revoke", original)
    stored, _ = await ca_env.store.get_record(first.record.serial)
    assert stored.status == ca_pb2.CERTIFICATE_STATUS_VALID  # never neither
    assert (
        await ocsp_status(ca_env, first.certificate_der)
    ).certificate_status == ocsp.OCSPCertStatus.GOOD
    # A renewal under another id is refused (one renewal per certificate) ...
    with pytest.raises(FailedPrecondition) as refused:
        await renew(ca_env, first.certificate_der, csr, "c-2")
    assert refused.value.reason == "cert.superseded"
    # ... and the retry gets the certificate the first attempt stored, then supersedes.
    renewed = await renew(ca_env, first.certificate_der, csr, "c-1")
    assert renewed.record.serial == stored.superseded_by
    stored, _ = await ca_env.store.get_record(first.record.serial)
    assert stored.revocation_reason == ca_pb2.REVOCATION_REASON_SUPERSEDED


async def test_listing_by_requester_finds_only_its_certificates(ca_env: CAEnv) -> None:
    """What a device's deny uses to find the mini-CA certificates it asked for."""
    await ca_env.init()
    mine = await issue(ca_env, make_key("ec-p256"))  # requester device-7
    other = await ca_env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="https-server",
            csr=make_csr(make_key("ec-p256"), cn="other.test", sans=("dns:other.test",)),
            requester="device-8",
        ),
        ca_pb2.IssueCertificateResponse,
    )
    page = await ca_env.call(
        "ListCertificates",
        ca_pb2.ListCertificatesRequest(requester="device-7", state=ca_pb2.CERTIFICATE_STATE_VALID),
        ca_pb2.ListCertificatesResponse,
    )
    serials = {r.serial for r in page.records}
    assert mine.record.serial in serials and other.record.serial not in serials
    with pytest.raises(InvalidArgument) as bad:
        await ca_env.call(
            "ListCertificates",
            ca_pb2.ListCertificatesRequest(requester="x" * 1000),
            ca_pb2.ListCertificatesResponse,
        )
    assert bad.value.reason == "list.filter_invalid"
