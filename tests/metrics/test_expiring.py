"""The CA's 30-day expiry count (ca_service.health.expiring_within): valid certificates
whose notAfter is in [now, now + 30 days), from the catalog's sort keys."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from ca_service.health import expiring_within
from ca_service.listing import padded
from ca_service.store import rfc3339
from edgekms.v1 import ca_pb2

NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)
VALID = ca_pb2.CERTIFICATE_STATUS_VALID
REVOKED = ca_pb2.CERTIFICATE_STATUS_REVOKED


def _catalog(
    rows: Sequence[tuple[datetime.timedelta, int]],
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    order = []
    status: dict[str, int] = {}
    for i, (offset, state) in enumerate(rows):
        serial = padded(f"{i + 1:X}")
        order.append((rfc3339(NOW + offset), serial))
        status[serial] = state
    return sorted(order), status


def test_counts_only_valid_certificates_inside_the_window() -> None:
    day = datetime.timedelta(days=1)
    order, status = _catalog(
        [
            (-day, VALID),  # expired already
            (datetime.timedelta(0), VALID),  # expires now: counted
            (day, VALID),
            (10 * day, REVOKED),  # revoked: not a renewal anyone needs
            (29 * day, VALID),
            (30 * day, VALID),  # the window's end is open
            (400 * day, VALID),
        ]
    )
    assert expiring_within(order, status, NOW) == 3


def test_fifty_thousand_certificates() -> None:
    """The catalog's size the CA is built for: the count walks the window only."""
    rows = [(datetime.timedelta(hours=h % (24 * 700) - 24 * 100), VALID) for h in range(50_000)]
    order, status = _catalog(rows)
    inside = sum(
        1 for offset, _ in rows if datetime.timedelta(0) <= offset < datetime.timedelta(days=30)
    )
    assert inside > 0
    assert expiring_within(order, status, NOW) == inside
