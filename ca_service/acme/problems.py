"""ACME errors: typed edgekms errors that also carry the RFC 8555 problem type and the
HTTP status they are answered with (`application/problem+json`, RFC 7807).

Every refusal of the ACME server is one of these, raised before anything is stored, so a
client gets the RFC's `urn:ietf:params:acme:error:*` type it knows how to handle (certbot
and lego retry `badNonce` on their own) and our logs and tests a stable `reason`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from edgekms.errors import (
    FailedPrecondition,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

ACME_ERROR = "urn:ietf:params:acme:error:"
PROBLEM_JSON = "application/problem+json"


class AcmeProblem(KMSError):
    """Base of the ACME refusals: `acme_type` is the RFC's short name ("badNonce")."""

    acme_type: ClassVar[str] = "serverInternal"
    http_status: ClassVar[int] = 500

    def document(self) -> dict[str, Any]:
        return {
            "type": ACME_ERROR + self.acme_type,
            "detail": self.message,
            "status": self.http_status,
        }

    def body(self) -> bytes:
        return json.dumps(self.document()).encode()


def _kind(name: str, base: type[KMSError], acme_type: str, status: int) -> type[AcmeProblem]:
    return type(name, (AcmeProblem, base), {"acme_type": acme_type, "http_status": status})


Malformed = _kind("Malformed", InvalidArgument, "malformed", 400)
BadNonce = _kind("BadNonce", InvalidArgument, "badNonce", 400)
BadSignatureAlgorithm = _kind(
    "BadSignatureAlgorithm", InvalidArgument, "badSignatureAlgorithm", 400
)
BadPublicKey = _kind("BadPublicKey", InvalidArgument, "badPublicKey", 400)
BadCSR = _kind("BadCSR", InvalidArgument, "badCSR", 400)
AccountDoesNotExist = _kind("AccountDoesNotExist", NotFound, "accountDoesNotExist", 400)
Unauthorized = _kind("Unauthorized", PermissionDenied, "unauthorized", 403)
UnauthorizedKey = _kind("UnauthorizedKey", Unauthenticated, "unauthorized", 401)
RejectedIdentifier = _kind("RejectedIdentifier", InvalidArgument, "rejectedIdentifier", 400)
UnsupportedIdentifier = _kind(
    "UnsupportedIdentifier", InvalidArgument, "unsupportedIdentifier", 400
)
OrderNotReady = _kind("OrderNotReady", FailedPrecondition, "orderNotReady", 403)
AlreadyRevoked = _kind("AlreadyRevoked", FailedPrecondition, "alreadyRevoked", 400)
BadRevocationReason = _kind("BadRevocationReason", InvalidArgument, "badRevocationReason", 400)
ExternalAccountRequired = _kind(
    "ExternalAccountRequired", PermissionDenied, "externalAccountRequired", 403
)
UnsupportedContact = _kind("UnsupportedContact", InvalidArgument, "unsupportedContact", 400)
# Validation failures, recorded in the challenge's "error" field.
Connection = _kind("Connection", FailedPrecondition, "connection", 400)
IncorrectResponse = _kind("IncorrectResponse", FailedPrecondition, "incorrectResponse", 403)
TLSProblem = _kind("TLSProblem", FailedPrecondition, "tls", 400)
Dns = _kind("Dns", FailedPrecondition, "dns", 400)


class NotFoundResource(AcmeProblem, NotFound):
    """A URL under /acme that names nothing (plain 404, type malformed per boulder)."""

    acme_type = "malformed"
    http_status = 404


class TooLarge(AcmeProblem, InvalidArgument):
    acme_type = "malformed"
    http_status = 413


class WrongContentType(AcmeProblem, InvalidArgument):
    acme_type = "malformed"
    http_status = 415


class ServerInternal(AcmeProblem):
    """The CA could not finish (its token or bus away): try again."""

    acme_type = "serverInternal"
    http_status = 500


def from_kms(exc: KMSError) -> AcmeProblem:
    """Any other typed error of the CA (csr.*, cert.*, ca.*) as a problem document."""
    if isinstance(exc, AcmeProblem):
        return exc
    if exc.reason.startswith("csr."):
        return BadCSR(exc.reason, exc.message, exc.details)
    if isinstance(exc, InvalidArgument):
        return Malformed(exc.reason, exc.message, exc.details)
    if isinstance(exc, NotFound):
        return NotFoundResource(exc.reason, exc.message, exc.details)
    return ServerInternal(exc.reason, exc.message, exc.details)
