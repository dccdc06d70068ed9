"""Certificates the agent keeps: a key made on the device, a certificate from the mini-CA,
renewed at its renewal point, written with its chain.

One pass over one item (`keep_cert`) decides from the files as they are:

* no key file: a key is made here (it never leaves the device) and written first, 0600
  or the configured key_mode, before anything is asked of the KMS; then a certificate
  is issued for a CSR of that key;
* no certificate, or one for another key, another CN or other SANs than the config now
  says: a certificate is issued for the key (the config changed);
* a certificate past its renewal point: renewed by its holder (mgmt.renew.renew_held:
  the key proves possession, any role may; same names, new serial, the same key or with
  `rekey` a new one; the CA revokes the old one as superseded); one the CA will not
  renew (revoked: with a new key; expired, superseded, unknown) is issued afresh;
* otherwise nothing but modes and owners put right.

A request id derived from the item, its key and the certificate it replaces is sent
with every issue and same-key renewal, so a pass cut short after the KMS answered (a
crash, a power cut) gets the same certificate again on the next pass instead of a
second one. (A rekey makes its key anew on each try, so it cannot; see keep_cert.)
Every certificate received is checked before a file is touched: it is for our key and
signed by the first certificate of the chain it came with.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import CertItem
from agent.files import fix_metadata, read_if_regular, write_atomically
from agent.schedule import renewal_time
from edgekms import errors
from edgekms.sans import dropped, san_strings
from edgekms.v1 import ca_pb2
from mgmt.bundle import LeafKey, check_key_matches, generate_key, key_pem, make_csr, pem_bundle
from mgmt.bundle import load_leaf_key as _load_leaf_key
from mgmt.client import KMSClient
from mgmt.renew import renew_held


@dataclass(frozen=True)
class CertOutcome:
    """What a pass did and what the item's certificate is now."""

    action: str  # "issued", "renewed", "rekeyed", "reissued", "unchanged"
    serial: str
    not_before: float
    not_after: float
    due: float

    @property
    def changed(self) -> bool:
        return self.action != "unchanged"


