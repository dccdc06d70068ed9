"""Fills a CA's store with many certificate records quickly, through the CA's own store
module (ca_service.store.CAStore.create_record), for the scale tests and benchmarks.

Signing 50,000 real certificates through a token takes hours on the test machines; the
listing, CRL and prune paths need records, not signatures, so each seeded record carries
one real certificate's DER as its own (about the size of a real one) and its own serial,
subject, SANs, dates and status. Records are written concurrently, a window at a time.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors

from ca_service.store import CAStore, rfc3339
from edgekms.errors import AlreadyExists
from edgekms.v1 import ca_pb2

PROFILES = ("https-server", "vpn-client", "device", "vpn-server")
_WINDOW = 64
_ATTEMPTS = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeded:
    serials: list[str]
    revoked: int
    expiring_30d: int  # valid now, notAfter within 30 days
    expired: int  # valid status, notAfter passed


def default_not_after(index: int, now: datetime.datetime) -> datetime.datetime:
    """Spread over -100 .. +700 days: some expired, a few expiring within 30 days."""
    return now + datetime.timedelta(days=(index * 37) % 800 - 100, hours=1)


async def seed_records(
    store: CAStore,
    count: int,
    certificate_der: bytes,
    *,
    revoked: Callable[[int], bool] = lambda i: False,
    not_after: Callable[[int, datetime.datetime], datetime.datetime] = default_not_after,
    prefix: str = "seed",
) -> Seeded:
    """Store `count` records; record i is revoked if revoked(i)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    horizon = now + datetime.timedelta(days=30)
    serials: list[str] = []
    counts = {"revoked": 0, "expiring": 0, "expired": 0}
    slots = asyncio.Semaphore(_WINDOW)

    async def one(index: int) -> None:
        end = not_after(index, now)
        is_revoked = revoked(index)
        serial = f"{secrets.randbits(127) | (1 << 126):X}"
        name = f"{prefix}{index}.home.arpa"
        record = ca_pb2.CertificateRecord(
            serial=serial,
            profile=PROFILES[index % len(PROFILES)],
            requester="seed",
            status=(
                ca_pb2.CERTIFICATE_STATUS_REVOKED if is_revoked else ca_pb2.CERTIFICATE_STATUS_VALID
            ),
            certificate_der=certificate_der,
            subject=f"CN={name}",
            sans=[f"dns:{name}"],
            not_before=rfc3339(end - datetime.timedelta(days=397)),
            not_after=rfc3339(end),
            issued_at=rfc3339(end - datetime.timedelta(days=397)),
            key_type="ec-p256",
        )
        if is_revoked:
            record.revoked_at = rfc3339(now)
            record.revocation_reason = ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
            counts["revoked"] += 1
        elif end < now:
            counts["expired"] += 1
        elif end <= horizon:
            counts["expiring"] += 1
        async with slots:
            for attempt in range(_ATTEMPTS):
                try:
                    await store.create_record(record)
                    break
                except AlreadyExists:
                    if attempt == 0:
                        raise
                    break  # the attempt that timed out had stored it
                except nats.errors.TimeoutError:
                    # A loaded machine: the write may have landed without its ack.
                    if await store.find_record(int(serial, 16)) is not None:
                        break
                    if attempt == _ATTEMPTS - 1:
                        raise
        serials.append(serial)
        if len(serials) % 10_000 == 0:
            log.info("event=seeded count=%d of=%d", len(serials), count)

    await asyncio.gather(*(one(i) for i in range(count)))
    return Seeded(serials, counts["revoked"], counts["expiring"], counts["expired"])
