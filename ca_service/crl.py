"""Builds the issuing CA's CRL from the revocations in the store.

The CRL number comes from the store's monotonic counter; this module only turns a list
of revocations into a signed CRL that pkilint and openssl accept.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from ca_service.builder import CAKey, signing_hash
from edgekms.v1 import ca_pb2

# How long a CRL is good for; the service rebuilds it well before (see service.py).
CRL_VALIDITY = datetime.timedelta(days=7)

REASON_FLAGS: dict[int, x509.ReasonFlags] = {
    ca_pb2.REVOCATION_REASON_KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    ca_pb2.REVOCATION_REASON_CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    ca_pb2.REVOCATION_REASON_AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    ca_pb2.REVOCATION_REASON_SUPERSEDED: x509.ReasonFlags.superseded,
    ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
    ca_pb2.REVOCATION_REASON_PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
    ca_pb2.REVOCATION_REASON_AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
}


@dataclass(frozen=True)
class Revocation:
    serial: int
    revoked_at: datetime.datetime
    reason: int  # ca_pb2.RevocationReason


def reason_flag(reason: int) -> x509.ReasonFlags | None:
    """None for "unspecified": RFC 5280 5.3.1 says to leave the reasonCode out then."""
    return REASON_FLAGS.get(reason)


class EntryCache:
    """Built CRL entries by revocation (serial hex, revocation time as stored, reason):
    an entry never changes once made, and making 50,000 of them again for every CRL,
    dates parsed and all, took longer than encoding and signing the CRL."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, int], tuple[int, x509.RevokedCertificate]] = {}

    def entries(self, revoked: Iterable[tuple[str, str, int]]) -> list[x509.RevokedCertificate]:
        """The entries of `revoked`, ordered by serial; entries of revocations no longer
        listed (pruned records) are forgotten."""
        fresh: dict[tuple[str, str, int], tuple[int, x509.RevokedCertificate]] = {}
        for key in revoked:
            found = self._entries.get(key)
            if found is None:
                serial_hex, revoked_at, reason = key
                when = datetime.datetime.strptime(revoked_at, "%Y-%m-%dT%H:%M:%SZ")
                rev = Revocation(int(serial_hex, 16), when.replace(tzinfo=datetime.UTC), reason)
                found = (rev.serial, _entry(rev))
            fresh[key] = found
        self._entries = fresh
        return [entry for _, entry in sorted(fresh.values(), key=lambda pair: pair[0])]


def _entry(rev: Revocation) -> x509.RevokedCertificate:
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(rev.serial)
        .revocation_date(rev.revoked_at.replace(microsecond=0))
    )
    flag = reason_flag(rev.reason)
    if flag is not None:
        entry = entry.add_extension(x509.CRLReason(flag), critical=False)
    return entry.build()


def build_crl(
    ca_key: CAKey,
    ca_cert: x509.Certificate,
    revocations: Iterable[Revocation],
    crl_number: int,
    now: datetime.datetime | None = None,
    validity: datetime.timedelta = CRL_VALIDITY,
    entries: list[x509.RevokedCertificate] | None = None,
) -> x509.CertificateRevocationList:
    """A signed CRL of `revocations`, or of `entries` already built (EntryCache)."""
    now = now or datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    if entries is None:
        entries = [_entry(r) for r in sorted(revocations, key=lambda r: r.serial)]
    # All entries at once: add_revoked_certificate copies the list each time (quadratic).
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=entries)
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(ca_key, signing_hash(ca_key))
