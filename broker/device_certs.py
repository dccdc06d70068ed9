"""What an enrolled device may ask the mini-CA for: certificates for its own names.

A device's role (signer) may not run the CA, but the certificates its services need
(nginx's https-server, OpenVPN's vpn-server) must be the CA's, or a deny could not reach
them. So the broker lets a device call IssueCertificate narrowed to what its enrollment
token allowed: the profiles its enrollment profile lists, and a CSR naming only the
SANs recorded on its device record (the subject a single CN, one of those names or the
device's own). The requester is the device (the forwarder writes it from the caller's
certificate), which is how `kmsctl device deny` finds and revokes these certificates.
"""

from __future__ import annotations

from cryptography import x509

from edgekms.errors import InvalidArgument, PermissionDenied
from edgekms.sans import ADDRESS_KINDS, san_strings, type_and_value
from edgekms.v1 import ca_pb2, enroll_pb2

# SPIFFE calls a device makes for the workloads on it (spiffe_agent): narrowed by the
# forwarder to the device's own node (`node` written from its certificate, never taken
# from the request), so a device can list, and get SVIDs for, only its own entries.
SPIFFE_DEVICE_METHODS = frozenset({"SpiffeSignX509Svid", "SpiffeSignJwtSvid", "SpiffeListEntries"})
# Methods a device may call beyond its role's: IssueCertificate checked by `check_issue`
# below, the SPIFFE ones by their node.
DEVICE_METHODS = frozenset({"IssueCertificate"}) | SPIFFE_DEVICE_METHODS

# Per enrollment profile (broker.enrollment.PROFILES): the mini-CA profiles its devices
# may ask for. Not `device` itself: that profile's certificates are broker identities.
CA_PROFILES: dict[str, frozenset[str]] = {
    "device": frozenset({"https-server", "vpn-server", "vpn-client"}),
}


def _load(csr_bytes: bytes) -> x509.CertificateSigningRequest:
    try:
        if csr_bytes.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(csr_bytes)
        return x509.load_der_x509_csr(csr_bytes)
    except ValueError:
        raise InvalidArgument("csr.malformed", "the CSR is not PKCS#10 (PEM or DER)") from None


def _names(
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


def check_issue(device: enroll_pb2.Device, request: ca_pb2.IssueCertificateRequest) -> None:
    """Refuse (typed, before the CA sees it) what the device's token did not allow."""
    allowed_profiles = CA_PROFILES.get(device.profile, frozenset())
    if request.profile not in allowed_profiles:
        raise PermissionDenied(
            "device.profile_not_allowed",
            f"device {device.name!r} may ask for {', '.join(sorted(allowed_profiles)) or 'no'}"
            f" certificates, not {request.profile[:40]!r}",
            {"device": device.name, "profile": request.profile[:40]},
        )
    allowed = set(device.sans)
    if not allowed:
        raise PermissionDenied(
            "device.name_not_allowed",
            f"device {device.name!r} was enrolled without --san names, so it may certify none",
            {"device": device.name},
        )
    attributes, sans = _names(_load(request.csr))
    dns_names = {s.removeprefix("dns:") for s in allowed if s.startswith("dns:")}
    for oid, value in attributes:
        if oid != x509.NameOID.COMMON_NAME or (
            value.lower() not in dns_names and value != device.name
        ):
            raise PermissionDenied(
                "device.name_not_allowed",
                f"subject attribute {value[:80]!r} is not one of the device's names",
                {"device": device.name},
            )
    if not sans:
        raise PermissionDenied(
            "device.name_not_allowed",
            "the CSR names no SAN; give one or more of the device's --san names",
            {"device": device.name},
        )
    for san in sans:
        if san not in allowed:
            raise PermissionDenied(
                "device.name_not_allowed",
                f"SAN {san[:80]!r} is not one the device's token allowed",
                {"device": device.name, "san": san[:80]},
            )
