"""CRL files the agent keeps (OpenVPN's `crl-verify`, nginx's `ssl_crl`).

OpenVPN refuses every client once the CRL file's nextUpdate has passed ("CRL has
expired"), so the file must be replaced well before, whether or not anything was
revoked. A pass fetches the current intermediate's CRL and, for PEM files, the CRL of
each retired intermediate still in force (OpenVPN needs one CRL per issuing CA), checks
each before a byte is written, and replaces the file only when the content changed:

* each CRL is signed by the CA certificate it names (the CA's certificates come from
  the same KMS, and the issuing CA must be one of them): a CRL that does not verify is
  FailedPrecondition `agent.crl_bad_signature`;
* no CRL goes backwards: one whose CRL number is below the number of the same issuer's
  CRL in the file now is FailedPrecondition `agent.crl_rollback` (a replayed old CRL
  would un-revoke whatever was revoked since);
* a CRL already past its nextUpdate is FailedPrecondition `agent.crl_expired`.

On any refusal the file stays as it was and the item is retried with backoff.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import CrlItem
from agent.files import fix_metadata, read_if_regular, write_atomically
from edgekms import errors
from mgmt.client import KMSClient


@dataclass(frozen=True)
class CrlOutcome:
    changed: bool
    crl_numbers: tuple[int, ...]
    next_update: float  # the earliest nextUpdate in the file


def _key_id(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def _next_update(crl: x509.CertificateRevocationList) -> float:
    when = crl.next_update_utc
    if when is None:
        raise errors.FailedPrecondition("agent.crl_invalid", "a CRL without nextUpdate")
    return when.timestamp()


def _parse_file(data: bytes | None, fmt: str) -> list[x509.CertificateRevocationList]:
    if not data:
        return []
    try:
        if fmt == "der":
            return [x509.load_der_x509_crl(data)]
        return [x509.load_pem_x509_crl(block) for block in _pem_blocks(data)]
    except ValueError:
        return []  # torn or foreign: nothing to compare with, replaced


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END X509 CRL-----"
    blocks = []
    for part in data.split(end)[:-1]:
        start = part.find(b"-----BEGIN X509 CRL-----")
        if start >= 0:
            blocks.append(part[start:] + end + b"\n")
    return blocks


def fetch_crls(
    kms: KMSClient, fmt: str
) -> tuple[list[x509.CertificateRevocationList], list[x509.Certificate]]:
    """The current intermediate's CRL and (PEM) every retired one's, with the CA
    certificates that may sign them (current intermediate first)."""
    cas = kms.get_ca_certificates()
    issuers = [x509.load_der_x509_certificate(cas.intermediate_certificate_der)]
    retired = [x509.load_der_x509_certificate(d) for d in cas.retired_intermediates_der]
    ders = [kms.get_crl().crl_der]
    if fmt == "pem":
        ders += [kms.get_issuer_crl(_key_id(c).upper()).crl_der for c in retired]
    crls = []
    for der in ders:
        try:
            crls.append(x509.load_der_x509_crl(der))
        except ValueError as exc:
            raise errors.FailedPrecondition(
                "agent.crl_invalid", f"the KMS sent a CRL that does not parse: {exc}"
            ) from None
    return crls, issuers + retired


def check_crls(
    item: CrlItem,
    fresh: list[x509.CertificateRevocationList],
    issuers: list[x509.Certificate],
    existing: bytes | None,
    now: float,
) -> bytes:
    """The bytes to write for `fresh`, after the checks of the module docstring against
    the CA certificates and the file as it is (`existing`). Pure: no I/O."""
    if not fresh:
        raise errors.FailedPrecondition("agent.crl_invalid", "the KMS sent no CRL")
    old_by_issuer = {crl.issuer: _number(crl) for crl in _parse_file(existing, item.format)}
    for crl in fresh:
        signer = next((c for c in issuers if c.subject == crl.issuer), None)
        if signer is None or not crl.is_signature_valid(signer.public_key()):  # type: ignore[arg-type]
            raise errors.FailedPrecondition(
                "agent.crl_bad_signature",
                f"the CRL of {crl.issuer.rfc4514_string()} is not signed by that CA",
            )
        number = _number(crl)
        if number < old_by_issuer.get(crl.issuer, -1):
            raise errors.FailedPrecondition(
                "agent.crl_rollback",
                f"the KMS sent CRL number {number} of {crl.issuer.rfc4514_string()}, older "
                f"than number {old_by_issuer[crl.issuer]} in {item.path}",
                {"path": str(item.path)},
            )
        if _next_update(crl) <= now:
            raise errors.FailedPrecondition(
                "agent.crl_expired",
                f"the KMS sent a CRL of {crl.issuer.rfc4514_string()} already past its "
                f"nextUpdate ({crl.next_update_utc})",
            )
    if item.format == "der":
        return fresh[0].public_bytes(serialization.Encoding.DER)
    return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in fresh)


def keep_crl(item: CrlItem, kms: KMSClient, now: float) -> CrlOutcome:
    """Fetch, check and (when it changed) replace the item's CRL file."""
    fresh, issuers = fetch_crls(kms, item.format)
    existing = read_if_regular(item.path)
    data = check_crls(item, fresh, issuers, existing, now)
    changed = existing != data
    if changed:
        write_atomically(item.path, data, item.mode, item.owner)
    else:
        fix_metadata(item.path, item.mode, item.owner)
    return CrlOutcome(
        changed=changed,
        crl_numbers=tuple(_number(c) for c in fresh),
        next_update=min(_next_update(c) for c in fresh),
    )


def file_next_update(item: CrlItem) -> float | None:
    """The earliest nextUpdate in the item's file as it is now (None: no usable file)."""
    crls = _parse_file(read_if_regular(item.path), item.format)
    if not crls:
        return None
    try:
        return min(_next_update(c) for c in crls)
    except errors.FailedPrecondition:
        return None


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
