"""The CA above the leaves: the root's own CRL, revoking an intermediate, rotating to a
new one, and the retired intermediates that keep signing CRLs and OCSP for the
certificates they issued until the last of them expires.

Why a root CRL: a strict verifier (`openssl verify -crl_check_all`) wants revocation
data for every certificate in the chain, the intermediate included, and an
intermediate whose key leaks must be revocable. The root key is meant to stay disabled
between uses (`ca init --disable-root`), so the root CRL is long-lived (ROOT_CRL_VALIDITY)
and re-signed whenever the root is used anyway (init, rotation, revocation) or, while
ca/root is enabled, when it nears its nextUpdate.

State: CAState (store key `config`) names the current intermediate (key id, label,
certificate), the retired ones and the revoked ones; CRLs live beside `crl.current`:
`crl.root.<ROOT KEYID>` (the root's) and `crl.issuer.<KEYID>` (a retired
intermediate's); root-signed OCSP answers about the intermediates under
`ocsp.root.<SERIAL>.<hash>`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from nats.js.errors import KeyNotFoundError

from ca_service import ocsp as ocsp_mod
from ca_service.builder import CAKey, build_intermediate, ca_name, key_id_hex
from ca_service.crl import REASON_FLAGS, Revocation, build_crl
from ca_service.policy import PublicKey
from ca_service.store import CAStore, normalize_serial, parse_rfc3339, rfc3339
from edgekms import nameconstraints as constraints
from edgekms.errors import FailedPrecondition, InvalidArgument, NotFound
from edgekms.subjects import CA_MAX_INTERMEDIATE_GENERATION
from edgekms.v1 import ca_pb2

if TYPE_CHECKING:
    from ca_service.authority import CertificateAuthority

log = logging.getLogger(__name__)

INTERMEDIATE_LABEL = "ca/intermediate"
ROOT_LABEL = "ca/root"
ROOT_CRL_PREFIX = "crl.root"
OCSP_CACHE_PREFIX = "ocsp.root"
# CertID hashes, not signatures: SHA-1 is what openssl ocsp and most clients send.
_CERT_ID_HASHES: tuple[hashes.HashAlgorithm, ...] = (hashes.SHA1(), hashes.SHA256())  # noqa: S303
ROOT_CRL_VALIDITY = datetime.timedelta(days=365)
# The root CRL is re-signed (when the root key is enabled) this long before nextUpdate.
ROOT_CRL_REFRESH_MARGIN = datetime.timedelta(days=30)
DEFAULT_INTERMEDIATE_DAYS = 1825


def root_crl_key(root: x509.Certificate) -> str:
    """Named by the root's key id, so that a failed or racing `Init` (another root)
    can never overwrite or remove the CRL of the root that won."""
    return f"{ROOT_CRL_PREFIX}.{key_id_hex(root)}"


def ocsp_cache_keys(state: ca_pb2.CAState) -> list[str]:
    """Every presigned OCSP answer this state's intermediates have (for clean-up)."""
    return [
        _ocsp_cache_key(serial, algorithm)
        for serial in intermediate_states(state)
        for algorithm in _CERT_ID_HASHES
    ]


def issuer_crl_key(key_id: str) -> str:
    return f"crl.issuer.{key_id}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class IssuingCA:
    """One intermediate that signs: the current one, or a retired one that still has
    certificates in force."""

    label: str
    key_id: bytes  # the crypto service's key id
    cert: x509.Certificate
    key: CAKey
    retired: bool

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.cert)

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:X}"


def current_label(state: ca_pb2.CAState) -> str:
    return state.intermediate_label or INTERMEDIATE_LABEL


def next_generation(state: ca_pb2.CAState) -> int:
    """The next rotation's number, from the current intermediate's label: counting the
    retired ones would reuse a label once spent ones are dropped (drop_spent_retired)."""
    label = current_label(state)
    prefix = f"{INTERMEDIATE_LABEL}-"
    generation = int(label[len(prefix) :]) + 1 if label.startswith(prefix) else 2
    if generation > CA_MAX_INTERMEDIATE_GENERATION:
        raise FailedPrecondition(
            "ca.rotation_limit",
            f"this CA has rotated its intermediate {generation - 1} times, the most it may",
        )
    return generation


