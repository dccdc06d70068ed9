"""Certificate-lifecycle requests the CA must refuse, against the CA service over NATS
with its keys in SoftHSM: revoking what is unknown or already revoked, renewing what is
revoked, initialising twice. Each leaves the records, the CRL and the CA as they were."""

from __future__ import annotations

import pytest

from edgekms.errors import AlreadyExists, FailedPrecondition, NotFound
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from tests.ca.conftest import CAEnv
from tests.ca.helpers import make_csr, make_key


async def _issue(env: CAEnv) -> ca_pb2.CertificateRecord:
    done = await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="device", csr=make_csr(make_key("ec-p256")), requester="admin"
        ),
        ca_pb2.IssueCertificateResponse,
    )
    return done.record


async def _crl_number(env: CAEnv) -> int:
    return (await env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)).crl_number


async def _revoke(env: CAEnv, serial: str) -> ca_pb2.RevokeCertificateResponse:
    return await env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(serial=serial),
        ca_pb2.RevokeCertificateResponse,
    )


async def test_revoke_unknown_serial_is_not_found(ca_env: CAEnv) -> None:
    await ca_env.init()
    kept = await _issue(ca_env)
    crl = await _crl_number(ca_env)
    with pytest.raises(NotFound) as refused:
        await _revoke(ca_env, "ABCDEF0123")
    assert refused.value.reason == "cert.not_found"
    assert await _crl_number(ca_env) == crl
    records = await ca_env.store.list_records()
    assert [(r.serial, r.status) for r in records] == [
        (kept.serial, ca_pb2.CERTIFICATE_STATUS_VALID)
    ]


async def test_revoke_malformed_serial_is_not_found(ca_env: CAEnv) -> None:
    await ca_env.init()
    crl = await _crl_number(ca_env)
    with pytest.raises(NotFound) as refused:
        await _revoke(ca_env, "not-hex")
    assert refused.value.reason == "cert.not_found"
    assert await _crl_number(ca_env) == crl
    assert await ca_env.record_count() == 0


async def test_revoke_twice_is_failed_precondition(ca_env: CAEnv) -> None:
    await ca_env.init()
    record = await _issue(ca_env)
    first = await _revoke(ca_env, record.serial)
    with pytest.raises(FailedPrecondition) as refused:
        await _revoke(ca_env, record.serial)
    assert refused.value.reason == "cert.already_revoked"
    assert await _crl_number(ca_env) == first.crl_number
    stored, _ = await ca_env.store.get_record(record.serial)
    assert stored.revoked_at == first.record.revoked_at
    assert await ca_env.record_count() == 1


async def test_retried_revoke_gets_the_stored_answer(ca_env: CAEnv) -> None:
    """The same revocation sent again (same requester and request id, as after a lost
    answer) is answered as the first time; another request id still gets
    cert.already_revoked, and nothing changes either way."""
    await ca_env.init()
    record = await _issue(ca_env)
    request = ca_pb2.RevokeCertificateRequest(
        serial=record.serial,
        reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE,
        requester="admin",
        request_id="revoke-1",
    )
    first = await ca_env.call("RevokeCertificate", request, ca_pb2.RevokeCertificateResponse)
    again = await ca_env.call("RevokeCertificate", request, ca_pb2.RevokeCertificateResponse)
    assert again.record == first.record
    assert again.crl_number == first.crl_number
    for other in (
        ca_pb2.RevokeCertificateRequest(
            serial=record.serial, requester="admin", request_id="revoke-2"
        ),
        ca_pb2.RevokeCertificateRequest(
            serial=record.serial, requester="mallory", request_id="revoke-1"
        ),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            await ca_env.call("RevokeCertificate", other, ca_pb2.RevokeCertificateResponse)
        assert refused.value.reason == "cert.already_revoked"
    assert await _crl_number(ca_env) == first.crl_number
    stored, _ = await ca_env.store.get_record(record.serial)
    assert stored.revoked_at == first.record.revoked_at


async def test_renew_revoked_is_failed_precondition(ca_env: CAEnv) -> None:
    await ca_env.init()
    record = await _issue(ca_env)
    await _revoke(ca_env, record.serial)
    with pytest.raises(FailedPrecondition) as refused:
        await ca_env.call(
            "RenewCertificate",
            ca_pb2.RenewCertificateRequest(serial=record.serial),
            ca_pb2.IssueCertificateResponse,
        )
    assert refused.value.reason == "cert.revoked"
    assert [r.serial for r in await ca_env.store.list_records()] == [record.serial]


async def test_init_twice_is_already_exists(ca_env: CAEnv) -> None:
    first = await ca_env.init()
    with pytest.raises(AlreadyExists) as refused:
        await ca_env.init(pb.KEY_TYPE_EC_P384)
    assert refused.value.reason == "ca.already_initialized"
    certs = await ca_env.call(
        "GetCACertificates", ca_pb2.GetCACertificatesRequest(), ca_pb2.GetCACertificatesResponse
    )
    assert certs.intermediate_certificate_der == first.intermediate_certificate_der
    assert certs.root_certificate_der == first.root_certificate_der


async def test_issue_before_init_is_failed_precondition(ca_env: CAEnv) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        await _issue(ca_env)
    assert refused.value.reason == "ca.not_initialized"
    assert await ca_env.store.get_state() is None
    assert await ca_env.record_count() == 0
