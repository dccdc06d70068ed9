"""SPIFFE IDs, selectors and JWT-SVID encoding, shared by the CA, kmsctl and the agent.

Why shared: the CLI refuses a malformed entry before it is sent, the CA refuses it again
(a caller may skip the CLI), and the agent checks what the CA signed; all three must
agree on one reading of the SPIFFE-ID specification. Every refusal is InvalidArgument
with a stable reason (`spiffe.id_invalid`, `spiffe.selector_invalid`, ...).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
)

from edgekms.errors import InvalidArgument

# SPIFFE-ID spec: the whole URI at most 2048 bytes, the trust domain at most 255.
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN = 255
_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Device names, as enrollment makes them (edgekms.identity.CLIENT_NAME_RE).
NODE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_SELECTORS = 16
MAX_SELECTOR_BYTES = 512
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,255}\.(service|scope|socket|timer|slice)$")
DEFAULT_X509_TTL = 3600
DEFAULT_JWT_TTL = 300
MIN_TTL = 10
MAX_TTL = 7 * 86400


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def _bad_id(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(
        "spiffe.id_invalid", f"{text[:120]!r} is not a SPIFFE ID: {why}", {"id": text[:120]}
    )


def check_trust_domain(name: str) -> str:
    """A trust domain name: lower-case letters, digits, '.', '-', '_' (no port, no
    user info, no upper case), at most 255 characters."""
    if not name:
        raise InvalidArgument("spiffe.trust_domain_invalid", "the trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN or not _TD_RE.match(name):
        raise InvalidArgument(
            "spiffe.trust_domain_invalid",
            f"{name[:80]!r} is not a trust domain: lower-case letters, digits, '.', '-', '_'",
            {"trust_domain": name[:80]},
        )
    return name


def parse_id(text: str, *, require_path: bool = False) -> SpiffeId:
    """Parse a SPIFFE ID exactly as the SPIFFE-ID specification allows it."""
    if len(text.encode()) > MAX_ID_BYTES:
        raise _bad_id(text, f"longer than {MAX_ID_BYTES} bytes")
    if not text.startswith("spiffe://"):
        raise _bad_id(text, "the scheme must be 'spiffe://' (lower case)")
    rest = text[len("spiffe://") :]
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if ch in rest:
            raise _bad_id(text, f"{what} is not allowed")
    td, slash, path = rest.partition("/")
    if "@" in td:
        raise _bad_id(text, "user info is not allowed")
    if ":" in td:
        raise _bad_id(text, "a port is not allowed")
    if not td:
        raise _bad_id(text, "the trust domain is missing")
    if len(td) > MAX_TRUST_DOMAIN or not _TD_RE.match(td):
        raise _bad_id(text, "trust domain characters are a-z 0-9 . - _")
    if slash:
        if not path or path.endswith("/"):
            raise _bad_id(text, "a trailing '/' is not allowed")
        for segment in path.split("/"):
            if not segment:
                raise _bad_id(text, "empty path segments are not allowed")
            if segment in (".", ".."):
                raise _bad_id(text, "'.' and '..' segments are not allowed")
            if not _SEGMENT_RE.match(segment):
                raise _bad_id(text, "path characters are A-Z a-z 0-9 . - _")
    elif require_path:
        raise _bad_id(text, "a workload's ID needs a path")
    return SpiffeId(td, f"/{path}" if slash else "")


def check_selector(text: str) -> str:
    """One selector, `type:key:value`, of the kinds the agent attests."""
    if len(text.encode()) > MAX_SELECTOR_BYTES:
        raise _bad_selector(text, f"longer than {MAX_SELECTOR_BYTES} bytes")
    kind, _, value = text.partition(":")
    key, sep, value = value.partition(":")
    if not sep or not value:
        raise _bad_selector(text, "the form is type:key:value")
    name = f"{kind}:{key}"
    if name in ("unix:uid", "unix:gid"):
        if not value.isdigit() or len(value) > 10 or int(value) > 0xFFFFFFFF:
            raise _bad_selector(text, "uid and gid are decimal numbers")
    elif name == "unix:path":
        if not value.startswith("/") or "\0" in value or "/../" in f"{value}/":
            raise _bad_selector(text, "the path must be absolute and without '..'")
    elif name == "unix:sha256":
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise _bad_selector(text, "the digest is 64 lower-case hex digits")
    elif name == "systemd:unit":
        if not _UNIT_RE.match(value):
            raise _bad_selector(text, "a systemd unit name such as backup.service")
    else:
        raise _bad_selector(
            text, "known kinds: unix:uid, unix:gid, unix:path, unix:sha256, systemd:unit"
        )
    return text


def _bad_selector(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(
        "spiffe.selector_invalid", f"selector {text[:120]!r}: {why}", {"selector": text[:120]}
    )


def check_selectors(selectors: list[str]) -> list[str]:
    """An entry's selectors: one at least, at most MAX_SELECTORS, no repeats, sorted."""
    if not selectors:
        raise InvalidArgument("spiffe.selector_missing", "an entry needs one selector at least")
    if len(selectors) > MAX_SELECTORS:
        raise InvalidArgument(
            "spiffe.selector_invalid", f"at most {MAX_SELECTORS} selectors per entry"
        )
    return sorted({check_selector(s) for s in selectors})


def check_node(node: str) -> str:
    if not NODE_RE.match(node):
        raise InvalidArgument(
            "spiffe.node_invalid",
            f"{node[:80]!r} is not a device name (lower-case letters, digits, '.', '-', '_')",
            {"node": node[:80]},
        )
    return node


def check_ttl(seconds: int, what: str = "ttl") -> int:
    if seconds and not MIN_TTL <= seconds <= MAX_TTL:
        raise InvalidArgument(
            "spiffe.ttl_invalid", f"the {what} must be {MIN_TTL}s..7d, not {seconds}s"
        )
    return seconds


def parse_seconds(text: str) -> int:
    """ "90s", "30m", "1h", "7d": SVID lifetimes are short, so seconds are allowed here
    (edgekms.durations, for certificates, starts at minutes)."""
    match = re.fullmatch(r"(\d{1,7})([smhd])", text.strip().lower())
    if not match:
        raise InvalidArgument(
            "spiffe.ttl_invalid", f"{text[:40]!r} is not a duration like 90s, 30m, 1h or 7d"
        )
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def entry_id(node: str, spiffe_id: str) -> str:
    """Stable per (node, ID): creating the same entry twice is AlreadyExists, not a
    second copy, and the KV key needs no lookup."""
    return hashlib.sha256(f"{node}\n{spiffe_id}".encode()).hexdigest()[:32]


def matches(entry_selectors: list[str] | tuple[str, ...], attested: frozenset[str]) -> bool:
    """An entry applies when every one of its selectors was attested (SPIRE's rule)."""
    return bool(entry_selectors) and all(s in attested for s in entry_selectors)


# ---- JWT (RFC 7515/7519, ES256 only) ---------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise InvalidArgument("jwt.malformed", "not base64url") from None


def jwt_signing_input(header: dict[str, Any], claims: dict[str, Any]) -> bytes:
    return (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    ).encode()


def der_to_jose(signature: bytes) -> bytes:
    """ECDSA P-256 DER (what the token returns) to JOSE's 64-byte r || s."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def jwk_of(public: ec.EllipticCurvePublicKey, kid: str, use: str) -> dict[str, Any]:
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
        "kid": kid,
        "use": use,
    }


def jwt_kid(public: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint: the same key always gets the same kid."""
    jwk = jwk_of(public, "", "")
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]},
        separators=(",", ":"),
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())