def issuing_cas(
    state: ca_pb2.CAState, signing_key: Callable[[str, bytes, bytes], CAKey]
) -> list[IssuingCA]:
    """The current intermediate first, then the retired ones, newest first."""
    current = x509.load_der_x509_certificate(state.intermediate_certificate_der)
    out = [
        IssuingCA(
            current_label(state),
            state.intermediate_key_id,
            current,
            signing_key(state.provider, state.intermediate_key_id, _spki(current)),
            retired=False,
        )
    ]
    for old in reversed(state.retired):
        cert = x509.load_der_x509_certificate(old.certificate_der)
        key = signing_key(state.provider, old.key_id, _spki(cert))
        out.append(IssuingCA(old.key_label, old.key_id, cert, key, retired=True))
    return out


def revoked_serials(state: ca_pb2.CAState) -> set[str]:
    return {r.serial for r in state.revoked_intermediates}


def belongs_to(record: ca_pb2.CertificateRecord, key_id: str, first_key_id: str) -> bool:
    """Whether intermediate `key_id` issued the record. Records from before rotation
    existed carry no issuer: they are the first intermediate's (`first_key_id`)."""
    return (record.issuer_key_id or first_key_id) == key_id


def first_key_id(state: ca_pb2.CAState) -> str:
    """The key id of the intermediate `Init` made (the oldest one still known)."""
    if state.retired:
        return key_id_hex(x509.load_der_x509_certificate(state.retired[0].certificate_der))
    return key_id_hex(x509.load_der_x509_certificate(state.intermediate_certificate_der))


# ---- the root CRL ---------------------------------------------------------------------


async def build_root_crl(
    store: CAStore, root_key: CAKey, root: x509.Certificate, state: ca_pb2.CAState
) -> ca_pb2.GetCRLResponse:
    """Sign and store the root's CRL (every revoked intermediate)."""
    number = await store.next_crl_number()
    revoked = [
        Revocation(int(r.serial, 16), parse_rfc3339(r.revoked_at), r.reason)
        for r in state.revoked_intermediates
    ]
    crl = await asyncio.to_thread(
        build_crl, root_key, root, revoked, number, validity=ROOT_CRL_VALIDITY
    )
    next_update = crl.next_update_utc
    assert next_update is not None
    response = ca_pb2.GetCRLResponse(
        crl_der=crl.public_bytes(serialization.Encoding.DER),
        crl_number=number,
        next_update=rfc3339(next_update),
    )
    await store.store_crl(response, root_crl_key(root))
    log.info("event=ca_root_crl_built number=%d revoked=%d", number, len(revoked))
    await presign_intermediate_ocsp(store, root_key, root, state)
    return await store.get_crl(root_crl_key(root)) or response


def intermediate_states(state: ca_pb2.CAState) -> dict[str, ocsp_mod.CertState]:
    """What the root says about each intermediate it knows, by upper-case hex serial."""
    out = {
        f"{x509.load_der_x509_certificate(der).serial_number:X}": ocsp_mod.CertState()
        for der in [state.intermediate_certificate_der, *(r.certificate_der for r in state.retired)]
    }
    for entry in state.revoked_intermediates:
        out[entry.serial] = ocsp_mod.CertState(parse_rfc3339(entry.revoked_at), entry.reason)
    return out


def _ocsp_cache_key(serial: str, algorithm: hashes.HashAlgorithm) -> str:
    return f"{OCSP_CACHE_PREFIX}.{serial}.{algorithm.name}"


async def presign_intermediate_ocsp(
    store: CAStore, root_key: CAKey, root: x509.Certificate, state: ca_pb2.CAState
) -> None:
    """Root-signed OCSP answers about every intermediate, made while the root key is in
    use and valid as long as the root CRL: the root sleeps between uses, and OCSP about
    the intermediate must still be answered then (without the request's nonce)."""
    for serial, cert_state in intermediate_states(state).items():
        for algorithm in _CERT_ID_HASHES:
            query = ocsp_mod.query_for(root, int(serial, 16), algorithm)
            der = await asyncio.to_thread(
                ocsp_mod.build_response, root_key, root, query, cert_state,
                validity=ROOT_CRL_VALIDITY,
            )  # fmt: skip
            await store.kv.put(_ocsp_cache_key(serial, algorithm), der)


