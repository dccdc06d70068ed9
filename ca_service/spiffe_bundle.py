"""SPIFFE bundles in the SPIFFE Trust Domain and Bundle format (a JWK Set): ours as the
bundle endpoint serves it, and a foreign one read from its endpoint (`https_web`).

Why a module of its own: federation is the only place the CA reads from the network on
an administrator's behalf, so the fetch is bounded (https only, 1 MiB, 10 s, the
endpoint's TLS checked against the given CA or the system's roots) and the parse is
strict (each `x509-svid` key has exactly one certificate in `x5c`; `jwt-svid` keys have a
`kid`); anything else is refused and nothing is stored.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgekms import spiffe as sp
from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.v1 import ca_pb2

MAX_BUNDLE_BYTES = 1 << 20
FETCH_TIMEOUT = 10.0
DEFAULT_REFRESH_HINT = 300
MIN_REFRESH = 10
MAX_REFRESH = 86400


def _int_b64(value: int) -> str:
    return sp.b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _jwk_params(public: Any) -> dict[str, Any]:
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        numbers = public.public_numbers()
        return {
            "kty": "EC",
            "crv": {"secp256r1": "P-256", "secp384r1": "P-384"}.get(public.curve.name, ""),
            "x": sp.b64url(numbers.x.to_bytes(size, "big")),
            "y": sp.b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        return {"kty": "RSA", "n": _int_b64(rsa_numbers.n), "e": _int_b64(rsa_numbers.e)}
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": sp.b64url(raw)}
    raise FailedPrecondition("spiffe.key_unsupported", "a bundle key of an unknown type")


def document(bundle: ca_pb2.SpiffeBundle, refresh_hint: int = DEFAULT_REFRESH_HINT) -> bytes:
    """Our bundle as the bundle endpoint serves it."""
    keys: list[dict[str, Any]] = []
    for der in bundle.x509_authorities_der:
        cert = x509.load_der_x509_certificate(der)
        keys.append(
            {
                **_jwk_params(cert.public_key()),
                "use": "x509-svid",
                "x5c": [base64.b64encode(der).decode()],
            }
        )
    keys.extend(json.loads(bundle.jwks or b'{"keys": []}').get("keys", []))
    body = {
        "keys": keys,
        "spiffe_sequence": bundle.sequence,
        "spiffe_refresh_hint": refresh_hint,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument("spiffe.bundle_invalid", message)


def parse(trust_domain: str, data: bytes) -> ca_pb2.SpiffeFederation:
    """A foreign bundle document: its X.509 authorities, its JWT keys, its sequence."""
    try:
        body = json.loads(data)
    except ValueError:
        raise _bad("the bundle is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise _bad("the bundle is not a JWK Set (no keys)")
    authorities: list[bytes] = []
    jwt_keys: list[dict[str, Any]] = []
    for key in body["keys"]:
        if not isinstance(key, dict):
            raise _bad("a key is not a JSON object")
        use = key.get("use")
        if use == "x509-svid":
            chain = key.get("x5c")
            if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
                raise _bad("an x509-svid key needs exactly one certificate in x5c")
            try:
                der = base64.b64decode(chain[0], validate=True)
                x509.load_der_x509_certificate(der)
            except ValueError:
                raise _bad("an x509-svid key's certificate is unreadable") from None
            authorities.append(der)
        elif use == "jwt-svid":
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                raise _bad("a jwt-svid key needs a kid")
            jwt_keys.append(key)
        # Other uses are ignored, as the format says.
    if not authorities and not jwt_keys:
        raise _bad("the bundle has no x509-svid or jwt-svid keys")
    sequence = body.get("spiffe_sequence", 0)
    hint = body.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
    if not isinstance(sequence, int) or not isinstance(hint, int) or sequence < 0:
        raise _bad("spiffe_sequence and spiffe_refresh_hint are integers")
    return ca_pb2.SpiffeFederation(
        trust_domain=trust_domain,
        x509_authorities_der=authorities,
        jwks=json.dumps({"keys": jwt_keys}, separators=(",", ":")).encode(),
        sequence=sequence,
        refresh_hint_seconds=max(MIN_REFRESH, min(MAX_REFRESH, hint)),
    )


def check_url(url: str) -> str:
    if not url.startswith("https://") or len(url) > 2048 or any(c.isspace() for c in url):
        raise InvalidArgument(
            "spiffe.bundle_url_invalid", "the bundle endpoint must be an https:// URL (https_web)"
        )
    return url


def fetch(url: str, endpoint_ca_pem: bytes) -> bytes:
    """GET the bundle (blocking: run it on a thread). FailedPrecondition if the
    endpoint cannot be read, so a retry later may succeed."""
    context = ssl.create_default_context()
    if endpoint_ca_pem:
        context = ssl.create_default_context(cadata=endpoint_ca_pem.decode())
    # https only (check_url): no file: or custom schemes reach urlopen.
    request = urllib.request.Request(check_url(url), headers={"Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT, context=context) as answer:  # noqa: S310
            data: bytes = answer.read(MAX_BUNDLE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            "spiffe.bundle_unreachable", f"cannot read {url[:200]}: {exc}"[:300]
        ) from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise _bad("the bundle is over 1 MiB")
    return data
