"""The CA's in-memory index of its certificate records, so that listing a page and
building a CRL do not read the whole `kms_ca` bucket each time.

With 50,000 records a full read of the bucket is tens of megabytes of certificates;
the issue that led here had every revocation do one (and the CRL reply then passed the
bus's max_payload). The catalog reads the bucket once, keeps each record without its
certificate DER, sorted for listing (ca_service.listing), and before every use catches up
with the changes since the last revision it read (edgekms.kvread.snapshot with
`after`): one short JetStream round trip when nothing changed, and it sees what other
CA replicas wrote too. Nothing here is authoritative: the bucket is.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from nats.js.kv import KeyValue

from ca_service.listing import Query, Row, SortKey, make_row, padded, select_page
from edgekms import kvread
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

_CERT_PREFIX = "cert."
# Past this many changes in one refresh, sorting all keys beats inserting each.
_RESORT_AFTER = 256


class Catalog:
    """Every certificate record (without certificate_der) by serial, and their sort
    keys in listing order. `refresh()` before reading; one refresh runs at a time."""

    def __init__(
        self,
        js: Any,
        bucket: str,
        open_entry: Callable[[KeyValue.Entry], KeyValue.Entry] = lambda entry: entry,
    ) -> None:
        self._js = js
        self._bucket = bucket
        # Raw entries carry their writer's seal (edgekms.sealed): verified and taken off
        # here like every other read of the bucket, so a tampered record fails the
        # refresh (and with it the listing and the CRL) instead of being listed.
        self._open_entry = open_entry
        self._records: dict[str, Row] = {}  # by padded serial
        self._order: list[SortKey] = []
        self._revision = 0
        self._lock = asyncio.Lock()

    @property
    def revision(self) -> int:
        return self._revision

    def __len__(self) -> int:
        return len(self._records)

    async def refresh(self) -> None:
        """Apply every change to cert.* since the last refresh (all of them, the first
        time). Changes go to the records first and the order is then patched, or sorted
        afresh when many came (inserting 50,000 keys one by one moves gigabytes)."""
        async with self._lock:
            changed: set[str] = set()
            before: dict[str, SortKey | None] = {}

            def apply(raw: KeyValue.Entry) -> None:
                entry = self._open_entry(raw)
                serial = padded(entry.key[len(_CERT_PREFIX) :])
                if serial not in changed:
                    changed.add(serial)
                    old = self._records.get(serial)
                    before[serial] = old.key if old is not None else None
                if kvread.is_removal(entry) or not entry.value:
                    self._records.pop(serial, None)
                    return
                record = ca_pb2.CertificateRecord()
                record.ParseFromString(entry.value)
                record.ClearField("certificate_der")
                self._records[serial] = make_row(record)

            _, last = await kvread.snapshot(
                self._js, self._bucket, f"{_CERT_PREFIX}>", after=self._revision, each=apply
            )
            if len(changed) > _RESORT_AFTER:
                self._order = sorted(r.key for r in self._records.values())
            else:
                for serial in changed:
                    old_key = before[serial]
                    if old_key is not None:
                        self._remove_key(old_key)
                    row = self._records.get(serial)
                    if row is not None:
                        self._remove_key(row.key)  # note() may have put it there meanwhile
                        bisect.insort(self._order, row.key)
            if last:
                if not self._revision:
                    log.info("event=ca_catalog_loaded records=%d", len(self._records))
                self._revision = max(self._revision, last)

    def note(self, record: ca_pb2.CertificateRecord) -> None:
        """Take a record this CA just wrote, so its own next read shows it even before a
        refresh (the refresh then applies the same change again, harmlessly)."""
        self._put(record)

    def _put(self, record: ca_pb2.CertificateRecord) -> None:
        row = make_row(record)
        old = self._records.get(row.serial_key)
        if old is not None:
            if old.key != row.key:
                self._remove_key(old.key)
                bisect.insort(self._order, row.key)
        else:
            bisect.insort(self._order, row.key)
        self._records[row.serial_key] = row

    def _drop(self, serial: str) -> None:
        old = self._records.pop(padded(serial), None)
        if old is not None:
            self._remove_key(old.key)

    def _remove_key(self, key: SortKey) -> None:
        index = bisect.bisect_left(self._order, key)
        if index < len(self._order) and self._order[index] == key:
            del self._order[index]

    def forget(self, serial: str) -> None:
        """Drop a record this CA just removed (see `note`)."""
        self._drop(serial)

    def order(self) -> list[SortKey]:
        """The sort keys (notAfter, padded serial) in order; not a copy: read, do not keep."""
        return self._order

    def rows(self) -> dict[str, Row]:
        """Every row by padded serial; not a copy: read, do not keep."""
        return self._records

    def page(self, query: Query) -> ca_pb2.ListCertificatesResponse:
        return select_page(self._order, self._records, query)

    def revoked(self) -> Iterator[Row]:
        for row in self._records.values():
            if row.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
                yield row

    def expired_before(self, horizon: str) -> list[Row]:
        """Records whose notAfter is before `horizon` (RFC 3339), oldest first."""
        end = bisect.bisect_left(self._order, (horizon, ""))
        rows = (self._records.get(key[1]) for key in self._order[:end])
        return [row for row in rows if row is not None and row.not_after < horizon]
