"""The CA service's metrics beyond its requests: the current CRL's next update and age,
and how many certificates expire within 30 days.

Both are computed every COMPUTE_INTERVAL seconds, never per scrape: with 50,000
certificates a scrape flood must not become a flood of catalog walks. The catalog
(ca_service.catalog) is sorted by notAfter, so counting the certificates that expire
in the next 30 days is two binary searches and a walk over those rows only.
"""

from __future__ import annotations

import bisect
import datetime
import time
from typing import TYPE_CHECKING

from ca_service.store import rfc3339
from edgekms.metrics import ServiceMetrics
from edgekms.v1 import ca_pb2

if TYPE_CHECKING:
    from ca_service.authority import CertificateAuthority

COMPUTE_INTERVAL = 30.0
EXPIRY_WINDOW = datetime.timedelta(days=30)


def expiring_within(
    order: list[tuple[str, str]], status_of: dict[str, int], now: datetime.datetime
) -> int:
    """Valid (not revoked) certificates whose notAfter is in [now, now + 30 days), from
    the catalog's sort keys (notAfter, padded serial) and each serial's status."""
    lo = bisect.bisect_left(order, (rfc3339(now), ""))
    hi = bisect.bisect_left(order, (rfc3339(now + EXPIRY_WINDOW), ""))
    return sum(
        1 for _, serial in order[lo:hi] if status_of.get(serial) == ca_pb2.CERTIFICATE_STATUS_VALID
    )


class CAHealth:
    """Gauges edgekms_crl_next_update_timestamp_seconds, edgekms_crl_this_update_timestamp
    _seconds, edgekms_crl_age_seconds (read at each scrape from the last CRL seen),
    edgekms_crl_number, edgekms_certificates_expiring{within="30d"} and
    edgekms_certificates_expiring_computed_timestamp_seconds."""

    def __init__(self, metrics: ServiceMetrics, ca: CertificateAuthority) -> None:
        self.ca = ca
        service = metrics.service
        self.crl_known = False
        self._crl_key: tuple[int, bytes] | None = None
        self._this_update = 0.0
        self.next_update = metrics.gauge(
            "edgekms_crl_next_update_timestamp_seconds", "nextUpdate of the current CRL."
        ).labels(service)
        self.this_update = metrics.gauge(
            "edgekms_crl_this_update_timestamp_seconds", "thisUpdate of the current CRL."
        ).labels(service)
        self.number = metrics.gauge("edgekms_crl_number", "The current CRL's number.").labels(
            service
        )
        age = metrics.gauge(
            "edgekms_crl_age_seconds", "Seconds since the current CRL's thisUpdate."
        ).labels(service)
        age.set_function(lambda: time.time() - self._this_update if self.crl_known else 0.0)
        self.expiring = metrics.gauge(
            "edgekms_certificates_expiring",
            "Valid certificates whose notAfter falls within the window.",
            ("within",),
        ).labels(service, "30d")
        self.computed_at = metrics.gauge(
            "edgekms_certificates_expiring_computed_timestamp_seconds",
            "When edgekms_certificates_expiring was last computed.",
        ).labels(service)

    async def compute(self) -> None:
        await self._crl()
        await self.ca.catalog.refresh()
        catalog = self.ca.catalog
        rows = catalog.rows()
        self.expiring.set(
            expiring_within(
                catalog.order(),
                {serial: row.status for serial, row in rows.items()},
                datetime.datetime.now(datetime.UTC),
            )
        )
        self.computed_at.set(time.time())

    async def _crl(self) -> None:
        current = await self.ca.crls.current()
        if current is None:
            return
        meta, der = current
        key = (int(meta.crl_number), bytes(meta.sha256))
        if key != self._crl_key:
            from cryptography import x509

            crl = x509.load_der_x509_crl(der)
            self._this_update = crl.last_update_utc.timestamp()
            next_update = crl.next_update_utc
            self.next_update.set(next_update.timestamp() if next_update else 0)
            self.this_update.set(self._this_update)
            self.number.set(meta.crl_number)
            self._crl_key = key
            self.crl_known = True
