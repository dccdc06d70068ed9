"""Issuance by request id at the CA itself, on real parts (nats-server with JetStream,
kms-crypto on a SoftHSM token): the broker writes no claim for IssueCertificate
(broker.ca_forward.SELF_DEDUPLICATING), so the CA's create-if-absent of the serial the
request id determines is what makes a retry answer the stored certificate, concurrent
retries one certificate, and another request under a used id a refusal."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from tests.ca.conftest import CAEnv
from tests.ca.helpers import make_csr, make_key


def _request(csr: bytes, rid: str, **extra: int) -> ca_pb2.IssueCertificateRequest:
    return ca_pb2.IssueCertificateRequest(
        profile="https-server", csr=csr, requester="admin", request_id=rid, **extra
    )


async def _issue(
    env: CAEnv, request: ca_pb2.IssueCertificateRequest
) -> ca_pb2.IssueCertificateResponse:
    return await env.call("IssueCertificate", request, ca_pb2.IssueCertificateResponse)


async def _count(env: CAEnv) -> int:
    listed = await env.call(
        "ListCertificates",
        ca_pb2.ListCertificatesRequest(page_size=1000),
        ca_pb2.ListCertificatesResponse,
    )
    return len(listed.records)


async def test_retries_concurrent_or_not_make_one_certificate(ca_env: CAEnv) -> None:
    await ca_env.init()
    rid = uuid.uuid4().hex
    csr = make_csr(make_key("ec-p256"), cn="idem.example", sans=("dns:idem.example",))
    before = await _count(ca_env)
    first = await _issue(ca_env, _request(csr, rid))
    again = await _issue(ca_env, _request(csr, rid))
    assert again.record.serial == first.record.serial
    assert again.certificate_der == first.certificate_der
    # Eight at once under a fresh id: every one answers the one stored certificate.
    rid2 = uuid.uuid4().hex
    answers = await asyncio.gather(*(_issue(ca_env, _request(csr, rid2)) for _ in range(8)))
    assert len({a.certificate_der for a in answers}) == 1
    assert await _count(ca_env) == before + 2


@pytest.mark.parametrize(
    "change",
    ["another key", "another name", "another lifetime"],
)
async def test_another_request_under_a_used_id_is_refused(ca_env: CAEnv, change: str) -> None:
    await ca_env.init()
    rid = uuid.uuid4().hex
    key = make_key("ec-p256")
    csr = make_csr(key, cn="same.example", sans=("dns:same.example",))
    first = await _issue(ca_env, _request(csr, rid))
    before = await _count(ca_env)
    if change == "another key":
        other = _request(
            make_csr(make_key("ec-p256"), cn="same.example", sans=("dns:same.example",)), rid
        )
    elif change == "another name":
        other = _request(make_csr(key, cn="other.example", sans=("dns:other.example",)), rid)
    else:
        other = _request(csr, rid, validity_days=3)
    with pytest.raises(InvalidArgument) as refused:
        await _issue(ca_env, other)
    assert refused.value.reason == "request.id_reused"
    assert refused.value.details.get("serial") == first.record.serial
    assert await _count(ca_env) == before
    # The first request's retry still gets its certificate.
    assert (await _issue(ca_env, _request(csr, rid))).record.serial == first.record.serial
