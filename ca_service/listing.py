"""Which certificate records a ListCertificates page holds: the filters, the order and
the page tokens, as pure functions over the CA's in-memory catalog (ca_service.catalog).

Records are listed soonest to expire first, then by serial. A page token names the last
record of the previous page by that sort key, so a page starts right after it whatever
was issued, revoked or pruned in between: nothing is listed twice, and a record that
existed through the whole listing is not skipped. A page ends at `page_size` records or
before its reply would pass PAGE_BYTES, far below the bus's max_payload, whichever
comes first.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# The most record bytes one page carries: a quarter of the stack's 128 KiB max_payload
# leaves room for the envelope, headers and the gRPC hop.
PAGE_BYTES = 32 * 1024
_TOKEN_MAX = 512
_MATCH_MAX = 256

SortKey = tuple[str, str]  # (not_after RFC 3339, serial hex padded to 40 digits)


def padded(serial: str) -> str:
    """The serial compared as a number, not as text: upper-case hex padded to 40 digits
    (160 bits, RFC 5280's longest serial)."""
    return serial.upper().rjust(40, "0")


def sort_key(record: ca_pb2.CertificateRecord) -> SortKey:
    return (record.not_after, padded(record.serial))


class Row(NamedTuple):
    """What the catalog keeps of one record: the fields the filters read, and the record
    itself (without its DER) serialized. A protobuf message object per record cost about
    3 KB each in the CA (its arena); this is a few hundred bytes."""

    not_after: str
    serial_key: str  # padded
    serial: str
    issued_at: str
    status: int
    profile: str
    superseded_by: str
    text: str  # subject and SANs, lower case, one per line
    revoked_at: str
    reason: int
    issuer_key_id: str  # empty: the first intermediate's (ca_service.hierarchy.belongs_to)
    blob: bytes

    @property
    def key(self) -> SortKey:
        return (self.not_after, self.serial_key)

    def record(self) -> ca_pb2.CertificateRecord:
        out = ca_pb2.CertificateRecord()
        out.ParseFromString(self.blob)
        return out


def make_row(record: ca_pb2.CertificateRecord) -> Row:
    """The row of a record; its certificate_der is left out (cleared on a copy if set)."""
    if record.certificate_der:
        stripped = ca_pb2.CertificateRecord()
        stripped.CopyFrom(record)
        stripped.ClearField("certificate_der")
        record = stripped
    return Row(
        not_after=record.not_after,
        serial_key=padded(record.serial),
        serial=record.serial,
        issued_at=record.issued_at,
        status=record.status,
        profile=record.profile,
        superseded_by=record.superseded_by,
        text="\n".join((record.subject, *record.sans)).lower(),
        revoked_at=record.revoked_at,
        reason=record.revocation_reason,
        issuer_key_id=record.issuer_key_id,
        blob=record.SerializeToString(),
    )


def encode_token(key: SortKey) -> str:
    return base64.urlsafe_b64encode(f"{key[0]}|{key[1]}".encode()).decode().rstrip("=")


def decode_token(token: str) -> SortKey:
    """The sort key a page token names; InvalidArgument("list.page_token_invalid") for
    anything this module did not make."""
    bad = InvalidArgument("list.page_token_invalid", "the page token is not one this CA gave")
    if len(token) > _TOKEN_MAX:
        raise bad
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    not_after, sep, serial = text.partition("|")
    if not sep or len(serial) != 40:
        raise bad
    try:
        int(serial, 16)
        _parse_time(not_after)
    except ValueError:
        raise bad from None
    return (not_after, serial)


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Query:
    """A ListCertificatesRequest checked once, before any record is looked at."""

    state: int  # ca_pb2.CertificateState
    profile: str
    match: str  # lower-case
    expiring_before: str  # RFC 3339 bound on notAfter, "" for none
    issued_after: str  # RFC 3339, "" for none
    now: str
    page_size: int
    start_after: SortKey | None

    @classmethod
    def parse(cls, req: ca_pb2.ListCertificatesRequest, now: datetime.datetime) -> Query:
        if req.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                "list.page_size_invalid", f"page_size may be at most {MAX_PAGE_SIZE}"
            )
        if req.state not in ca_pb2.CertificateState.values():
            raise InvalidArgument("list.state_unknown", f"unknown certificate state {req.state}")
        if len(req.match) > _MATCH_MAX or len(req.profile) > _MATCH_MAX:
            raise InvalidArgument("list.filter_invalid", "a filter is too long")
        issued_after = ""
        if req.issued_after:
            try:
                issued_after = _rfc3339(_parse_time(req.issued_after))
            except ValueError:
                raise InvalidArgument(
                    "list.filter_invalid",
                    "issued_after must be RFC 3339 UTC, like 2026-01-31T00:00:00Z",
                ) from None
        within = max(req.expiring_within_days * 86400, req.expiring_within_seconds)
        if within > 36500 * 86400:
            raise InvalidArgument("list.filter_invalid", "expiring within more than 100 years")
        state = req.state
        if req.revoked_only:
            if state not in (ca_pb2.CERTIFICATE_STATE_ANY, ca_pb2.CERTIFICATE_STATE_REVOKED):
                raise InvalidArgument(
                    "list.filter_invalid", "revoked_only contradicts the state asked for"
                )
            state = ca_pb2.CERTIFICATE_STATE_REVOKED
        return cls(
            state=state,
            profile=req.profile,
            match=req.match.lower(),
            expiring_before=_rfc3339(now + datetime.timedelta(seconds=within)) if within else "",
            issued_after=issued_after,
            now=_rfc3339(now),
            page_size=req.page_size or DEFAULT_PAGE_SIZE,
            start_after=decode_token(req.page_token) if req.page_token else None,
        )

    def accepts(self, record: Row) -> bool:
        revoked = record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
        expired = record.not_after < self.now  # RFC 3339 UTC strings order as times
        if self.state == ca_pb2.CERTIFICATE_STATE_VALID and (revoked or expired):
            return False
        if self.state == ca_pb2.CERTIFICATE_STATE_REVOKED and not revoked:
            return False
        if self.state == ca_pb2.CERTIFICATE_STATE_EXPIRED and (revoked or not expired):
            return False
        if self.state == ca_pb2.CERTIFICATE_STATE_SUPERSEDED and not record.superseded_by:
            return False
        if self.profile and record.profile != self.profile:
            return False
        # "Expiring" means still valid now and ending before the horizon.
        if self.expiring_before and (revoked or expired or record.not_after > self.expiring_before):
            return False
        if self.issued_after and record.issued_at <= self.issued_after:
            return False
        return not self.match or self.match in record.text


def _rfc3339(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def select_page(
    order: Sequence[SortKey],
    records: Mapping[str, Row],
    query: Query,
) -> ca_pb2.ListCertificatesResponse:
    """One page from `order` (every record's sort key, sorted) and `records` (rows by
    the padded serial of the key). Scans from the token's position, so the first page of
    an unfiltered listing costs the same with 50,000 records as with 50."""
    start = bisect.bisect_right(order, query.start_after) if query.start_after else 0
    page = ca_pb2.ListCertificatesResponse()
    size = 0
    last: SortKey | None = None
    for index in range(start, len(order)):
        key = order[index]
        record = records.get(key[1])
        # A refresh running meanwhile updates the rows before the order: skip a key
        # whose row went or moved (the next page or listing has it right).
        if record is None or record.key != key or not query.accepts(record):
            continue
        if len(page.records) >= query.page_size:
            page.next_page_token = encode_token(last) if last else ""
            return page
        cost = len(record.blob) + 8
        if page.records and size + cost > PAGE_BYTES:
            page.next_page_token = encode_token(last) if last else ""
            return page
        page.records.append(record.record())
        size += cost
        last = key
    return page
