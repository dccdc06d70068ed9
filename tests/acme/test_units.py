"""Pure logic of the ACME server, no parts started: JWS parsing and verification,
thumbprints (RFC 7638's own example), nonce bounds, the name policy, the [acme] table,
the problem documents, the tls-alpn-01 certificate checks."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from bench.acmeclient import b64, jwk
from bench.acmeclient import jws as make_jws
from ca_service.acme import jws
from ca_service.acme.challenges import ACME_IDENTIFIER_OID, check_alpn_certificate
from ca_service.acme.nonces import NoncePool
from ca_service.acme.policy import NamePolicy
from ca_service.acme.problems import (
    AcmeProblem,
    BadNonce,
    Malformed,
    RejectedIdentifier,
    UnsupportedIdentifier,
    from_kms,
)
from ca_service.acme.settings import parse_acme
from ca_service.config import CAConfigError, load_serve_config
from edgekms.errors import InvalidArgument, NotFound


def test_rfc7638_thumbprint_example() -> None:
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5"
        "v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08"
        "qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8a"
        "wapJzKnqDKgw"
    )
    key = jws.load_jwk({"kty": "RSA", "n": n, "e": "AQAB"})
    assert jws.thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["ES256", "ES384", "RS256"],
)
def test_a_signed_jws_verifies_and_a_changed_one_does_not(key: object) -> None:
    signed = make_jws(key, {"alg": _alg(key), "nonce": "n", "url": "u"}, {"a": 1})  # type: ignore[arg-type]
    parsed = jws.parse(json.dumps(signed).encode())
    public = jws.load_jwk(jwk(key))  # type: ignore[arg-type]
    jws.verify(parsed.alg, public, parsed.signing_input, parsed.signature)
    assert parsed.payload_json() == {"a": 1}
    tampered = jws.parse(json.dumps(signed | {"payload": b64(b'{"a":2}')}).encode())
    with pytest.raises(AcmeProblem) as caught:
        jws.verify(tampered.alg, public, tampered.signing_input, tampered.signature)
    assert caught.value.reason == "acme.signature_invalid" and caught.value.http_status == 401


def _alg(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return "ES256" if key.curve.key_size == 256 else "ES384"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "acme.jws_malformed"),
        (b"[]", "acme.jws_malformed"),
        (b'{"protected":"e30","payload":"","signature":"","header":{}}', "acme.jws_malformed"),
        (b'{"protected":"!!","payload":"","signature":""}', "acme.jws_malformed"),
        (b'{"protected":"e30=","payload":"","signature":""}', "acme.jws_malformed"),
    ],
    ids=["not_json", "array", "unprotected_header", "bad_base64", "padded"],
)
def test_malformed_jws_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(AcmeProblem) as caught:
        jws.parse(body)
    assert caught.value.reason == reason and caught.value.acme_type == "malformed"


def test_weak_or_unknown_account_keys_are_refused() -> None:
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 - refused, the point
    with pytest.raises(AcmeProblem) as caught:
        jws.load_jwk(jwk(small))
    assert caught.value.acme_type == "badPublicKey"
    with pytest.raises(AcmeProblem):
        jws.load_jwk({"kty": "OKP", "crv": "Ed25519", "x": "AA"})
    with pytest.raises(AcmeProblem) as unknown:
        jws.verify("HS256", jws.load_jwk(jwk(ec.generate_private_key(ec.SECP256R1()))), b"", b"")
    assert unknown.value.acme_type == "badSignatureAlgorithm"


def test_nonces_are_single_use_and_bounded() -> None:
    pool = NoncePool(capacity=3)
    first = pool.new()
    pool.consume(first)
    with pytest.raises(BadNonce):
        pool.consume(first)
    made = [pool.new() for _ in range(5)]
    assert len(pool) == 3  # the two oldest were forgotten
    with pytest.raises(BadNonce):
        pool.consume(made[0])
    pool.consume(made[-1])
    with pytest.raises(BadNonce):
        pool.consume(None)


def test_expired_nonces_are_refused() -> None:
    pool = NoncePool(lifetime=0.0)
    nonce = pool.new()
    with pytest.raises(BadNonce) as caught:
        pool.consume(nonce)
    assert caught.value.reason in ("acme.nonce_expired", "acme.nonce_unknown")


def test_the_default_name_policy() -> None:
    policy = NamePolicy()
    assert policy.check({"type": "dns", "value": "NAS.Home.Arpa."}) == ("dns", "nas.home.arpa")
    assert policy.check({"type": "dns", "value": "printer.lan"}) == ("dns", "printer.lan")
    assert policy.check({"type": "ip", "value": "192.168.1.10"}) == ("ip", "192.168.1.10")
    assert policy.check({"type": "ip", "value": "fd00::1"}) == ("ip", "fd00::1")
    for bad in ("www.example.com", "lan.example.com", "home.arpa.evil.com"):
        with pytest.raises(RejectedIdentifier):
            policy.check({"type": "dns", "value": bad})
    for bad_ip in ("8.8.8.8", "127.0.0.1", "100.64.0.1"):
        with pytest.raises(RejectedIdentifier):
            policy.check({"type": "ip", "value": bad_ip})
    with pytest.raises(RejectedIdentifier):
        policy.check({"type": "dns", "value": "*.nas.home.arpa"})
    for malformed in ("nas", "bad_name.lan", "-x.lan", ""):
        with pytest.raises(Malformed):
            policy.check({"type": "dns", "value": malformed})
    with pytest.raises(UnsupportedIdentifier):
        policy.check({"type": "email", "value": "a@b.lan"})


def test_a_configured_policy() -> None:
    policy = parse_acme({"allow_dns": ["*.example.internal"], "allow_ip": ["10.1.0.0/16"]}).policy
    assert policy.check({"type": "dns", "value": "a.example.internal"})[1] == "a.example.internal"
    with pytest.raises(RejectedIdentifier):
        policy.check({"type": "dns", "value": "nas.home.arpa"})
    assert policy.to_json() == {"dns": ["*.example.internal"], "ip": ["10.1.0.0/16"]}


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"http01_port": 0}, "http01_port"),
        ({"listen": "nowhere"}, "listen"),
        ({"allow_ip": ["not-a-net"]}, "allow_ip"),
        ({"allow_dns": ["bad domain"]}, "allow_dns"),
        ({"hosts": {"nas.lan": "nas"}}, "hosts"),
        ({"base_url": "http://x"}, "base_url"),
        ({"eab_required": "yes"}, "eab_required"),
        ({"surprise": 1}, "acme.surprise"),
    ],
    ids=["port_0", "listen", "allow_ip", "allow_dns", "hosts", "base_url", "eab", "unknown"],
)
def test_a_bad_acme_table_is_refused_by_the_ca_config(
    tmp_path: Path, table: dict[str, object], problem: str
) -> None:
    lines = ['nats_url = "nats://127.0.0.1:4222"', "[acme]"]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += [f"[acme.{key}]", *(f'"{k}" = {json.dumps(v)}' for k, v in value.items())]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    config = tmp_path / "ca.toml"
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(CAConfigError) as caught:
        load_serve_config(config)
    assert problem in str(caught.value)


def test_a_good_acme_table_is_read(tmp_path: Path) -> None:
    config = tmp_path / "ca.toml"
    config.write_text(
        'nats_url = "nats://127.0.0.1:4222"\n[acme]\nlisten = "0.0.0.0:8555"\n'
        'names = ["ca.home.arpa"]\nhttp01_port = 8080\n[acme.hosts]\n"nas.home.arpa" = "10.0.0.2"\n'
    )
    acme = load_serve_config(config).acme
    assert acme is not None and acme.port == 8555 and acme.http01_port == 8080
    assert acme.directory_url == "https://ca.home.arpa:8555/acme/directory"
    assert acme.hosts == {"nas.home.arpa": "10.0.0.2"} and acme.tlsalpn01_port == 443


def test_other_ca_errors_become_problem_documents() -> None:
    assert from_kms(InvalidArgument("csr.weak_key", "x")).acme_type == "badCSR"
    assert from_kms(InvalidArgument("cert.ttl_invalid", "x")).acme_type == "malformed"
    assert from_kms(NotFound("cert.not_found", "x")).http_status == 404
    doc = json.loads(BadNonce("acme.nonce_unknown", "take a new one").body())
    assert doc == {
        "type": "urn:ietf:params:acme:error:badNonce",
        "detail": "take a new one",
        "status": 400,
    }


def _alpn_cert(name: str, key_authorization: str, critical: bool = True) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme")])
    now = datetime.datetime.now(datetime.UTC)
    value = b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, value), critical=critical)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_tls_alpn_certificate_checks() -> None:
    check_alpn_certificate(_alpn_cert("nas.lan", "tok.thumb"), "nas.lan", "tok.thumb")
    for der, name in (
        (_alpn_cert("nas.lan", "tok.other"), "nas.lan"),
        (_alpn_cert("nas.lan", "tok.thumb", critical=False), "nas.lan"),
        (_alpn_cert("other.lan", "tok.thumb"), "nas.lan"),
    ):
        with pytest.raises(AcmeProblem) as caught:
            check_alpn_certificate(der, name, "tok.thumb")
        assert caught.value.acme_type == "incorrectResponse"
