"""Checks a certificate request against its profile, before anything is signed or stored.

Every refusal is a typed error with a stable reason, so that kmsctl and the broker can
tell the administrator exactly what the profile does not allow. The result is a plan the
builder turns into a certificate without further judgement.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from ca_service.profiles import Profile, san_strings
from edgekms.durations import MIN_TTL, format_ttl
from edgekms.errors import InvalidArgument

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# CSR extensions the CA understands (and then decides itself); anything else marked
# critical is refused, because a critical extension the CA ignores would be a lie.
_UNDERSTOOD = frozenset(
    {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }
)
_MAX_CSR = 64 * 1024
# A certificate's names must fit the CA's record of it on the bus: 3,000 SANs used to be
# signed and then fail to store (INTERNAL). No NAS or VPN certificate needs more.
MAX_SANS = 100
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class IssuePlan:
    """What the builder will put into a certificate, every field already allowed."""

    profile: Profile
    subject: x509.Name
    public_key: PublicKey
    key_type: str
    san: x509.SubjectAlternativeName | None
    validity: datetime.timedelta

    @property
    def san_list(self) -> list[str]:
        return san_strings(self.san) if self.san is not None else []


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """PEM or DER; anything else is csr.malformed. The self-signature is checked here."""
    if not data:
        raise InvalidArgument("csr.missing", "no certificate request was given")
    if len(data) > _MAX_CSR:
        raise InvalidArgument("csr.too_large", f"requests are limited to {_MAX_CSR} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise InvalidArgument("csr.malformed", f"not a PKCS#10 request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported signature algorithms raise here
        raise InvalidArgument("csr.bad_signature", f"cannot check the signature: {exc}") from None
    if not valid:
        raise InvalidArgument("csr.bad_signature", "the request's self-signature does not verify")
    return csr


def key_type_name(public_key: object) -> str:
    """edgekms.algorithms cli name of a public key, refusing what no profile can allow."""
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < 2048:
            raise InvalidArgument(
                "csr.weak_key", f"RSA-{bits} is too weak: 2048 bits at least", {"bits": str(bits)}
            )
        if bits not in (2048, 3072, 4096):
            raise InvalidArgument(
                "csr.key_type_not_allowed", f"RSA-{bits}: use 2048, 3072 or 4096 bits"
            )
        return f"rsa-{bits}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public_key.curve.name)
        if name is None:
            raise InvalidArgument(
                "csr.curve_not_allowed",
                f"curve {public_key.curve.name} is not allowed: P-256 or P-384",
                {"curve": public_key.curve.name},
            )
        return name
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise InvalidArgument(
        "csr.key_type_not_allowed", f"{type(public_key).__name__} keys are not certified"
    )


def _check_dns(name: str) -> None:
    labels = name.split(".")
    body = labels[1:] if labels[0] == "*" else labels
    ok = (
        len(name) <= 253
        and len(labels) >= (3 if labels[0] == "*" else 2)  # no bare host names, no "*.com"
        and name == name.lower()
        and all(_LABEL.match(label) for label in body)
    )
    if not ok:
        raise InvalidArgument(
            "csr.san_invalid",
            f"{name!r} is not a lower-case, fully qualified DNS name (e.g. nas.home.arpa)",
            {"san": name},
        )


def _check_uri(value: str) -> None:
    """RFC 5280 wants a scheme and, for relying parties to match, a host: spiffe://a/b."""
    parts = urlsplit(value)
    if not parts.scheme or not parts.hostname:
        raise InvalidArgument(
            "csr.san_invalid", f"{value!r} is not a URI with a scheme and host", {"san": value}
        )
    _check_dns(parts.hostname)


