"""Whether a CSR names only what a device may certify: shared by the broker (an enrolled
device over gRPC, broker.device_certs) and the CA service (a fleet device across its leaf
connection, ca_service.fleet), so both admit exactly the same names.

A device's names are strings `dns:NAME` / `ip:ADDR` (edgekms.sans); the CSR's subject may
hold one CN (one of the DNS names, or the device's own name) and its SANs must all be
among the device's names. Other SAN kinds are tagged with their type so that they match
no recorded name.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography import x509

from edgekms.errors import InvalidArgument, PermissionDenied
from edgekms.sans import ADDRESS_KINDS, san_strings, type_and_value


def load_csr(csr_bytes: bytes) -> x509.CertificateSigningRequest:
    """The CSR (PEM or DER), or InvalidArgument("csr.malformed")."""
    try:
        if csr_bytes.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(csr_bytes)
        return x509.load_der_x509_csr(csr_bytes)
    except ValueError:
        raise InvalidArgument("csr.malformed", "the CSR is not PKCS#10 (PEM or DER)") from None


def csr_names(
    csr: x509.CertificateSigningRequest,
) -> tuple[list[tuple[x509.ObjectIdentifier, str]], list[str]]:
    """The subject's (OID, value) pairs and the SANs as `dns:NAME` / `ip:ADDR` (others
    tagged with their type, so they match no recorded name)."""
    attributes = [(a.oid, str(a.value)) for a in csr.subject]
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return attributes, []
    except (ValueError, x509.DuplicateExtension):
        raise InvalidArgument("csr.malformed", "the CSR's extensions are unreadable") from None
    return attributes, san_strings(ext, kinds=ADDRESS_KINDS, lower_dns=True, other=type_and_value)


def check_csr_names(device: str, allowed: Collection[str], csr_bytes: bytes) -> None:
    """Refuse (PermissionDenied "device.name_not_allowed") a CSR naming anything but
    `allowed` (the device's `dns:`/`ip:` names) in its SANs, or anything but one CN (one
    of its DNS names or `device` itself) in its subject."""
    allowed = set(allowed)
    if not allowed:
        raise PermissionDenied(
            "device.name_not_allowed",
            f"device {device!r} has no names recorded, so it may certify none",
            {"device": device},
        )
    attributes, sans = csr_names(load_csr(csr_bytes))
    dns_names = {s.removeprefix("dns:") for s in allowed if s.startswith("dns:")}
    for oid, value in attributes:
        if oid != x509.NameOID.COMMON_NAME or (value.lower() not in dns_names and value != device):
            raise PermissionDenied(
                "device.name_not_allowed",
                f"subject attribute {value[:80]!r} is not one of the device's names",
                {"device": device},
            )
    if not sans:
        raise PermissionDenied(
            "device.name_not_allowed",
            "the CSR names no SAN; give one or more of the device's names",
            {"device": device},
        )
    for san in sans:
        if san not in allowed:
            raise PermissionDenied(
                "device.name_not_allowed",
                f"SAN {san[:80]!r} is not one of the device's names",
                {"device": device, "san": san[:80]},
            )


__all__ = ["check_csr_names", "csr_names", "load_csr"]
