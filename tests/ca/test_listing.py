"""ca_service.listing, pure logic: page tokens round-trip and refuse what they did not make;
pages follow the sort order, stop at the size or byte budget, and resume after the token
whatever changed in between."""

from __future__ import annotations

import datetime

import pytest

from ca_service.listing import (
    PAGE_BYTES,
    Query,
    Row,
    decode_token,
    encode_token,
    make_row,
    select_page,
    sort_key,
)
from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def _record(serial: int, days: int, **fields: object) -> ca_pb2.CertificateRecord:
    end = NOW + datetime.timedelta(days=days)
    values: dict[str, object] = {"status": ca_pb2.CERTIFICATE_STATUS_VALID, **fields}
    return ca_pb2.CertificateRecord(
        serial=f"{serial:X}",
        not_after=end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        issued_at=(end - datetime.timedelta(days=90)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **values,  # type: ignore[arg-type]
    )


def _index(
    records: list[ca_pb2.CertificateRecord],
) -> tuple[list[tuple[str, str]], dict[str, Row]]:
    keys = sorted(sort_key(r) for r in records)
    return keys, {sort_key(r)[1]: make_row(r) for r in records}


def _walk(records: list[ca_pb2.CertificateRecord], **request: object) -> list[str]:
    order, by_serial = _index(records)
    req = ca_pb2.ListCertificatesRequest(**request)  # type: ignore[arg-type]
    out: list[str] = []
    while True:
        page = select_page(order, by_serial, Query.parse(req, NOW))
        out.extend(r.serial for r in page.records)
        if not page.next_page_token:
            return out
        req.page_token = page.next_page_token


def test_a_row_keeps_the_record_without_its_der() -> None:
    record = _record(0xA1, 3, subject="CN=NAS", sans=["dns:NAS.home.arpa"], profile="device")
    record.certificate_der = b"x" * 700
    row = make_row(record)
    back = row.record()
    assert not back.certificate_der and record.certificate_der  # the caller's copy kept
    record.ClearField("certificate_der")
    assert back == record
    assert row.text == "cn=nas\ndns:nas.home.arpa" and row.key == sort_key(record)


def test_tokens_round_trip() -> None:
    key = sort_key(_record(0xABC, 3))
    assert decode_token(encode_token(key)) == key


def test_serials_order_as_numbers_not_text() -> None:
    # Same notAfter: 0xF before 0x10 as numbers, though "F" > "10" as text.
    records = [_record(0x10, 5), _record(0xF, 5), _record(0x100, 5)]
    assert _walk(records, page_size=1) == ["F", "10", "100"]


def test_pages_resume_after_the_token_despite_changes() -> None:
    records = [_record(i, i) for i in range(1, 11)]
    order, by_serial = _index(records)
    first = select_page(
        order, by_serial, Query.parse(ca_pb2.ListCertificatesRequest(page_size=4), NOW)
    )
    assert [r.serial for r in first.records] == ["1", "2", "3", "4"]
    # Record 2 is pruned and a new one ending first is issued: neither moves the cursor.
    changed = [r for r in records if r.serial != "2"] + [_record(0x99, 0)]
    order, by_serial = _index(changed)
    req = ca_pb2.ListCertificatesRequest(page_size=4, page_token=first.next_page_token)
    rest = select_page(order, by_serial, Query.parse(req, NOW))
    assert [r.serial for r in rest.records] == ["5", "6", "7", "8"]


def test_a_page_stops_at_the_byte_budget() -> None:
    big = [_record(i, 10, subject="CN=" + "x" * 4000) for i in range(1, 40)]
    order, by_serial = _index(big)
    page = select_page(
        order, by_serial, Query.parse(ca_pb2.ListCertificatesRequest(page_size=1000), NOW)
    )
    assert 0 < len(page.records) < 39 and page.next_page_token
    assert page.ByteSize() <= PAGE_BYTES + 1024
    assert len(_walk(big, page_size=1000)) == 39


def test_states_and_expiry() -> None:
    records = [
        _record(1, -5),  # expired
        _record(2, 10),  # expiring within 30 days
        _record(3, 100),  # valid
        _record(4, 10, status=ca_pb2.CERTIFICATE_STATUS_REVOKED),
        _record(5, 200, superseded_by="9"),
    ]
    assert _walk(records, state=ca_pb2.CERTIFICATE_STATE_EXPIRED) == ["1"]
    assert _walk(records, expiring_within_days=30) == ["2"]
    assert _walk(records, expiring_within_seconds=11 * 86400) == ["2"]
    assert _walk(records, state=ca_pb2.CERTIFICATE_STATE_VALID) == ["2", "3", "5"]
    assert _walk(records, revoked_only=True) == ["4"]
    assert _walk(records, state=ca_pb2.CERTIFICATE_STATE_SUPERSEDED) == ["5"]


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!",
        "MjAyNnw",
        encode_token(("not-a-time", "0" * 40)),
        encode_token(("2026-01-01T00:00:00Z", "g" * 40)),
    ],
)
def test_foreign_tokens_are_refused(token: str) -> None:
    if not token:
        return  # the empty token is the first page, not a refusal
    with pytest.raises(InvalidArgument) as refused:
        decode_token(token)
    assert refused.value.reason == "list.page_token_invalid"


def test_a_page_read_during_a_refresh_skips_rows_not_yet_ordered() -> None:
    """The catalog updates rows before it patches the order; a page read in between
    neither fails nor lists a row under a key it no longer has."""
    records = [_record(i, i) for i in range(1, 6)]
    order, by_serial = _index(records)
    del by_serial[sort_key(records[1])[1]]  # removed by the refresh, still in the order
    moved = _record(3, 50)  # same serial, another notAfter: its old key is stale
    by_serial[sort_key(moved)[1]] = make_row(moved)
    page = select_page(order, by_serial, Query.parse(ca_pb2.ListCertificatesRequest(), NOW))
    assert [r.serial for r in page.records] == ["1", "4", "5"]