def check_sans(profile: Profile, san: x509.SubjectAlternativeName | None) -> None:
    if san is None or len(san) == 0:
        if profile.san_required:
            raise InvalidArgument(
                "csr.san_required", f"profile {profile.name} needs DNS or IP subject alt names"
            )
        return
    if len(san) > MAX_SANS:
        raise InvalidArgument(
            "csr.too_many_sans",
            f"at most {MAX_SANS} subject alt names per certificate, not {len(san)}",
            {"max_sans": str(MAX_SANS)},
        )
    seen: set[str] = set()
    for gn in san:
        if isinstance(gn, x509.DNSName):
            kind, value = "dns", gn.value
            _check_dns(value)
            if value.startswith("*.") and not profile.allow_wildcards:
                raise InvalidArgument(
                    "csr.wildcard_not_allowed",
                    f"profile {profile.name} does not issue wildcard names",
                    {"san": value, "profile": profile.name},
                )
        elif isinstance(gn, x509.IPAddress):
            if not isinstance(gn.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise InvalidArgument("csr.san_invalid", "IP SANs name one address, not a network")
            kind, value = "ip", str(gn.value)
        elif isinstance(gn, x509.RFC822Name):
            kind, value = "email", gn.value
            local, _, domain = value.rpartition("@")
            if not local:
                raise InvalidArgument("csr.san_invalid", f"{value!r} is not a mailbox")
            _check_dns(domain)
        elif isinstance(gn, x509.UniformResourceIdentifier):
            kind, value = "uri", gn.value
            _check_uri(value)
        else:
            raise InvalidArgument(
                "csr.san_not_allowed", f"{type(gn).__name__} names are not certified"
            )
        key = f"{kind}:{value.lower()}"
        if key in seen:
            raise InvalidArgument("csr.san_duplicate", f"{key} appears twice", {"san": key})
        seen.add(key)
        if not profile.sans.allows(kind, value):
            raise InvalidArgument(
                "csr.san_not_allowed",
                f"{kind}:{value} is outside what profile {profile.name} allows",
                {"san": f"{kind}:{value}", "profile": profile.name},
            )
        if kind == "uri" and urlsplit(value).scheme == "spiffe":
            # The SPIFFE bundle's X.509 authority is this CA's root: a spiffe:// URI in
            # any other certificate under it would pass for an X.509-SVID, so only the
            # SPIFFE signing CA writes them (ca_service.spiffe), whatever a profile says.
            raise InvalidArgument(
                "csr.san_spiffe_reserved",
                f"{value[:120]} is a SPIFFE ID: SVIDs come from the SPIFFE CA "
                "(kmsctl spiffe entry create), not from a profile",
                {"san": f"{kind}:{value[:120]}", "profile": profile.name},
            )
    if profile.san_required and not any(
        isinstance(gn, x509.DNSName | x509.IPAddress) for gn in san
    ):
        raise InvalidArgument(
            "csr.san_required", f"profile {profile.name} needs DNS or IP subject alt names"
        )


def check_validity(
    profile: Profile, validity_days: int = 0, validity_seconds: int = 0
) -> datetime.timedelta:
    """The lifetime a request gets: what it asks (in days, or in seconds for short-lived
    certificates), else the profile's default; never past the profile's maximum."""
    if validity_days and validity_seconds:
        raise InvalidArgument(
            "cert.ttl_conflict", "give the lifetime in days or in seconds, not both"
        )
    if validity_seconds:
        asked = datetime.timedelta(seconds=validity_seconds)
        if asked < MIN_TTL:
            raise InvalidArgument(
                "cert.ttl_invalid",
                f"a lifetime of {format_ttl(asked)} is below the minimum {format_ttl(MIN_TTL)}",
                {"min_seconds": str(int(MIN_TTL.total_seconds()))},
            )
    elif validity_days:
        asked = datetime.timedelta(days=validity_days)
    else:
        asked = profile.default_validity
    if asked > profile.max_validity:
        raise InvalidArgument(
            "cert.validity_exceeds_profile",
            f"{format_ttl(asked)} asked; profile {profile.name} allows "
            f"{format_ttl(profile.max_validity)}",
            {
                "max": str(profile.max_validity_days),
                "max_seconds": str(int(profile.max_validity.total_seconds())),
            },
        )
    return asked


def plan_from_csr(
    profile: Profile,
    csr: x509.CertificateSigningRequest,
    validity_days: int = 0,
    validity_seconds: int = 0,
) -> IssuePlan:
    """The plan for a verified CSR (see load_csr), or the first thing the profile refuses."""
    try:
        extensions = csr.extensions
    except x509.DuplicateExtension as exc:
        raise InvalidArgument(
            "csr.duplicate_extension",
            f"extension {exc.oid.dotted_string} appears twice",
            {"oid": exc.oid.dotted_string},
        ) from None
    except ValueError as exc:
        raise InvalidArgument("csr.malformed", f"unreadable extensions: {exc}") from None
    for ext in extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD:
            raise InvalidArgument(
                "csr.unknown_critical_extension",
                f"critical extension {ext.oid.dotted_string} is not understood",
                {"oid": ext.oid.dotted_string},
            )
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise InvalidArgument("csr.ca_requested", "the CA issues end-entity certificates only")
    public_key = csr.public_key()
    if not isinstance(public_key, PublicKey):
        raise InvalidArgument(
            "csr.key_type_not_allowed", f"{type(public_key).__name__} keys are not certified"
        )
    try:
        san: x509.SubjectAlternativeName | None = extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        san = None
    return make_plan(profile, csr.subject, public_key, san, validity_days, validity_seconds)


def make_plan(
    profile: Profile,
    subject: x509.Name,
    public_key: PublicKey,
    san: x509.SubjectAlternativeName | None,
    validity_days: int = 0,
    validity_seconds: int = 0,
) -> IssuePlan:
    """Shared by issuance from a CSR and renewal from a stored certificate."""
    key_type = key_type_name(public_key)
    if key_type not in profile.key_types:
        reason = "csr.ed25519_not_allowed" if key_type == "ed25519" else "csr.key_type_not_allowed"
        raise InvalidArgument(
            reason,
            f"profile {profile.name} does not allow {key_type} keys "
            f"(allowed: {', '.join(sorted(profile.key_types))})",
            {"key_type": key_type, "profile": profile.name},
        )
    check_sans(profile, san)
    if len(subject) == 0 and (san is None or len(san) == 0):
        raise InvalidArgument("csr.subject_empty", "a certificate needs a subject or a SAN")
    validity = check_validity(profile, validity_days, validity_seconds)
    return IssuePlan(profile, subject, public_key, key_type, san if san else None, validity)
