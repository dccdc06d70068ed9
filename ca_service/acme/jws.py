"""JSON Web Signatures as ACME uses them (RFC 8555 6.2, RFC 7515, RFC 7638): the
flattened JSON serialization, one signature, keys given as `jwk` (new accounts,
revocation by certificate key) or named by `kid` (everything else).

Account keys: ES256 and ES384 (P-256, P-384) and RS256 (RSA 2048 to 4096 bits), what
certbot, lego, acme.sh, Caddy and Traefik make. Anything else is refused before the
signature is looked at: an unknown `alg` would otherwise be a way to pick a weaker check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ca_service.acme.problems import BadPublicKey, BadSignatureAlgorithm, Malformed, UnauthorizedKey

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_EC_ALGS: dict[str, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm, int]] = {
    "ES256": (ec.SECP256R1, hashes.SHA256(), 32),
    "ES384": (ec.SECP384R1, hashes.SHA384(), 48),
}
_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
ALGORITHMS = ("ES256", "ES384", "RS256")
_MIN_RSA, _MAX_RSA = 2048, 4096


def b64d(text: Any, what: str) -> bytes:
    """base64url without padding, as JOSE writes it; anything else is malformed."""
    if not isinstance(text, str) or "=" in text:
        raise Malformed("acme.jws_malformed", f"{what} is not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Malformed("acme.jws_malformed", f"{what} is not base64url") from None


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int(value: Any, what: str) -> int:
    return int.from_bytes(b64d(value, what), "big")


def load_jwk(jwk: Any) -> PublicKey:
    """The public key a JWK describes (EC P-256/P-384 or RSA); badPublicKey otherwise."""
    if not isinstance(jwk, dict):
        raise Malformed("acme.jwk_invalid", "jwk must be an object")
    kty = jwk.get("kty")
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise BadPublicKey("acme.jwk_unsupported", "EC account keys: P-256 or P-384")
        try:
            numbers = ec.EllipticCurvePublicNumbers(
                _int(jwk.get("x"), "jwk x"), _int(jwk.get("y"), "jwk y"), curve
            )
            return numbers.public_key()
        except ValueError:
            raise BadPublicKey("acme.jwk_invalid", "the EC point is not on the curve") from None
    if kty == "RSA":
        n, e = _int(jwk.get("n"), "jwk n"), _int(jwk.get("e"), "jwk e")
        if not _MIN_RSA <= n.bit_length() <= _MAX_RSA or e < 3 or e % 2 == 0:
            raise BadPublicKey(
                "acme.jwk_unsupported", f"RSA account keys: {_MIN_RSA} to {_MAX_RSA} bits"
            )
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise BadPublicKey("acme.jwk_unsupported", "account keys are EC (P-256, P-384) or RSA")


def jwk_of(key: PublicKey) -> dict[str, str]:
    """The JWK of a public key with only its required members (RFC 7638 3.2)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        crv = "P-256" if isinstance(key.curve, ec.SECP256R1) else "P-384"
        return {
            "crv": crv,
            "kty": "EC",
            "x": b64e(nums.x.to_bytes(size, "big")),
            "y": b64e(nums.y.to_bytes(size, "big")),
        }
    rnums = key.public_numbers()
    return {
        "e": b64e(rnums.e.to_bytes((rnums.e.bit_length() + 7) // 8, "big")),
        "kty": "RSA",
        "n": b64e(rnums.n.to_bytes((rnums.n.bit_length() + 7) // 8, "big")),
    }


def thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): the account key's name, and the second
    half of every key authorization."""
    canon = json.dumps(jwk_of(key), sort_keys=True, separators=(",", ":")).encode()
    return b64e(hashlib.sha256(canon).digest())


def verify(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    """Check one JWS signature; UnauthorizedKey (401) when it does not verify."""
    try:
        if alg in _EC_ALGS:
            curve, digest, size = _EC_ALGS[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
                raise BadSignatureAlgorithm("acme.alg_mismatch", f"{alg} does not fit this key")
            if len(signature) != 2 * size:
                raise UnauthorizedKey("acme.signature_invalid", "the JWS signature is malformed")
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(digest))
        elif alg == "RS256":
            if not isinstance(key, rsa.RSAPublicKey):
                raise BadSignatureAlgorithm("acme.alg_mismatch", "RS256 needs an RSA key")
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise BadSignatureAlgorithm(
                "acme.alg_unsupported", f"JWS algorithms accepted: {', '.join(ALGORITHMS)}"
            )
    except InvalidSignature:
        raise UnauthorizedKey(
            "acme.signature_invalid", "the JWS signature does not verify"
        ) from None


@dataclass(frozen=True)
class JWS:
    """A parsed (not yet verified) flattened JWS."""

    protected: dict[str, Any]
    protected_b64: str
    payload_b64: str
    payload: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.protected.get("alg", ""))

    @property
    def signing_input(self) -> bytes:
        return f"{self.protected_b64}.{self.payload_b64}".encode("ascii")

    def payload_json(self) -> dict[str, Any]:
        """The payload as a JSON object; POST-as-GET (empty payload) is {}."""
        if not self.payload:
            return {}
        try:
            value = json.loads(self.payload)
        except (ValueError, UnicodeDecodeError):
            raise Malformed("acme.payload_malformed", "the JWS payload is not JSON") from None
        if not isinstance(value, dict):
            raise Malformed("acme.payload_malformed", "the JWS payload must be a JSON object")
        return value


def parse(body: bytes) -> JWS:
    """A flattened JWS JSON object (RFC 7515 7.2.2) with exactly protected, payload and
    signature; no unprotected header (RFC 8555 6.2)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("acme.jws_malformed", "the body is not JSON") from None
    if not isinstance(obj, dict) or set(obj) != {"protected", "payload", "signature"}:
        raise Malformed(
            "acme.jws_malformed",
            "a flattened JWS with protected, payload and signature only is expected",
        )
    protected_b64 = obj["protected"]
    try:
        protected = json.loads(b64d(protected_b64, "protected"))
    except (ValueError, UnicodeDecodeError):
        raise Malformed("acme.jws_malformed", "the protected header is not JSON") from None
    if not isinstance(protected, dict):
        raise Malformed("acme.jws_malformed", "the protected header must be an object")
    payload_b64 = obj["payload"]
    return JWS(
        protected,
        str(protected_b64),
        str(payload_b64),
        b64d(payload_b64, "payload") if payload_b64 != "" else b"",
        b64d(obj["signature"], "signature"),
    )