async def presigned_intermediate_ocsp(
    store: CAStore, serial: str, algorithm: hashes.HashAlgorithm
) -> bytes | None:
    try:
        entry = await store.kv.get(_ocsp_cache_key(serial, algorithm))
    except KeyNotFoundError:
        return None
    return bytes(entry.value) if entry.value else None


async def current_root_crl(ca: CertificateAuthority) -> ca_pb2.GetCRLResponse:
    """The stored root CRL, re-signed first when it is missing or near its nextUpdate
    and the root key is enabled; otherwise what is stored (it is long-lived)."""
    issuer = await ca.issuer()
    stored = await ca.store.get_crl(root_crl_key(issuer.root))
    if stored is not None and parse_rfc3339(stored.next_update) - _now() > ROOT_CRL_REFRESH_MARGIN:
        return stored
    try:
        root_key = await ca.root_key()
    except FailedPrecondition:
        if stored is None:
            raise FailedPrecondition(
                "ca.root_crl_missing", "no root CRL yet and the root key is disabled"
            ) from None
        log.warning("event=ca_root_crl_stale next_update=%s", stored.next_update)
        return stored
    return await build_root_crl(ca.store, root_key, issuer.root, issuer.state)


# ---- revoking an intermediate ---------------------------------------------------------


async def revoke_intermediate(
    ca: CertificateAuthority, req: ca_pb2.RevokeIntermediateRequest
) -> ca_pb2.RevokeIntermediateResponse:
    if req.reason != ca_pb2.REVOCATION_REASON_UNSPECIFIED and req.reason not in REASON_FLAGS:
        raise InvalidArgument("revoke.reason_unknown", f"unknown revocation reason {req.reason}")
    found = await ca.store.get_state()
    if found is None:
        raise FailedPrecondition("ca.not_initialized", "no CA yet: run `kmsctl ca init`")
    state, revision = found
    try:
        serial = normalize_serial(req.serial)
    except NotFound:
        serial = ""
    known = {
        f"{x509.load_der_x509_certificate(der).serial_number:X}"
        for der in [state.intermediate_certificate_der, *(r.certificate_der for r in state.retired)]
    }
    if serial not in known:
        raise NotFound(
            "ca.intermediate_unknown",
            f"{req.serial!r} is not an intermediate of this CA",
            {"serial": req.serial},
        )
    if serial in revoked_serials(state):
        raise FailedPrecondition(
            "ca.intermediate_already_revoked",
            f"intermediate {serial} is revoked already",
            {"serial": serial},
        )
    root_key = await ca.root_key()  # refused while ca/root is disabled: nothing changes
    state.revoked_intermediates.append(
        ca_pb2.RevokedIntermediate(serial=serial, revoked_at=rfc3339(_now()), reason=req.reason)
    )
    await ca.store.update_state(state, revision)
    ca.forget_issuer()
    log.warning("event=ca_intermediate_revoked serial=%s requester=%s", serial, req.requester)
    root = x509.load_der_x509_certificate(state.root_certificate_der)
    crl = await build_root_crl(ca.store, root_key, root, state)
    return ca_pb2.RevokeIntermediateResponse(serial=serial, root_crl_number=crl.crl_number)


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = [a.value for a in cert.subject.get_attributes_for_oid(oid)]
    return values[0] if values and isinstance(values[0], str) else ""


# ---- rotation -------------------------------------------------------------------------


