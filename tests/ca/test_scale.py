"""The CA with thousands of records (issue 11 item 2, issue 12 items 1 and 2), against the
CA service over a real nats-server with its keys in SoftHSM: paged, filtered listing that
agrees with a full read of the store; a CRL of thousands of entries that travels in
chunks below max_payload; pruning that never drops what a CRL needs.

The records are seeded through the CA's own store module (bench.seed), each carrying a
real certificate's DER; every path under test (catalog, listing, CRL build and storage,
GetCRL, prune) is the CA's own.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from bench.seed import seed_records
from ca_service.authority import CertificateAuthority
from ca_service.crlstore import CHUNK_SIZE
from ca_service.listing import PAGE_BYTES
from ca_service.store import CAStore, rfc3339
from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.v1 import ca_pb2
from tests.ca.conftest import CAEnv
from tests.ca.helpers import make_csr, make_key

pytestmark = pytest.mark.timeout(600)


async def _issue(env: CAEnv, cn: str = "real.home.arpa") -> ca_pb2.CertificateRecord:
    done = await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="https-server",
            csr=make_csr(make_key("ec-p256"), cn=cn, sans=(f"dns:{cn}",)),
            requester="admin",
        ),
        ca_pb2.IssueCertificateResponse,
    )
    return done.record


async def _list_all(
    env: CAEnv, request: ca_pb2.ListCertificatesRequest
) -> list[ca_pb2.CertificateRecord]:
    """Every page, as kmsctl fetches them; checks each reply stays far below the bus limit."""
    out: list[ca_pb2.CertificateRecord] = []
    request = ca_pb2.ListCertificatesRequest(**{f.name: v for f, v in request.ListFields()})
    while True:
        page = await env.call("ListCertificates", request, ca_pb2.ListCertificatesResponse)
        assert page.ByteSize() <= PAGE_BYTES + 8 * 1024
        assert all(not r.certificate_der for r in page.records)
        out.extend(page.records)
        if not page.next_page_token:
            return out
        assert page.records, "a page with a next token holds records"
        request.page_token = page.next_page_token


async def _fetch_crl(env: CAEnv) -> tuple[ca_pb2.GetCRLResponse, bytes, int]:
    """The CRL by the chunk protocol of ca.proto; also the largest reply seen."""
    first = await env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    parts, largest = [first.crl_der], first.ByteSize()
    size = len(first.crl_der)
    while size < first.total_size:
        chunk = await env.call(
            "GetCRL",
            ca_pb2.GetCRLRequest(offset=size, crl_number=first.crl_number),
            ca_pb2.GetCRLResponse,
        )
        assert chunk.crl_der and chunk.crl_number == first.crl_number
        parts.append(chunk.crl_der)
        size += len(chunk.crl_der)
        largest = max(largest, chunk.ByteSize())
    der = b"".join(parts)
    assert hashlib.sha256(der).digest() == first.sha256
    return first, der, largest


async def test_crl_of_4000_revoked_travels_in_chunks(ca_env: CAEnv) -> None:
    """Issue 11's failure: at ~3,650 revoked the CRL passed max_payload and the CA died.
    Here 4,000 revoked and one more revoked through the CA: the CA keeps answering, the
    CRL lists all 4,001, no reply is near the limit, and /crl serves the same bytes."""
    init = await ca_env.init()
    real = await _issue(ca_env)
    seeded = await seed_records(
        ca_env.store, 4000, real.certificate_der, revoked=lambda i: True, prefix="gone"
    )
    revoked = await ca_env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(
            serial=real.serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
        ),
        ca_pb2.RevokeCertificateResponse,
    )
    meta, der, largest = await _fetch_crl(ca_env)
    deadline = time.monotonic() + 120
    while meta.crl_number < revoked.crl_number:  # built in the background
        assert time.monotonic() < deadline, "the CRL listing the revocation never came"
        await asyncio.sleep(0.2)
        meta, der, largest = await _fetch_crl(ca_env)
    assert meta.total_size > 128 * 1024 > largest
    assert largest <= CHUNK_SIZE + 1024
    crl = x509.load_der_x509_crl(der)
    issuer = x509.load_der_x509_certificate(init.intermediate_certificate_der)
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(public)
    listed = {f"{entry.serial_number:X}" for entry in crl}
    assert listed == {*seeded.serials, real.serial}
    # The HTTP side hands out the same CRL whole.
    reader, writer = await asyncio.open_connection(*ca_env.http_url[7:].split(":"))
    writer.write(b"GET /crl HTTP/1.0\r\nHost: ca\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    assert body == der
    # The CA still answers everything else.
    listed_revoked = await _list_all(
        ca_env, ca_pb2.ListCertificatesRequest(state=ca_pb2.CERTIFICATE_STATE_REVOKED)
    )
    assert len(listed_revoked) == 4001


async def test_crl_chunk_requests_out_of_range_are_refused(ca_env: CAEnv) -> None:
    """A chunk of a CRL that was replaced, or past the end: typed refusals, never bytes
    of some other CRL."""
    await ca_env.init()
    meta, _, _ = await _fetch_crl(ca_env)
    with pytest.raises(FailedPrecondition) as stale:
        await ca_env.call(
            "GetCRL",
            ca_pb2.GetCRLRequest(offset=1, crl_number=meta.crl_number + 1000),
            ca_pb2.GetCRLResponse,
        )
    assert stale.value.reason == "crl.changed"
    with pytest.raises(FailedPrecondition) as past:
        await ca_env.call(
            "GetCRL",
            ca_pb2.GetCRLRequest(offset=meta.total_size + 1, crl_number=meta.crl_number),
            ca_pb2.GetCRLResponse,
        )
    assert past.value.reason == "crl.offset_invalid"
    again, _, _ = await _fetch_crl(ca_env)
    assert again.crl_number == meta.crl_number  # nothing rebuilt or changed by them


def _expect(
    records: list[ca_pb2.CertificateRecord], keep: Callable[[ca_pb2.CertificateRecord], bool]
) -> list[str]:
    chosen = [r for r in records if keep(r)]
    chosen.sort(key=lambda r: (r.not_after, int(r.serial, 16)))
    return [r.serial for r in chosen]


async def test_paged_filtered_listing_agrees_with_the_store(ca_env: CAEnv) -> None:
    await ca_env.init()
    real = await _issue(ca_env)
    await seed_records(ca_env.store, 1500, real.certificate_der, revoked=lambda i: i % 7 == 0)
    renewed = await ca_env.call(
        "RenewCertificate",
        ca_pb2.RenewCertificateRequest(serial=real.serial, requester="admin"),
        ca_pb2.IssueCertificateResponse,
    )
    everything = await ca_env.store.list_records()  # the authoritative full read
    assert len(everything) == 1502
    now = rfc3339(datetime.datetime.now(datetime.UTC))
    in_30d = rfc3339(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30))
    cutoff = rfc3339(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=200))

    def revoked(r: ca_pb2.CertificateRecord) -> bool:
        return r.status == ca_pb2.CERTIFICATE_STATUS_REVOKED

    cases: list[tuple[ca_pb2.ListCertificatesRequest, Callable[[ca_pb2.CertificateRecord], bool]]]
    cases = [
        (ca_pb2.ListCertificatesRequest(page_size=1000), lambda r: True),
        (
            ca_pb2.ListCertificatesRequest(expiring_within_days=30, page_size=37),
            lambda r: not revoked(r) and now <= r.not_after <= in_30d,
        ),
        (ca_pb2.ListCertificatesRequest(revoked_only=True), revoked),
        (
            ca_pb2.ListCertificatesRequest(state=ca_pb2.CERTIFICATE_STATE_EXPIRED),
            lambda r: not revoked(r) and r.not_after < now,
        ),
        (
            ca_pb2.ListCertificatesRequest(state=ca_pb2.CERTIFICATE_STATE_VALID, profile="device"),
            lambda r: not revoked(r) and r.not_after >= now and r.profile == "device",
        ),
        (
            ca_pb2.ListCertificatesRequest(match="SEED14"),
            lambda r: "seed14" in r.subject.lower(),
        ),
        (
            ca_pb2.ListCertificatesRequest(issued_after=cutoff, match="dns:seed1"),
            lambda r: r.issued_at > cutoff and any("dns:seed1" in s for s in r.sans),
        ),
        (
            ca_pb2.ListCertificatesRequest(state=ca_pb2.CERTIFICATE_STATE_SUPERSEDED),
            lambda r: r.serial == real.serial,
        ),
    ]
    for request, keep in cases:
        got = [r.serial for r in await _list_all(ca_env, request)]
        assert got == _expect(everything, keep), request
        assert got or request.match == "SEED14" or request.state, request
    superseded = await _list_all(
        ca_env, ca_pb2.ListCertificatesRequest(state=ca_pb2.CERTIFICATE_STATE_SUPERSEDED)
    )
    assert [r.superseded_by for r in superseded] == [renewed.record.serial]


async def test_a_second_replica_sees_the_first_ones_writes(ca_env: CAEnv) -> None:
    """The catalog catches up with the bucket before every listing, so a record another
    CA replica stored is listed by this one."""
    await ca_env.init()
    first = await _issue(ca_env, "one.home.arpa")
    assert [r.serial for r in await _list_all(ca_env, ca_pb2.ListCertificatesRequest())] == [
        first.serial
    ]
    other_store = await CAStore.open(ca_env.nc.jetstream(), ca_env.bucket)
    other = CertificateAuthority(other_store, ca_env.ca.keys)
    made = await other.issue(
        ca_pb2.IssueCertificateRequest(
            profile="device", csr=make_csr(make_key("ec-p256"), cn="two"), requester="admin"
        )
    )
    listed = {r.serial for r in await _list_all(ca_env, ca_pb2.ListCertificatesRequest())}
    assert listed == {first.serial, made.record.serial}
    await other.crl_jobs.stop()


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        pytest.param({"page_token": "not-a-token"}, "list.page_token_invalid", id="token"),
        pytest.param(
            {"page_token": "MjAyNi0wMS0wMVQwMDowMDowMFp8eno"},
            "list.page_token_invalid",
            id="token_forged",
        ),
        pytest.param({"page_size": 1001}, "list.page_size_invalid", id="page_size"),
        pytest.param({"state": 99}, "list.state_unknown", id="state"),
        pytest.param({"issued_after": "yesterday"}, "list.filter_invalid", id="issued_after"),
        pytest.param({"match": "x" * 257}, "list.filter_invalid", id="match_long"),
        pytest.param({"revoked_only": True, "state": 1}, "list.filter_invalid", id="contradiction"),
    ],
)
async def test_bad_listing_requests_are_refused(
    ca_env: CAEnv, request_fields: dict[str, object], reason: str
) -> None:
    await ca_env.init()
    with pytest.raises(InvalidArgument) as refused:
        await ca_env.call(
            "ListCertificates",
            ca_pb2.ListCertificatesRequest(**request_fields),  # type: ignore[arg-type]
            ca_pb2.ListCertificatesResponse,
        )
    assert refused.value.reason == reason


async def test_prune_removes_only_long_expired_and_never_a_crl_entry(ca_env: CAEnv) -> None:
    await ca_env.init()
    real = await _issue(ca_env)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    # i=0: valid, expired 100 days ago    i=1: revoked, expired 100 days ago
    # i=2: valid, expired 10 days ago     i=3: revoked, ends in 300 days (on every CRL)
    ends = [-100, -100, -10, 300]
    seeded = await seed_records(
        ca_env.store,
        4,
        real.certificate_der,
        revoked=lambda i: i in (1, 3),
        not_after=lambda i, _: now + datetime.timedelta(days=ends[i]),
    )
    records = {r.serial: r for r in await ca_env.store.list_records()}
    long_ago = rfc3339(now - datetime.timedelta(days=50))
    old = {s for s in seeded.serials if records[s].not_after < long_ago}
    assert len(old) == 2
    (kept_revoked,) = (
        s
        for s in seeded.serials
        if records[s].status == ca_pb2.CERTIFICATE_STATUS_REVOKED and s not in old
    )

    with pytest.raises(InvalidArgument) as refused:
        await ca_env.call(
            "PruneCertificates",
            ca_pb2.PruneCertificatesRequest(older_than_days=0),
            ca_pb2.PruneCertificatesResponse,
        )
    assert refused.value.reason == "prune.retention_invalid"

    dry = await ca_env.call(
        "PruneCertificates",
        ca_pb2.PruneCertificatesRequest(older_than_days=30, dry_run=True),
        ca_pb2.PruneCertificatesResponse,
    )
    assert (dry.pruned, set(dry.serials)) == (2, old)
    assert await ca_env.record_count() == 5

    done = await ca_env.call(
        "PruneCertificates",
        ca_pb2.PruneCertificatesRequest(older_than_days=30),
        ca_pb2.PruneCertificatesResponse,
    )
    assert (done.pruned, set(done.serials)) == (2, old)
    assert done.crl_number > 0  # one of them was revoked: a new CRL leaves it out
    left = {r.serial for r in await ca_env.store.list_records()}
    assert left == {real.serial, *(set(seeded.serials) - old)}
    _, der, _ = await _fetch_crl(ca_env)
    crl = {f"{e.serial_number:X}" for e in x509.load_der_x509_crl(der)}
    assert crl == {kept_revoked}
    # Pruned records are gone from listings too, and the history holds no DER of them.
    listed = {r.serial for r in await _list_all(ca_env, ca_pb2.ListCertificatesRequest())}
    assert listed == left
    again = await ca_env.call(
        "PruneCertificates",
        ca_pb2.PruneCertificatesRequest(older_than_days=30),
        ca_pb2.PruneCertificatesResponse,
    )
    assert again.pruned == 0
