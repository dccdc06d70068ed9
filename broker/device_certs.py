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

from edgekms.csr_names import check_csr_names, csr_names, load_csr
from edgekms.errors import PermissionDenied
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


# The CSR's parsing and name check are shared with the CA's fleet path (edgekms.csr_names).
_load = load_csr
_names = csr_names


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
    if not device.sans:
        raise PermissionDenied(
            "device.name_not_allowed",
            f"device {device.name!r} was enrolled without --san names, so it may certify none",
            {"device": device.name},
        )
    check_csr_names(device.name, device.sans, request.csr)
