"""The pure CA library: profiles, request checks, builders, CRL and OCSP, linted by pkilint.

Unit tests of pure logic: CA keys are software keys here (the service tests sign through
a real token); every certificate, CRL and OCSP response is linted at WARNING and above.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ca_service import ocsp as ocsp_mod
from ca_service.builder import CaUrls, build_leaf, random_serial
from ca_service.crl import Revocation, build_crl
from ca_service.ocsp import BadOCSPRequest, CertState, build_response, parse_request
from ca_service.policy import load_csr, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES, get_profile, parse_profiles
from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.v1 import ca_pb2
from tests.ca.helpers import (
    PkilintLoadError,
    SoftCA,
    make_csr,
    make_key,
    make_soft_ca,
    pkilint,
)

URLS = CaUrls.from_base("http://ca.example.com:8080")


@pytest.fixture(scope="module")
def ca() -> SoftCA:
    return make_soft_ca()


def issue(ca: SoftCA, profile: str, csr: bytes, days: int = 0) -> x509.Certificate:
    plan = plan_from_csr(BUILTIN_PROFILES[profile], load_csr(csr), days)
    return build_leaf(ca.key, ca.cert, plan, random_serial(), URLS)


def der(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.DER)


# ---- pkilint: every profile, every CA key type, CRL, OCSP --------------------------------


@pytest.mark.parametrize("ca_kind", ["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_ca_certificates_lint_clean(ca_kind: str, tmp_path: Path) -> None:
    soft = make_soft_ca(ca_kind)
    assert pkilint("cert", der(soft.root), tmp_path) == ""
    assert pkilint("cert", der(soft.cert), tmp_path) == ""
    soft.cert.verify_directly_issued_by(soft.root)
    bc = soft.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0


PROFILE_CASES = [
    ("https-server", "ec-p256", ("dns:nas.example.com", "ip:192.168.1.10")),
    ("https-server", "rsa-2048", ("dns:nas.example.com",)),
    ("vpn-server", "ec-p384", ("dns:vpn.example.com",)),
    ("vpn-server", "rsa-3072", ("dns:vpn.example.com", "ip:10.8.0.1")),
    ("vpn-client", "ec-p256", ("email:alice@example.com",)),
    ("vpn-client", "ed25519", ()),
    ("device", "ec-p256", ("dns:dev1.example.com", "uri:https://dev1.example.com/device/1")),
]


@pytest.mark.parametrize(("profile", "kind", "sans"), PROFILE_CASES)
def test_every_profile_lints_clean(
    ca: SoftCA, profile: str, kind: str, sans: tuple[str, ...], tmp_path: Path
) -> None:
    key = make_key(kind)
    cert = issue(ca, profile, make_csr(key, cn="leaf", sans=sans))
    assert pkilint("cert", der(cert), tmp_path) == ""
    cert.verify_directly_issued_by(ca.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == list(BUILTIN_PROFILES[profile].extended_key_usages)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert ku.key_encipherment == kind.startswith("rsa")
    assert cert.serial_number.bit_length() <= 128 and cert.serial_number > 0
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier(URLS.crl)]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert {a.access_location.value for a in aia} == {URLS.ocsp, URLS.ca_issuers}


def test_empty_subject_makes_san_critical(ca: SoftCA, tmp_path: Path) -> None:
    cert = issue(ca, "https-server", make_csr(make_key("ec-p256"), cn="", sans=("dns:a.example",)))
    ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert ext.critical
    assert pkilint("cert", der(cert), tmp_path) == ""


def test_pkilint_does_find_problems(ca: SoftCA, tmp_path: Path) -> None:
    """The lint helper is not vacuous: a leaf without AKI and with an EC keyEncipherment fails."""
    key = make_key("ec-p256")
    now = datetime.datetime.now(datetime.UTC)
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(False, False, True, False, False, False, False, False, False), True
        )
        .sign(ca.key, hashes.SHA256())
    )
    assert pkilint("cert", der(bad), tmp_path) != ""


def _documents(ca: SoftCA) -> dict[str, bytes]:
    """One real, lint-clean document of each kind the helper reads."""
    leaf = issue(ca, "https-server", make_csr(make_key("ec-p256")))
    query = parse_request(_ocsp_request(leaf, ca.cert, None), ca.cert)
    return {
        "cert": der(leaf),
        "crl": der(build_crl(ca.key, ca.cert, [], crl_number=1)),
        "ocsp": build_response(ca.key, ca.cert, query, CertState()),
    }


@pytest.mark.parametrize("kind", ["cert", "crl", "ocsp"])
def test_pkilint_refuses_what_it_cannot_load(ca: SoftCA, kind: str, tmp_path: Path) -> None:
    """A document pkilint cannot read is never reported clean: garbage, a DER prefix
    with nothing sensible in it, a real document cut short or with bytes appended, and
    a real document of another kind all raise. The real document itself lints clean,
    so the refusals are about loading, not about the helper."""
    docs = _documents(ca)
    assert pkilint(kind, docs[kind], tmp_path) == ""
    other = docs["crl" if kind != "crl" else "cert"]
    for bad in (
        b"garbage bytes, not DER at all",
        b"\x30\x03\x02\x01\x01",
        docs[kind][:-7],
        docs[kind] + b"trailing",
        other,
    ):
        with pytest.raises(PkilintLoadError):
            pkilint(kind, bad, tmp_path)


def test_crl_lints_clean_and_lists_revocations(ca: SoftCA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    revs = [
        Revocation(random_serial(), now, ca_pb2.REVOCATION_REASON_KEY_COMPROMISE),
        Revocation(random_serial(), now, ca_pb2.REVOCATION_REASON_UNSPECIFIED),
    ]
    crl = build_crl(ca.key, ca.cert, revs, crl_number=7)
    assert pkilint("crl", der(crl), tmp_path) == ""
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    entry = crl.get_revoked_certificate_by_serial_number(revs[0].serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    unspecified = crl.get_revoked_certificate_by_serial_number(revs[1].serial)
    assert unspecified is not None and len(unspecified.extensions) == 0
    empty = build_crl(ca.key, ca.cert, [], crl_number=8)
    assert pkilint("crl", der(empty), tmp_path) == ""


def _ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("state", ["good", "revoked", "unknown"])
def test_ocsp_responses(ca: SoftCA, state: str, tmp_path: Path) -> None:
    leaf = issue(ca, "https-server", make_csr(make_key("ec-p256")))
    query = parse_request(_ocsp_request(leaf, ca.cert, b"0123456789abcdef"), ca.cert)
    assert query.serial == leaf.serial_number
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert_state = {
        "good": CertState(),
        "revoked": CertState(now, ca_pb2.REVOCATION_REASON_SUPERSEDED),
        "unknown": None,
    }[state]
    raw = build_response(ca.key, ca.cert, query, cert_state)
    assert pkilint("ocsp", raw, tmp_path) == ""
    resp = ocsp.load_der_ocsp_response(raw)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert (
        resp.certificate_status
        == {
            "good": ocsp.OCSPCertStatus.GOOD,
            "revoked": ocsp.OCSPCertStatus.REVOKED,
            "unknown": ocsp.OCSPCertStatus.UNKNOWN,
        }[state]
    )
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == (
        b"0123456789abcdef"
    )
    if state == "revoked":
        assert resp.revocation_reason == x509.ReasonFlags.superseded
    ca_public = ca.cert.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    ca_public.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


def _single(raw: bytes) -> tuple[object, ...]:
    """Everything of a response but its signature and producedAt (the signing time)."""
    resp = ocsp.load_der_ocsp_response(raw)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return (
        resp.serial_number,
        resp.hash_algorithm.name,
        resp.issuer_name_hash,
        resp.issuer_key_hash,
        resp.certificate_status,
        resp.this_update_utc,
        resp.next_update_utc,
        resp.revocation_time_utc,
        resp.revocation_reason,
        resp.responder_key_hash,
        resp.responder_name,
        [c.serial_number for c in resp.certificates],
        [(e.oid, e.critical, e.value) for e in resp.extensions],
    )


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256()], ids=["sha1", "sha256"])  # noqa: S303
@pytest.mark.parametrize("state", ["good", "revoked", "unknown"])
def test_ocsp_without_add_response_by_hash_answers_the_same(
    ca: SoftCA,
    state: str,
    algorithm: hashes.HashAlgorithm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The board's cryptography (42.0.5) has no add_response_by_hash: build_response
    then adds the response from a stand-in certificate. Its answer must be the one the
    by-hash path gives, field by field, lint clean and signed by the CA."""
    leaf = issue(ca, "https-server", make_csr(make_key("ec-p256")))
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.cert, algorithm)
    request = request.add_extension(x509.OCSPNonce(b"fedcba9876543210"), critical=False)
    der_request = request.build().public_bytes(serialization.Encoding.DER)
    query = parse_request(der_request, ca.cert)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert_state = {
        "good": CertState(),
        "revoked": CertState(now, ca_pb2.REVOCATION_REASON_KEY_COMPROMISE),
        "unknown": None,
    }[state]
    # Where cryptography has it (the lock's), the by-hash answer to compare with.
    by_hash = (
        build_response(ca.key, ca.cert, query, cert_state, now=now) if ocsp_mod._BY_HASH else None
    )
    monkeypatch.setattr(ocsp_mod, "_BY_HASH", False)
    fallback = build_response(ca.key, ca.cert, query, cert_state, now=now)
    assert pkilint("ocsp", fallback, tmp_path) == ""
    resp = ocsp.load_der_ocsp_response(fallback)
    assert resp.serial_number == leaf.serial_number
    assert resp.issuer_name_hash == query.issuer_name_hash
    assert resp.issuer_key_hash == query.issuer_key_hash
    ca_public = ca.cert.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    ca_public.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    if by_hash is not None:
        assert _single(fallback) == _single(by_hash)


