"""Certificate requests the CA must refuse, one case each, against the CA service over
NATS with its keys in SoftHSM: each refusal is typed and leaves no certificate record."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from tests.ca.asn1 import csr_with_duplicate_san
from tests.ca.conftest import CAEnv
from tests.ca.helpers import make_csr, make_key


def _good() -> bytes:
    return make_csr(make_key("ec-p256"))


def _bad_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_good()).public_bytes(serialization.Encoding.DER))
    der[der.index(b"nas.example.com")] ^= 1
    return bytes(der)


def _der(pem: bytes) -> bytes:
    """DER: 3,000 names fit the CA's 64 KiB request limit only without PEM's base64."""
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _with(extension: x509.ExtensionType, critical: bool) -> bytes:
    return make_csr(make_key("ec-p256"), extensions=[(extension, critical)])


UNKNOWN_CRITICAL = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\0"
)
GARBAGE_PEM = b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"

# id -> (profile, CSR factory, validity days, reason)
CASES: dict[str, tuple[str, Callable[[], bytes], int, str]] = {
    "malformed_pem": ("device", lambda: GARBAGE_PEM, 0, "csr.malformed"),
    "malformed_der": ("device", lambda: b"\x30\x05\x02\x01\x01\x05\x00", 0, "csr.malformed"),
    "empty": ("device", lambda: b"", 0, "csr.missing"),
    "bad_self_signature": ("device", _bad_signature, 0, "csr.bad_signature"),
    "unknown_profile": ("no-such-profile", _good, 0, "profile.unknown"),
    "weak_rsa_1024": ("device", lambda: make_csr(make_key("rsa-1024")), 0, "csr.weak_key"),
    "curve_p521": ("device", lambda: make_csr(make_key("ec-p521")), 0, "csr.curve_not_allowed"),
    "curve_secp256k1": (
        "device",
        lambda: make_csr(make_key("ec-k256")),
        0,
        "csr.curve_not_allowed",
    ),
    "ed25519_for_https": (
        "https-server",
        lambda: make_csr(make_key("ed25519")),
        0,
        "csr.ed25519_not_allowed",
    ),
    "san_outside_profile": (
        "https-server",
        lambda: make_csr(make_key("ec-p256"), sans=("email:a@b.example",)),
        0,
        "csr.san_not_allowed",
    ),
    "ca_true": (
        "device",
        lambda: _with(x509.BasicConstraints(True, None), True),
        0,
        "csr.ca_requested",
    ),
    "unknown_critical_extension": (
        "device",
        lambda: _with(UNKNOWN_CRITICAL, True),
        0,
        "csr.unknown_critical_extension",
    ),
    "duplicate_extension": ("device", csr_with_duplicate_san, 0, "csr.duplicate_extension"),
    "validity_beyond_profile": ("https-server", _good, 400, "cert.validity_exceeds_profile"),
    "three_thousand_sans": (
        "https-server",
        lambda: _der(
            make_csr(make_key("ec-p256"), sans=tuple(f"dns:h{i}.home.arpa" for i in range(3000)))
        ),
        0,
        "csr.too_many_sans",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_csr_refused(ca_env: CAEnv, case: str) -> None:
    await ca_env.init()
    profile, make, days, reason = CASES[case]
    request = ca_pb2.IssueCertificateRequest(profile=profile, csr=make(), validity_days=days)
    before = await ca_env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    with pytest.raises(InvalidArgument) as refused:
        await ca_env.call("IssueCertificate", request, ca_pb2.IssueCertificateResponse)
    assert refused.value.reason == reason, refused.value
    assert await ca_env.record_count() == 0
    after = await ca_env.call("GetCRL", ca_pb2.GetCRLRequest(), ca_pb2.GetCRLResponse)
    assert after.crl_number == before.crl_number


async def test_non_protobuf_issue_request_is_invalid(ca_env: CAEnv) -> None:
    await ca_env.init()
    msg = await ca_env.nc.request("kms.ca.IssueCertificate", b"\xff\xff\xff", timeout=10)
    assert msg.headers and msg.headers["Nats-Service-Error-Code"] == "ERROR_CODE_INVALID_ARGUMENT"
    assert await ca_env.record_count() == 0
