"""A device's own mini-CA certificates against the real stack (`kmsctl up`): an enrolled
device asks the CA, through the broker and with its own identity, for an https-server
certificate for the names its token allowed, and nothing else; its deny revokes that
certificate (the CA's CRL and OCSP say so at the next fetch) and its renewal is refused."""

from __future__ import annotations

import ipaddress
import json
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from edgekms import errors
from edgekms.v1 import ca_pb2
from mgmt.client import KMSClient
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json
from tests.enroll.test_devices import REFUSED
from tests.enroll.test_enroll import csr, enrolled

NAS = "nas-7.home.arpa"


def fetch(url: str, body: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/ocsp-request"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        return bytes(answer.read())


def ocsp_status(stack: KmsStack, leaf: x509.Certificate, issuer: x509.Certificate) -> object:
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
    der = fetch(f"{stack.ca_url}/ocsp", request.public_bytes(serialization.Encoding.DER))
    return ocsp.load_der_ocsp_response(der).certificate_status


def test_a_device_gets_certificates_for_its_own_names_and_loses_them_when_denied(
    stack: KmsStack, ca_dir: Path, tmp_path: Path
) -> None:
    config = enrolled(stack, tmp_path, "nas-7", "--san", f"dns:{NAS}", "--san", "ip:192.168.1.7")
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(NAS), x509.IPAddress(ipaddress.ip_address("192.168.1.7"))]
    with KMSClient.from_config(config, timeout=20) as device:
        issued = device.issue_certificate("https-server", csr(key, cn=NAS, sans=names))
        assert issued.record.requester == "nas-7"
        assert issued.record.profile == "https-server"
        leaf = x509.load_der_x509_certificate(issued.certificate_der)
        issuer = x509.load_der_x509_certificate(issued.chain_der[0])
        assert leaf.public_key() == key.public_key()
        assert ocsp_status(stack, leaf, issuer) == ocsp.OCSPCertStatus.GOOD

        # Anything its token did not allow: refused before the CA signs anything.
        refusals = [
            ("https-server", csr(key, cn=NAS, sans=[x509.DNSName("bank.example")]),
             errors.PermissionDenied, "device.name_not_allowed"),
            ("https-server", csr(key, cn="other.home.arpa", sans=[x509.DNSName(NAS)]),
             errors.PermissionDenied, "device.name_not_allowed"),
            ("https-server", csr(key, cn=NAS), errors.PermissionDenied, "device.name_not_allowed"),
            ("device", csr(key, cn=NAS, sans=[x509.DNSName(NAS)]),
             errors.PermissionDenied, "device.profile_not_allowed"),
            ("https-server", b"not a csr", errors.InvalidArgument, "csr.malformed"),
        ]  # fmt: skip
        for profile, der, kind, reason in refusals:
            with pytest.raises(kind) as refused:
                device.issue_certificate(profile, der)
            assert refused.value.reason == reason, profile
        # The rest of running the CA stays an operator's.
        with pytest.raises(errors.PermissionDenied) as revoke:
            device.revoke_certificate(issued.record.serial)
        assert revoke.value.reason == "authz.role_denied"
    # The same through kmsctl, as the README shows: a vpn-server certificate for its IP.
    vpn_csr, vpn_crt = tmp_path / "vpn.csr", tmp_path / "vpn.crt"
    vpn_csr.write_bytes(csr(key, cn=NAS, sans=[names[1]]))
    cli = run(
        stack, "cert", "issue", "--profile", "vpn-server", "--csr", str(vpn_csr),
        "--out", str(vpn_crt), "-o", "json", config=config,
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["profile"] == "vpn-server"
    vpn_leaf = x509.load_pem_x509_certificate(vpn_crt.read_bytes())
    with stack.client() as admin:
        named = admin.list_certificates_page(ca_pb2.ListCertificatesRequest(requester="nas-7"))
    # Nothing else was signed for its names; the one that was names the device as requester.
    assert sorted((int(r.serial, 16), r.requester) for r in named.records) == sorted(
        [(leaf.serial_number, "nas-7"), (vpn_leaf.serial_number, "nas-7")]
    )
    audit = run(stack, "audit", "tail", "-o", "json")
    assert audit.exit_code == 0, audit.output
    assert (
        "device.name_not_allowed" in audit.stdout and "device.profile_not_allowed" in audit.stdout
    )

    denied = run_json(stack, "device", "deny", "nas-7")
    # Its client certificate and its https-server and vpn-server certificates.
    assert denied["certificates_revoked"] >= 3
    crl = x509.load_der_x509_crl(fetch(f"{stack.ca_url}/crl"))
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert ocsp_status(stack, leaf, issuer) == ocsp.OCSPCertStatus.REVOKED
    assert crl.get_revoked_certificate_by_serial_number(vpn_leaf.serial_number) is not None

    with KMSClient.from_config(config, timeout=20) as device:
        # The device itself is refused at the door, for a new certificate or a renewal.
        with pytest.raises(errors.Unauthenticated) as again:
            device.issue_certificate("https-server", csr(key, cn=NAS, sans=[x509.DNSName(NAS)]))
        assert again.value.reason in REFUSED
        renewal_csr = csr(key, cn=NAS, sans=names)
        with pytest.raises(errors.Unauthenticated) as renewal:
            device.renew_held_certificate(issued.certificate_der, renewal_csr)
        assert renewal.value.reason in REFUSED
    # Whoever else holds the key (renewal by possession needs no identity of the device's)
    # is refused by the CA: the certificate is revoked.
    with stack.client() as admin, pytest.raises(errors.FailedPrecondition) as held:
        admin.renew_held_certificate(issued.certificate_der, renewal_csr)
    assert held.value.reason == "cert.revoked"