@pytest.mark.parametrize("serial", [0, -5, 2**160], ids=["zero", "negative", "21_octets"])
def test_ocsp_without_add_response_by_hash_refuses_a_serial_no_certificate_has(
    ca: SoftCA, serial: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No certificate can carry such a serial, so the stand-in cannot either: the
    answer is malformedRequest rather than a crash of the CA service."""
    monkeypatch.setattr(ocsp_mod, "_BY_HASH", False)
    query = ocsp_mod.query_for(ca.cert, serial, hashes.SHA256())
    raw = build_response(ca.key, ca.cert, query, None)
    resp = ocsp.load_der_ocsp_response(raw)
    assert resp.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_ocsp_refuses_other_issuer_and_garbage(ca: SoftCA) -> None:
    other = make_soft_ca()
    leaf = build_leaf(
        other.key,
        other.cert,
        plan_from_csr(BUILTIN_PROFILES["device"], load_csr(make_csr(make_key("ec-p256")))),
        random_serial(),
    )
    with pytest.raises(BadOCSPRequest) as exc:
        parse_request(_ocsp_request(leaf, other.cert, None), ca.cert)
    assert exc.value.status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    with pytest.raises(BadOCSPRequest) as exc:
        parse_request(b"\x30\x03garbage", ca.cert)
    assert exc.value.status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


# ---- refusals: each a typed error with a stable reason -----------------------------------


def _reason(exc: pytest.ExceptionInfo[InvalidArgument]) -> str:
    return exc.value.reason


def test_malformed_csr() -> None:
    for data in (
        b"",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x82garbage",
    ):
        with pytest.raises(InvalidArgument) as exc:
            load_csr(data)
        assert _reason(exc) in {"csr.malformed", "csr.missing"}


def test_csr_bad_signature() -> None:
    good = x509.load_pem_x509_csr(make_csr(make_key("ec-p256")))
    raw = bytearray(good.public_bytes(serialization.Encoding.DER))
    # Flip a bit inside the subject's CN ("nas.example.com"): the structure stays valid.
    at = raw.index(b"nas.example.com")
    raw[at] ^= 0x01
    with pytest.raises(InvalidArgument) as exc:
        load_csr(bytes(raw))
    assert _reason(exc) == "csr.bad_signature"


def _plan(profile: str, csr: bytes, days: int = 0) -> None:
    plan_from_csr(BUILTIN_PROFILES[profile], load_csr(csr), days)


@pytest.mark.parametrize(
    ("profile", "kind", "sans", "extensions", "reason"),
    [
        (
            "device",
            "ec-p256",
            ("dns:a.example",),
            [(x509.BasicConstraints(ca=True, path_length=None), True)],
            "csr.ca_requested",
        ),
        ("device", "rsa-1024", ("dns:a.example",), [], "csr.weak_key"),
        ("device", "ec-p521", ("dns:a.example",), [], "csr.curve_not_allowed"),
        ("device", "ec-k256", ("dns:a.example",), [], "csr.curve_not_allowed"),
        ("https-server", "ed25519", ("dns:a.example",), [], "csr.ed25519_not_allowed"),
        ("https-server", "ec-p256", (), [], "csr.san_required"),
        ("https-server", "ec-p256", ("email:a@b.example",), [], "csr.san_not_allowed"),
        ("https-server", "ec-p256", ("dns:Bad_Name.example",), [], "csr.san_invalid"),
        ("https-server", "ec-p256", ("dns:nas",), [], "csr.san_invalid"),
        ("https-server", "ec-p256", ("dns:*.example.com",), [], "csr.wildcard_not_allowed"),
        ("device", "ec-p256", ("uri:spiffe://example.com/x",), [], "csr.san_not_allowed"),
        ("vpn-client", "ec-p256", ("ip:10.0.0.1",), [], "csr.san_not_allowed"),
        (
            "device",
            "ec-p256",
            ("dns:a.example",),
            [
                (
                    x509.UnrecognizedExtension(
                        x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
                    ),
                    True,
                )
            ],
            "csr.unknown_critical_extension",
        ),
    ],
)
def test_profile_refusals(
    profile: str,
    kind: str,
    sans: tuple[str, ...],
    extensions: list[tuple[x509.ExtensionType, bool]],
    reason: str,
) -> None:
    csr = make_csr(make_key(kind), sans=sans, extensions=extensions)
    with pytest.raises(InvalidArgument) as exc:
        _plan(profile, csr)
    assert _reason(exc) == reason


def test_a_profile_cannot_issue_spiffe_ids() -> None:
    """The SPIFFE bundle trusts the mini-CA's root, so a spiffe:// URI SAN from any
    profile would be an X.509-SVID no SPIFFE entry granted: refused even where an
    operator's profile allows it (any case of the scheme), while its https URIs go."""
    profiles = parse_profiles(
        '[profiles.svc]\nextends = "device"\n[profiles.svc.sans]\n'
        'dns = ["*"]\nuri = ["spiffe://*", "https://*"]\n'
    )
    for uri in ("uri:spiffe://home.arpa/backup", "uri:SPIFFE://home.arpa/backup"):
        csr = make_csr(make_key("ec-p256"), sans=(uri,))
        with pytest.raises(InvalidArgument) as exc:
            plan_from_csr(profiles["svc"], load_csr(csr), 0)
        assert _reason(exc) == "csr.san_spiffe_reserved"
    fine = make_csr(make_key("ec-p256"), sans=("uri:https://nas.home.arpa/x",))
    plan_from_csr(profiles["svc"], load_csr(fine), 0)


def test_duplicate_extension_in_csr() -> None:
    """cryptography will not build one, so splice a second SAN extension into the DER."""
    from tests.ca.asn1 import csr_with_duplicate_san

    with pytest.raises(InvalidArgument) as exc:
        _plan("device", csr_with_duplicate_san())
    assert _reason(exc) == "csr.duplicate_extension"


def test_validity_limits(ca: SoftCA) -> None:
    csr = make_csr(make_key("ec-p256"))
    with pytest.raises(InvalidArgument) as exc:
        _plan("https-server", csr, 399)
    assert _reason(exc) == "cert.validity_exceeds_profile"
    cert = issue(ca, "https-server", csr, 398)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=398)
    short = make_soft_ca()
    # An issuing CA that ends sooner than the leaf would: refused, not truncated.
    short_cert = x509.load_der_x509_certificate(der(short.cert))
    plan = plan_from_csr(BUILTIN_PROFILES["device"], load_csr(csr), 825)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1200)
    with pytest.raises(FailedPrecondition) as fexc:
        build_leaf(short.key, short_cert, plan, random_serial(), now=later)
    assert fexc.value.reason == "cert.validity_exceeds_issuer"


