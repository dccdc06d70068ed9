"""Validating a JWT-SVID against the bundles the agent holds (ValidateJWTSVID).

The JWT-SVID specification lets a trust domain sign with any of RS256/384/512,
ES256/384/512 and PS256/384/512 (our CA signs ES256; a federated SPIRE server may use
RSA), and tells validators to reject every other `alg`. So the algorithm is taken from
that list only, and the key found by `kid` in the bundle of the trust domain the `sub`
names must be of the algorithm's kind (an EC key of the algorithm's curve, or an RSA key
of 2048 bits at least): there is no HMAC, so an `alg` of `none` or HS256 cannot be
turned against a public key, and an RSA key is never used for an ES token or the other
way round. `typ`, if present, is JWT or JOSE; a `crit` header is refused (we understand
no extension); `aud` must include the audience asked about, `exp` must be in the future
and `nbf`, if present, in the past.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgekms import spiffe as sp
from edgekms.errors import InvalidArgument

MAX_TOKEN = 16384
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class _Alg:
    kty: str  # "EC" or "RSA"
    hash: type[hashes.HashAlgorithm]
    curve: str = ""  # JWK crv for EC
    pss: bool = False


# The JWT-SVID specification's list (section 2.1), and nothing else.
ALGORITHMS: dict[str, _Alg] = {
    "ES256": _Alg("EC", hashes.SHA256, "P-256"),
    "ES384": _Alg("EC", hashes.SHA384, "P-384"),
    "ES512": _Alg("EC", hashes.SHA512, "P-521"),
    "RS256": _Alg("RSA", hashes.SHA256),
    "RS384": _Alg("RSA", hashes.SHA384),
    "RS512": _Alg("RSA", hashes.SHA512),
    "PS256": _Alg("RSA", hashes.SHA256, pss=True),
    "PS384": _Alg("RSA", hashes.SHA384, pss=True),
    "PS512": _Alg("RSA", hashes.SHA512, pss=True),
}
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_TYPES = ("JWT", "JOSE")


def _bad(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(reason, message)


def _int(jwk: dict[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise _bad("jwt.key_unsupported", f"the JWK has no {name}")
    try:
        return int.from_bytes(sp.b64url_decode(value), "big")
    except ValueError:
        raise _bad("jwt.key_unsupported", f"the JWK's {name} is not base64url") from None


def public_key(jwk: dict[str, Any], alg: _Alg) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The JWK's public key, if it is of the kind `alg` signs with."""
    if jwk.get("kty") != alg.kty:
        raise _bad("jwt.key_unsupported", f"the key is not an {alg.kty} key, as the alg needs")
    try:
        if alg.kty == "EC":
            if jwk.get("crv") != alg.curve:
                raise _bad("jwt.key_unsupported", f"the key is not on {alg.curve}")
            numbers = ec.EllipticCurvePublicNumbers(
                _int(jwk, "x"), _int(jwk, "y"), _CURVES[alg.curve]
            )
            return numbers.public_key()
        key = rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n")).public_key()
    except ValueError:
        raise _bad("jwt.key_unsupported", "the JWK is not a valid public key") from None
    if key.key_size < MIN_RSA_BITS:
        raise _bad("jwt.key_unsupported", f"RSA keys of {MIN_RSA_BITS} bits at least")
    return key


def verify(
    alg: _Alg,
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    signature: bytes,
    signed: bytes,
) -> None:
    """InvalidArgument jwt.signature_invalid unless `signature` is `key`'s over `signed`."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            size = (key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                raise _bad("jwt.signature_invalid", f"an {alg.curve} signature is {2 * size} bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            key.verify(der, signed, ec.ECDSA(alg.hash()))
        elif alg.pss:
            digest = alg.hash()
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            key.verify(signature, signed, pss, digest)
        else:
            key.verify(signature, signed, padding.PKCS1v15(), alg.hash())
    except InvalidSignature:
        raise _bad("jwt.signature_invalid", "the JWT-SVID's signature does not verify") from None


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
        signature = sp.b64url_decode(parts[2])
    except ValueError:
        raise _bad("jwt.malformed", "the header or claims are not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _bad("jwt.malformed", "the header and claims are JSON objects")
    alg = ALGORITHMS.get(header.get("alg"))  # type: ignore[arg-type]
    if alg is None:
        raise _bad(
            "jwt.algorithm_unsupported",
            f"alg {str(header.get('alg'))[:20]!r}: one of {', '.join(ALGORITHMS)} only",
        )
    if "typ" in header and header["typ"] not in _TYPES:
        raise _bad("jwt.type_invalid", f"typ {str(header['typ'])[:20]!r}: JWT or JOSE only")
    if "crit" in header:
        raise _bad("jwt.header_unsupported", "a crit header names extensions we do not know")
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
    verify(alg, public_key(keys[0], alg), signature, f"{parts[0]}.{parts[1]}".encode())
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise _bad("jwt.audience_mismatch", f"the JWT-SVID is not for audience {audience[:80]!r}")
    at = time.time() if now is None else now
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= at:
        raise _bad("jwt.expired", "the JWT-SVID has expired (or has no exp)")
    nbf = claims.get("nbf")
    if nbf is not None and (isinstance(nbf, bool) or not isinstance(nbf, int | float) or nbf > at):
        raise _bad("jwt.not_yet_valid", "the JWT-SVID is not valid yet (nbf)")
    return str(spiffe_id), claims
