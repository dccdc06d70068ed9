"""How a client certificate says who its holder is: the one documented encoding.

A client certificate issued by the internal CA names its holder and role in URI
subjectAltNames, and nowhere else:

    urn:edgekms:client:<name>     exactly one; <name> matches CLIENT_NAME_RE
    urn:edgekms:role:<role>       exactly one; one of ROLES

and carries extendedKeyUsage clientAuth. The subject CN repeats the name for people
reading the certificate, but is never consulted: a certificate with zero or two of
either URI, an unknown role, or no clientAuth is refused. `kmsctl init` and
`kmsctl client add` write this encoding; the broker reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgekms.errors import Unauthenticated

ROLES = ("admin", "operator", "signer", "enrollee")
CLIENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_CLIENT_PREFIX = "urn:edgekms:client:"
_ROLE_PREFIX = "urn:edgekms:role:"


@dataclass(frozen=True)
class Identity:
    client: str
    role: str
    serial: int
    not_after: str  # RFC 3339


def identity_uris(client: str, role: str) -> list[x509.UniformResourceIdentifier]:
    """The SAN entries for a client certificate (used by whoever issues one)."""
    if not CLIENT_NAME_RE.match(client):
        raise ValueError(f"client name {client!r} must match {CLIENT_NAME_RE.pattern}")
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return [
        x509.UniformResourceIdentifier(_CLIENT_PREFIX + client),
        x509.UniformResourceIdentifier(_ROLE_PREFIX + role),
    ]


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Read the holder from a verified client certificate, or raise Unauthenticated."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise Unauthenticated("auth.no_client_eku", "certificate has no extendedKeyUsage") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise Unauthenticated("auth.no_client_eku", "certificate is not for client authentication")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Unauthenticated(
            "auth.no_identity", "certificate carries no EdgeKMS identity"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    clients = [u[len(_CLIENT_PREFIX) :] for u in uris if u.startswith(_CLIENT_PREFIX)]
    roles = [u[len(_ROLE_PREFIX) :] for u in uris if u.startswith(_ROLE_PREFIX)]
    if len(clients) != 1 or not CLIENT_NAME_RE.match(clients[0]):
        raise Unauthenticated("auth.bad_identity", "certificate must name exactly one client")
    if len(roles) != 1 or roles[0] not in ROLES:
        raise Unauthenticated("auth.bad_role", "certificate must carry exactly one known role")
    return Identity(
        client=clients[0],
        role=roles[0],
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.isoformat(),
    )