async def rotate(ca: CertificateAuthority, req: ca_pb2.RotateCARequest) -> ca_pb2.RotateCAResponse:
    """A new intermediate key and certificate; the current one retires (it keeps signing
    its CRL and OCSP). Nothing half-done: a failure destroys the new key and its record."""
    days = req.intermediate_validity_days or DEFAULT_INTERMEDIATE_DAYS
    found = await ca.store.get_state()
    if found is None:
        raise FailedPrecondition("ca.not_initialized", "no CA yet: run `kmsctl ca init`")
    state, revision = found
    root = x509.load_der_x509_certificate(state.root_certificate_der)
    current = x509.load_der_x509_certificate(state.intermediate_certificate_der)
    if req.clear_name_constraints:
        if any((req.name_constraints.permitted_dns, req.name_constraints.permitted_ip,
                req.name_constraints.excluded_dns, req.name_constraints.excluded_ip)):  # fmt: skip
            raise InvalidArgument(
                "ca.name_constraint_invalid", "give new constraints or clear them, not both"
            )
        name_constraints = None
    else:
        name_constraints = constraints.build(req.name_constraints) or constraints.of_certificate(
            current
        )
    if not 1 <= days <= 36500:
        raise InvalidArgument("ca.validity_invalid", "the intermediate's days are 1..36500")
    root_key = await ca.root_key()  # refused while ca/root is disabled
    generation = next_generation(state)
    label = f"{INTERMEDIATE_LABEL}-{generation}"
    made: list[bytes] = []
    recorded: list[tuple[str, int]] = []
    try:
        key_id, public_der = await ca.keys.generate(state.provider, label, state.key_type)
        made.append(key_id)
        if ca.registry is not None:

            async def destroy() -> None:
                made.remove(key_id)
                await ca.keys.destroy(state.provider, key_id)

            rev = await ca.registry.record(
                label, state.provider, state.key_type, key_id, public_der, destroy,
                {"purpose": INTERMEDIATE_LABEL},
            )  # fmt: skip
            recorded.append((label, rev))
        public = serialization.load_der_public_key(public_der)
        assert isinstance(public, PublicKey)
        # A name of its own: verifiers find CRLs by issuer name, so two intermediates
        # in force at once must not share one.
        subject = ca_name(
            f"{_attr(root, x509.NameOID.COMMON_NAME) or 'EdgeKMS CA'} Issuing CA {generation}",
            _attr(root, x509.NameOID.ORGANIZATION_NAME),
        )
        cert = await asyncio.to_thread(
            build_intermediate, root_key, root, public, subject, days,
            name_constraints=name_constraints, urls=ca.urls,
        )  # fmt: skip
        state.retired.append(
            ca_pb2.RetiredIntermediate(
                key_id=state.intermediate_key_id,
                certificate_der=state.intermediate_certificate_der,
                key_label=current_label(state),
                retired_at=rfc3339(_now()),
            )
        )
        state.intermediate_key_id = key_id
        state.intermediate_certificate_der = cert.public_bytes(serialization.Encoding.DER)
        state.intermediate_label = label
        await ca.store.update_state(state, revision)
    except BaseException:
        for kid in list(made):
            await ca.keys.destroy(state.provider, kid)
        if ca.registry is not None:
            for name, rev in recorded:
                await ca.registry.forget(name, rev)
        raise
    ca.forget_issuer()
    log.info("event=ca_rotated label=%s generation=%d", label, generation)
    await build_root_crl(ca.store, root_key, root, state)
    await ca.rebuild_crl()
    return ca_pb2.RotateCAResponse(
        intermediate_certificate_der=state.intermediate_certificate_der,
        root_certificate_der=state.root_certificate_der,
        retired_intermediates_der=[r.certificate_der for r in reversed(state.retired)],
    )


# ---- retired intermediates ------------------------------------------------------------


def last_expiry(
    records: Iterable[ca_pb2.CertificateRecord], key_id: str, first: str
) -> datetime.datetime | None:
    ends = [parse_rfc3339(r.not_after) for r in records if belongs_to(r, key_id, first)]
    return max(ends) if ends else None


async def drop_spent_retired(
    ca: CertificateAuthority, records: list[ca_pb2.CertificateRecord]
) -> int:
    """Forget retired intermediates whose every certificate has expired: they sign
    nothing more and leave the chain files. Returns how many were dropped."""
    found = await ca.store.get_state()
    if found is None or not found[0].retired:
        return 0
    state, revision = found
    first = first_key_id(state)
    now = _now()
    keep = []
    for old in state.retired:
        cert = x509.load_der_x509_certificate(old.certificate_der)
        end = last_expiry(records, key_id_hex(cert), first)
        if end is not None and end > now and cert.not_valid_after_utc > now:
            keep.append(old)
    dropped = len(state.retired) - len(keep)
    if dropped:
        del state.retired[:]
        state.retired.extend(keep)
        await ca.store.update_state(state, revision)
        ca.forget_issuer()
        log.info("event=ca_retired_dropped count=%d", dropped)
    return dropped
