"""Validating a JWT-SVID against the bundles the agent holds (ValidateJWTSVID).

Only ES256 is accepted (the KMS signs nothing else), so an `alg` of `none` or HS256
cannot be turned against the public key; the key is found by `kid` in the bundle of the
trust domain the `sub` names; `aud` must include the audience asked about, and `exp`
must be in the future.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms import spiffe as sp
from edgekms.errors import InvalidArgument

MAX_TOKEN = 16384


def _bad(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(reason, message)


def validate(
    token: str, audience: str, jwks_by_td: dict[str, bytes], now: float | None = None
) -> tuple[str, dict[str, Any]]:
    """(SPIFFE ID, claims) of a valid JWT-SVID for `audience`; InvalidArgument otherwise."""
    if not audience:
        raise _bad("jwt.audience_missing", "give the audience to validate for")
    if not token or len(token) > MAX_TOKEN:
        raise _bad("jwt.malformed", "the JWT-SVID is empty or too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise _bad("jwt.malformed", "a JWT has three parts")
    try:
        header = json.loads(sp.b64url_decode(parts[0]))
        claims = json.loads(sp.b64url_decode(parts[1]))
    except ValueError:
        raise _bad("jwt.malformed", "the header or claims are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _bad("jwt.malformed", "the header and claims are JSON objects")
    if header.get("alg") != "ES256":
        raise _bad("jwt.algorithm_unsupported", f"alg {str(header.get('alg'))[:20]!r}: ES256 only")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise _bad("jwt.subject_invalid", "the JWT-SVID has no sub")
    spiffe_id = sp.parse_id(sub, require_path=True)
    jwks = jwks_by_td.get(spiffe_id.trust_domain)
    if jwks is None:
        raise _bad("jwt.trust_domain_unknown", f"no bundle for {spiffe_id.trust_domain}")
    kid = header.get("kid")
    keys = [k for k in json.loads(jwks).get("keys", []) if k.get("kid") == kid]
    if not keys:
        raise _bad("jwt.key_unknown", f"no JWT key {str(kid)[:60]!r} in the bundle")
    public = sp.key_of_jwk(keys[0])
    try:
        public.verify(
            sp.jose_to_der(sp.b64url_decode(parts[2])),
            f"{parts[0]}.{parts[1]}".encode(),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise _bad("jwt.signature_invalid", "the JWT-SVID's signature does not verify") from None
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise _bad("jwt.audience_mismatch", f"the JWT-SVID is not for audience {audience[:80]!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= (time.time() if now is None else now):
        raise _bad("jwt.expired", "the JWT-SVID has expired")
    return str(spiffe_id), claims
