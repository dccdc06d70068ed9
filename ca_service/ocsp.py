"""OCSP responder logic (RFC 6960): parse a request, answer good, revoked or unknown,
signed by the issuing CA's key itself (no delegated responder), echoing the nonce.

The service looks the serial up in its store between parse_request and build_response;
this module does no I/O.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp

from ca_service.builder import CAKey, signing_hash
from ca_service.crl import reason_flag

RESPONSE_VALIDITY = datetime.timedelta(hours=24)
_MAX_NONCE = 32  # RFC 8954
_MAX_REQUEST = 16 * 1024


class BadOCSPRequest(ValueError):
    """The request cannot be answered; `status` says which unsuccessful response to send."""

    def __init__(self, status: ocsp.OCSPResponseStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class OCSPQuery:
    serial: int
    hash_algorithm: hashes.HashAlgorithm
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    nonce: bytes | None


@dataclass(frozen=True)
class CertState:
    """What the store knows about a serial; None from the lookup means "unknown"."""

    revoked_at: datetime.datetime | None = None
    reason: int = 0  # ca_pb2.RevocationReason


def _key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, which issuerKeyHash is computed over."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise TypeError(f"unsupported CA key {type(key).__name__}")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def parse_request(der: bytes, ca_cert: x509.Certificate) -> OCSPQuery:
    """The single query in `der`, checked to be about a certificate this CA issued."""
    if not der or len(der) > _MAX_REQUEST:
        raise BadOCSPRequest(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "empty or oversized")
    try:
        req = ocsp.load_der_ocsp_request(der)
        serial = req.serial_number
        algorithm = req.hash_algorithm
        name_hash = req.issuer_name_hash
        key_hash = req.issuer_key_hash
        nonce: bytes | None = None
        for ext in req.extensions:
            if isinstance(ext.value, x509.OCSPNonce):
                nonce = ext.value.nonce
            elif ext.critical:
                raise BadOCSPRequest(
                    ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "unknown critical extension"
                )
    except BadOCSPRequest:
        raise
    except Exception as exc:  # cryptography raises ValueError/UnsupportedAlgorithm
        raise BadOCSPRequest(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, str(exc)) from None
    if nonce is not None and not 1 <= len(nonce) <= _MAX_NONCE:
        raise BadOCSPRequest(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "bad nonce length")
    if name_hash != _digest(algorithm, ca_cert.subject.public_bytes()) or key_hash != _digest(
        algorithm, _key_bits(ca_cert)
    ):
        raise BadOCSPRequest(ocsp.OCSPResponseStatus.UNAUTHORIZED, "not issued by this CA")
    return OCSPQuery(serial, algorithm, name_hash, key_hash, nonce)


def query_for(ca_cert: x509.Certificate, serial: int, algorithm: hashes.HashAlgorithm) -> OCSPQuery:
    """The query a client would send about `serial` under `ca_cert` (for responses the
    CA signs ahead of time, without a nonce)."""
    return OCSPQuery(
        serial,
        algorithm,
        _digest(algorithm, ca_cert.subject.public_bytes()),
        _digest(algorithm, _key_bits(ca_cert)),
        None,
    )


# cryptography 45 added add_response_by_hash; the board's (scarthgap) is 42.0.5, where a
# single response can only be added from a certificate and its issuer (see _stand_in).
_BY_HASH = hasattr(ocsp.OCSPResponseBuilder, "add_response_by_hash")
_STAND_IN_TIME = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


def _stand_in(ca_cert: x509.Certificate, serial: int) -> x509.Certificate:
    """A throwaway certificate carrying only what cryptography < 45 builds a CertID
    from: the serial and the issuer's name (the issuer's key hash comes from `ca_cert`).
    It is signed by a throwaway key and is not part of the response, which comes out
    the same as add_response_by_hash makes it (tests/ca/test_library.py checks)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_STAND_IN_TIME)
        .not_valid_after(_STAND_IN_TIME + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


def build_response(
    ca_key: CAKey,
    ca_cert: x509.Certificate,
    query: OCSPQuery,
    state: CertState | None,
    now: datetime.datetime | None = None,
    validity: datetime.timedelta = RESPONSE_VALIDITY,
) -> bytes:
    """A signed, successful response: good, revoked, or unknown when `state` is None."""
    now = now or datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    revocation_time: datetime.datetime | None = None
    revocation_reason: x509.ReasonFlags | None = None
    if state is None:
        status = ocsp.OCSPCertStatus.UNKNOWN
    elif state.revoked_at is not None:
        status = ocsp.OCSPCertStatus.REVOKED
        revocation_time = state.revoked_at.replace(microsecond=0)
        revocation_reason = reason_flag(state.reason)
    else:
        status = ocsp.OCSPCertStatus.GOOD
    next_update = now + validity
    builder = ocsp.OCSPResponseBuilder()
    if _BY_HASH:
        builder = builder.add_response_by_hash(
            issuer_name_hash=query.issuer_name_hash,
            issuer_key_hash=query.issuer_key_hash,
            serial_number=query.serial,
            algorithm=query.hash_algorithm,
            cert_status=status,
            this_update=now,
            next_update=next_update,
            revocation_time=revocation_time,
            revocation_reason=revocation_reason,
        )
    elif query.serial > 0 and query.serial.bit_length() < 160:
        builder = builder.add_response(
            cert=_stand_in(ca_cert, query.serial),
            issuer=ca_cert,
            algorithm=query.hash_algorithm,
            cert_status=status,
            this_update=now,
            next_update=next_update,
            revocation_time=revocation_time,
            revocation_reason=revocation_reason,
        )
    else:
        # No certificate can carry this serial (RFC 5280: positive, at most 20 octets),
        # so no CA issued it: the request is malformed.
        return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert)
    if query.nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(query.nonce), critical=False)
    return builder.sign(ca_key, signing_hash(ca_key)).public_bytes(serialization.Encoding.DER)
