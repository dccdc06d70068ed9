"""What an enrolled device may ask the mini-CA for (broker/device_certs.py), as pure
logic: the names and profiles its device record allows, nothing else."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.authz import check_method
from broker.device_certs import check_issue
from edgekms.errors import InvalidArgument, PermissionDenied
from edgekms.identity import Identity
from edgekms.v1 import ca_pb2, enroll_pb2

KEY = ec.generate_private_key(ec.SECP256R1())
DEVICE = enroll_pb2.Device(
    name="nas-7", profile="device", sans=["dns:nas-7.home.arpa", "ip:192.168.1.7"]
)


def request(
    subject: list[x509.NameAttribute[str]],
    sans: list[x509.GeneralName] | None,
    profile: str = "https-server",
    pem: bool = False,
) -> ca_pb2.IssueCertificateRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    der = builder.sign(KEY, hashes.SHA256()).public_bytes(encoding)
    return ca_pb2.IssueCertificateRequest(profile=profile, csr=der)


def cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(x509.NameOID.COMMON_NAME, value)


def test_its_own_names_pass_in_any_case_and_either_encoding() -> None:
    ip = x509.IPAddress(ipaddress.ip_address("192.168.1.7"))
    check_issue(DEVICE, request([cn("NAS-7.home.arpa")], [x509.DNSName("NAS-7.Home.Arpa"), ip]))
    check_issue(DEVICE, request([cn("nas-7")], [ip], profile="vpn-server", pem=True))
    check_issue(DEVICE, request([], [x509.DNSName("nas-7.home.arpa")], profile="vpn-client"))


OURS = x509.DNSName("nas-7.home.arpa")
ORG = x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Bank")
OTHER_IP = x509.IPAddress(ipaddress.ip_address("10.0.0.1"))
URI = x509.UniformResourceIdentifier("https://nas-7.home.arpa")


@pytest.mark.parametrize(
    ("subject", "sans", "profile", "reason"),
    [
        ([cn("nas-7.home.arpa")], [x509.DNSName("evil.example")], "https-server", "name"),
        ([cn("nas-7.home.arpa")], [OTHER_IP], "https-server", "name"),
        ([cn("nas-7.home.arpa")], [URI], "https-server", "name"),
        ([cn("other")], [OURS], "https-server", "name"),
        ([cn("nas-7"), ORG], [OURS], "https-server", "name"),
        ([cn("nas-7.home.arpa")], None, "https-server", "name"),
        ([cn("nas-7.home.arpa")], [OURS], "device", "profile"),
        ([cn("nas-7.home.arpa")], [OURS], "no-such", "profile"),
    ],
)
def test_anything_else_is_refused(
    subject: list[x509.NameAttribute[str]],
    sans: list[x509.GeneralName] | None,
    profile: str,
    reason: str,
) -> None:
    with pytest.raises(PermissionDenied) as refused:
        check_issue(DEVICE, request(subject, sans, profile))
    assert refused.value.reason == f"device.{reason}_not_allowed"


def test_a_device_enrolled_without_names_may_certify_none() -> None:
    bare = enroll_pb2.Device(name="meter-1", profile="device")
    with pytest.raises(PermissionDenied) as refused:
        check_issue(bare, request([cn("meter-1")], [x509.DNSName("meter-1")]))
    assert refused.value.reason == "device.name_not_allowed"


def test_not_a_csr_is_malformed() -> None:
    with pytest.raises(InvalidArgument) as bad:
        check_issue(DEVICE, ca_pb2.IssueCertificateRequest(profile="https-server", csr=b"junk"))
    assert bad.value.reason == "csr.malformed"


def test_only_a_device_gets_past_the_role_table() -> None:
    signer = Identity(
        client="nas-7", role="signer", serial=1, not_after="2030-01-01T00:00:00+00:00"
    )
    with pytest.raises(PermissionDenied):
        check_method(signer, "IssueCertificate")
    check_method(signer, "IssueCertificate", device=True)
    with pytest.raises(PermissionDenied):
        check_method(signer, "RevokeCertificate", device=True)