def test_unknown_profile() -> None:
    with pytest.raises(InvalidArgument) as exc:
        get_profile(dict(BUILTIN_PROFILES), "nope")
    assert _reason(exc) == "profile.unknown"


# ---- TOML custom profiles ----------------------------------------------------------------

TOML = """
[profiles.lan-web]
extends = "https-server"
description = "only names under home.arpa and the LAN"
max_validity_days = 90
key_types = ["ec-p256"]
[profiles.lan-web.sans]
dns = [".home.arpa"]
ip = ["192.168.0.0/16"]

[profiles.ike]
allow_wildcards = true
extended_key_usages = ["serverAuth", "ipsecIKE", "1.3.6.1.5.5.8.2.2"]
key_types = ["ec-p384", "ed25519"]
key_agreement = true
san_required = true
[profiles.ike.sans]
dns = ["*.vpn.example.com"]
"""


def test_toml_profiles(ca: SoftCA, tmp_path: Path) -> None:
    profiles = parse_profiles(TOML)
    assert {"https-server", "vpn-server", "vpn-client", "device", "lan-web", "ike"} <= set(profiles)
    lan = profiles["lan-web"]
    assert lan.max_validity_days == 90 and lan.key_types == frozenset({"ec-p256"})
    ok = plan_from_csr(
        lan, load_csr(make_csr(make_key("ec-p256"), sans=("dns:nas.home.arpa", "ip:192.168.1.2")))
    )
    cert = build_leaf(ca.key, ca.cert, ok, random_serial(), URLS)
    assert pkilint("cert", der(cert), tmp_path) == ""
    for sans, reason in [
        (("dns:nas.example.com",), "csr.san_not_allowed"),
        (("dns:home.arpa",), "csr.san_not_allowed"),
        (("ip:10.0.0.1",), "csr.san_not_allowed"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            plan_from_csr(lan, load_csr(make_csr(make_key("ec-p256"), sans=sans)))
        assert _reason(exc) == reason
    with pytest.raises(InvalidArgument) as exc:
        plan_from_csr(lan, load_csr(make_csr(make_key("ec-p256"), sans=("dns:a.home.arpa",))), 91)
    assert _reason(exc) == "cert.validity_exceeds_profile"
    ike = profiles["ike"]
    cert = build_leaf(
        ca.key,
        ca.cert,
        plan_from_csr(
            ike, load_csr(make_csr(make_key("ec-p384"), sans=("dns:gw.vpn.example.com",)))
        ),
        random_serial(),
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_agreement
    assert pkilint("cert", der(cert), tmp_path) == ""
    with pytest.raises(InvalidArgument) as exc:
        plan_from_csr(
            ike, load_csr(make_csr(make_key("ec-p384"), sans=("dns:a.b.vpn.example.com",)))
        )
    assert _reason(exc) == "csr.san_not_allowed"
    wild = plan_from_csr(
        ike, load_csr(make_csr(make_key("ec-p384"), sans=("dns:*.vpn.example.com",)))
    )
    assert wild.san_list == ["dns:*.vpn.example.com"]


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        "[profiles.x]\nkey_types = ['rsa-1024']\nextended_key_usages=['serverAuth']",
        "[profiles.x]\nextended_key_usages=['nonsense']",
        "[profiles.x]\nextends='https-server'\nmax_validity_days=0",
        "[profiles.x]\nextends='nope'",
        "[profiles.x]\nextends='device'\ncolour='red'",
        "[profiles.x]\nextends='device'\nallow_wildcards='yes'",
        "[profiles.x]\nextends='device'\n[profiles.x.sans]\nip=['not-a-net']",
    ],
)
def test_bad_toml_profiles(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_profiles(text)
    assert exc.value.reason in {"profile.invalid", "profile.toml_invalid"}