def _spki(key: LeafKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _request_id(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _load_key(item: CertItem) -> LeafKey | None:
    data = read_if_regular(item.key)
    if data is None:
        if item.key.exists() or item.key.is_symlink():
            raise errors.InvalidArgument(
                "agent.file_not_regular",
                f"{item.key} is not a regular file the agent may read",
                {"path": str(item.key)},
            )
        return None
    try:
        return _load_leaf_key(data)
    except errors.InvalidArgument as exc:
        # Never overwritten: it may be a key someone put there on purpose.
        raise errors.InvalidArgument(
            "agent.key_invalid", f"{item.key}: {exc.message}", {"path": str(item.key)}
        ) from None


def _load_cert(item: CertItem) -> x509.Certificate | None:
    data = read_if_regular(item.cert)
    if not data:
        return None
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        return None  # a torn or foreign file: replaced by a fresh certificate


def _names(cert: x509.Certificate) -> tuple[str, set[str]]:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cn, set()
    return cn, set(san_strings(ext, other=dropped))


def _matches(item: CertItem, cert: x509.Certificate, key: LeafKey) -> bool:
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != _spki(key):
        return False
    cn, sans = _names(cert)
    wanted = {s if not s.startswith("ip:") else f"ip:{_ip(s[3:])}" for s in item.sans}
    return cn == item.common_name and sans == wanted


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


def _outcome(action: str, cert: x509.Certificate, item: CertItem) -> CertOutcome:
    nb = cert.not_valid_before_utc.timestamp()
    na = cert.not_valid_after_utc.timestamp()
    return CertOutcome(action, _serial_hex(cert), nb, na, renewal_time(nb, na, item.renew_at))


def _validity(item: CertItem) -> dict[str, int]:
    if item.ttl is None:
        return {}
    seconds = int(item.ttl.total_seconds())
    if seconds % 86400 == 0:
        return {"validity_days": seconds // 86400}
    return {"validity_seconds": seconds}


def _check_answer(
    key: LeafKey, response: ca_pb2.IssueCertificateResponse
) -> tuple[x509.Certificate, list[bytes]]:
    """The certificate must be for our key and signed by the chain's first certificate:
    a file is replaced only by something that will work."""
    chain = list(response.chain_der)
    if not response.certificate_der or not chain:
        raise errors.Internal("agent.answer_incomplete", "the KMS answered without a chain")
    try:
        check_key_matches(key, response.certificate_der)
        cert = x509.load_der_x509_certificate(response.certificate_der)
        cert.verify_directly_issued_by(x509.load_der_x509_certificate(chain[0]))
    except errors.InvalidArgument as exc:
        raise errors.Internal("agent.answer_wrong_key", exc.message) from None
    except (ValueError, TypeError) as exc:
        raise errors.Internal(
            "agent.answer_bad_signature", f"the certificate does not verify: {exc}"
        ) from None
    return cert, chain


def _write(item: CertItem, cert_der: bytes, chain: list[bytes], key: LeafKey | None) -> None:
    if key is not None:  # a new key goes first: see the module's docstring
        write_atomically(item.key, key_pem(key), item.key_mode, item.owner)
    if item.chain is not None:
        write_atomically(item.chain, pem_bundle(chain[0], chain[1:]), item.cert_mode, item.owner)
    body = pem_bundle(cert_der, chain) if item.fullchain else pem_bundle(cert_der, [])
    write_atomically(item.cert, body, item.cert_mode, item.owner)


def keep_cert(item: CertItem, connect: Callable[[], KMSClient], now: float) -> CertOutcome:
    """One pass over `item` (see the module docstring). `connect` gives the connection
    to the KMS, asked for only when the pass needs it."""
    key = _load_key(item)
    new_key: LeafKey | None = None  # a key to write with the certificate (a rekey)
    if key is None:
        # Written at once: a crash from here on finds it and asks again for the same key.
        key = generate_key(item.key_type)
        write_atomically(item.key, key_pem(key), item.key_mode, item.owner)
    fix_metadata(item.key, item.key_mode, item.owner)
    current = _load_cert(item)
    chain_missing = item.chain is not None and read_if_regular(item.chain) is None
    if current is not None and _matches(item, current, key):
        outcome = _outcome("unchanged", current, item)
        if now < outcome.due and not chain_missing:
            fix_metadata(item.cert, item.cert_mode, item.owner)
            if item.chain is not None:
                fix_metadata(item.chain, item.cert_mode, item.owner)
            return outcome
        kms = connect()
        serial = _serial_hex(current)
        try:
            # Renewal by the holder (proof of the key over mutual TLS): any role may,
            # and the CA marks the old certificate superseded on its CRL.
            # A retry of a same-key renewal keeps its request id (the CA answers with the
            # certificate it stored). A rekey's new key is made anew on each try, so it
            # takes a fresh id: the stored answer of a lost try would be for a key no
            # longer held (that try then ends as cert.superseded, and a fresh issuance).
            request_id = None if item.rekey else _request_id("renew", item.name, serial)
            held = renew_held(
                kms, current, key, rekey=item.rekey, request_id=request_id, **_validity(item)
            )
            response, action = held.response, "renewed"
            if held.new_key is not None:
                assert isinstance(held.new_key, LeafKey)
                new_key = key = held.new_key
                action = "rekeyed"
        except errors.FailedPrecondition as exc:
            if exc.reason not in ("cert.revoked", "cert.superseded", "cert.expired"):
                raise
            if exc.reason == "cert.revoked":
                # Revoked: the key may be why. A new key, a new certificate.
                new_key = key = generate_key(item.key_type)
            response = _issue(item, kms, key, previous=serial)
            action = "reissued"
        except errors.InvalidArgument as exc:
            if exc.reason != "renew.certificate_unknown":
                raise
            # The CA no longer knows it (pruned, another CA): ask for a new one.
            response = _issue(item, kms, key, previous=serial)
            action = "reissued"
    else:
        kms = connect()
        previous = _serial_hex(current) if current is not None else ""
        response = _issue(item, kms, key, previous=previous)
        action = "issued"
    cert, chain = _check_answer(key, response)
    _write(item, response.certificate_der, chain, new_key)
    return _outcome(action, cert, item)


def _issue(
    item: CertItem, kms: KMSClient, key: LeafKey, previous: str
) -> ca_pb2.IssueCertificateResponse:
    request_id = _request_id(
        "issue", item.name, _spki(key).hex(), item.profile, item.common_name,
        ",".join(item.sans), item.ttl, previous,
    )  # fmt: skip
    return kms.issue_certificate(
        item.profile,
        make_csr(key, item.common_name, list(item.sans)),
        request_id=request_id,
        **_validity(item),
    )
