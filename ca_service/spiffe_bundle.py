"""SPIFFE bundles in the SPIFFE Trust Domain and Bundle format (a JWK Set): ours as the
bundle endpoint serves it, and a foreign one read from its endpoint, over either profile
of the SPIFFE Federation specification: `https_web` (the endpoint's TLS checked against
the given CA or the system's roots, with its host name) or `https_spiffe` (the endpoint
presents an X509-SVID, authenticated against the foreign domain's last good bundle, and
its URI SAN must be the configured endpoint SPIFFE ID; no host name check).

Why a module of its own: federation is the only place the CA reads from the network on
an administrator's behalf, so the fetch is bounded (https only, 1 MiB, 10 s) and the
parse is strict (each `x509-svid` key has exactly one certificate in `x5c`; `jwt-svid`
keys have a `kid`); anything else is refused and nothing is stored.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.parse
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
HTTPS_WEB = "https_web"
HTTPS_SPIFFE = "https_spiffe"


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
            "spiffe.bundle_url_invalid", "the bundle endpoint must be an https:// URL"
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


def _bad_bootstrap(message: str) -> InvalidArgument:
    return InvalidArgument("spiffe.endpoint_bundle_invalid", message)


def parse_bootstrap(trust_domain: str, data: bytes) -> list[bytes]:
    """The X.509 authorities (DER) of a bundle given out of band for `https_spiffe`:
    SPIFFE bundle JSON (as `spire-server bundle show -format spiffe` prints it) or PEM
    certificates. They authenticate the endpoint's SVID at the first fetch."""
    if not data.strip():
        raise _bad_bootstrap("the endpoint's bundle is empty")
    if len(data) > MAX_BUNDLE_BYTES:
        raise _bad_bootstrap("the endpoint's bundle is over 1 MiB")
    if data.lstrip().startswith(b"{"):
        try:
            authorities = list(parse(trust_domain, data).x509_authorities_der)
        except InvalidArgument as exc:
            raise _bad_bootstrap(f"the endpoint's bundle: {exc.message}") from None
    else:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise _bad_bootstrap(
                "the endpoint's bundle is neither SPIFFE bundle JSON nor PEM certificates"
            ) from None
        authorities = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    if not authorities:
        raise _bad_bootstrap("the endpoint's bundle has no X.509 authorities")
    return authorities


def _untrusted(url: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        "spiffe.endpoint_svid_invalid",
        f"{url[:200]} is not the SPIFFE endpoint configured: {why}"[:400],
    )


def _svid_context(authorities: list[bytes]) -> ssl.SSLContext:
    """Trust exactly the bundle's X.509 authorities, each one a trust anchor (partial
    chain: a SPIFFE signing CA is often an intermediate), no host name: the SPIFFE ID
    is checked instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pem = "".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        for der in authorities
    )
    context.load_verify_locations(cadata=pem)
    return context


def check_endpoint_svid(url: str, leaf_der: bytes, endpoint_id: str) -> None:
    """The endpoint's leaf is an X509-SVID of exactly `endpoint_id`: not a CA, one URI
    SAN, equal to it (the chain itself was checked by the TLS handshake)."""
    leaf = x509.load_der_x509_certificate(leaf_der)
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise _untrusted(url, "its certificate is a CA certificate, not an X509-SVID")
    except x509.ExtensionNotFound:
        pass
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise _untrusted(url, "its certificate has no URI SAN (not an X509-SVID)")
    if len(uris) != 1:
        raise _untrusted(url, "its certificate has more than one URI SAN")
    if uris[0] != endpoint_id:
        raise _untrusted(url, f"its SVID is {uris[0][:200]!r}, not {endpoint_id!r}")


def fetch_spiffe(url: str, authorities: list[bytes], endpoint_id: str) -> bytes:
    """GET the bundle over `https_spiffe` (blocking: run it on a thread). The SVID is
    checked after the handshake and before the request is sent. FailedPrecondition
    either way: `spiffe.endpoint_svid_invalid` if the endpoint is not who it should
    be, `spiffe.bundle_unreachable` if it cannot be read."""
    parts = urllib.parse.urlsplit(check_url(url))
    if not parts.hostname:
        raise InvalidArgument("spiffe.bundle_url_invalid", "the bundle endpoint has no host")
    try:
        port = parts.port or 443
    except ValueError:
        raise InvalidArgument("spiffe.bundle_url_invalid", "the port is not a number") from None
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    connection = http.client.HTTPSConnection(
        parts.hostname, port, timeout=FETCH_TIMEOUT, context=_svid_context(authorities)
    )
    try:
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(url, f"its certificate: {exc.verify_message}") from None
        sock = connection.sock
        leaf = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not leaf:
            raise _untrusted(url, "no certificate")
        check_endpoint_svid(url, leaf, endpoint_id)
        connection.request("GET", path, headers={"Accept": "application/json"})
        answer = connection.getresponse()
        if answer.status != 200:
            raise FailedPrecondition(
                "spiffe.bundle_unreachable", f"cannot read {url[:200]}: HTTP {answer.status}"
            )
        data: bytes = answer.read(MAX_BUNDLE_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise FailedPrecondition(
            "spiffe.bundle_unreachable", f"cannot read {url[:200]}: {exc}"[:300]
        ) from None
    finally:
        connection.close()
    if len(data) > MAX_BUNDLE_BYTES:
        raise _bad("the bundle is over 1 MiB")
    return data
