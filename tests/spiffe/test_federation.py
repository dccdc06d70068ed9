"""Federation against the real stack: our trust domain's bundle endpoint serves the
SPIFFE bundle format; `kmsctl spiffe federate` reads a foreign domain's bundle from its
endpoint over HTTPS (a stand-in for a SPIRE server, made here: its own root, its own JWT
key, its own TLS certificate), and workloads then receive it as a federated bundle and
can validate the foreign domain's JWT-SVIDs; bad URLs, unreachable or untrusted
endpoints and malformed bundles are refused with nothing stored."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from edgekms import spiffe as sp
from tests.spiffe.conftest import (
    TRUST_DOMAIN,
    Agent,
    SpiffeStack,
    read_json_line,
    wait_for,
    workload,
    workload_process,
)

FOREIGN = "other.example"


def _self_signed(
    key: ec.EllipticCurvePrivateKey, cn: str, ca: bool, ip: str = ""
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
        )
    return builder.sign(key, hashes.SHA256())


@dataclass
class Foreign:
    url: str
    tls_ca: Path
    jwt_key: ec.EllipticCurvePrivateKey
    kid: str
    root: x509.Certificate
    documents: dict[str, bytes]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Foreign]:
    """other.example's bundle endpoint: HTTPS on a loopback port, /bundle serving its
    bundle, /junk something that is not one."""
    where = tmp_path_factory.mktemp("foreign")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _self_signed(root_key, "other.example root", ca=True)
    jwt_key = ec.generate_private_key(ec.SECP256R1())
    kid = sp.jwt_kid(jwt_key.public_key())
    x = root.public_key()
    assert isinstance(x, ec.EllipticCurvePublicKey)
    bundle = {
        "keys": [
            {
                **sp.jwk_of(x, "", "x509-svid"),
                "x5c": [base64.b64encode(root.public_bytes(serialization.Encoding.DER)).decode()],
            },
            sp.jwk_of(jwt_key.public_key(), kid, "jwt-svid"),
        ],
        "spiffe_sequence": 7,
        "spiffe_refresh_hint": 60,
    }
    documents = {"/bundle": json.dumps(bundle).encode(), "/junk": b'{"hello": "world"}'}
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_cert = _self_signed(tls_key, "127.0.0.1", ca=False, ip="127.0.0.1")
    (where / "tls.pem").write_bytes(tls_cert.public_bytes(serialization.Encoding.PEM))
    (where / "tls.key").write_bytes(
        tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = documents.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(where / "tls.pem", where / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Foreign(
            f"https://127.0.0.1:{server.server_address[1]}",
            where / "tls.pem",
            jwt_key,
            kid,
            root,
            documents,
        )
    finally:
        server.shutdown()
        server.server_close()


def test_our_bundle_endpoint_serves_the_spiffe_bundle_format(spiffe_stack: SpiffeStack) -> None:
    with urllib.request.urlopen(f"{spiffe_stack.stack.ca_url}/spiffe/bundle", timeout=30) as r:  # noqa: S310 - the test's own loopback URL
        body = json.loads(r.read())
    uses = sorted(k["use"] for k in body["keys"])
    assert uses == ["jwt-svid", "x509-svid"]
    x509_key = next(k for k in body["keys"] if k["use"] == "x509-svid")
    root = x509.load_der_x509_certificate(base64.b64decode(x509_key["x5c"][0]))
    with spiffe_stack.stack.client() as admin:
        ours = admin.spiffe_bundle()
    assert root.public_bytes(serialization.Encoding.DER) == ours.x509_authorities_der[0]
    assert x509_key["kty"] == "EC" and x509_key["crv"] == "P-256"
    jwt = next(k for k in body["keys"] if k["use"] == "jwt-svid")
    assert jwt["kid"] and jwt["kty"] == "EC"
    assert isinstance(body["spiffe_sequence"], int) and body["spiffe_sequence"] >= 1
    assert body["spiffe_refresh_hint"] > 0


def test_a_federated_bundle_reaches_the_workloads(
    spiffe_stack: SpiffeStack, agent: Agent, foreign: Foreign
) -> None:
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/federated-user", "unix:uid:1061")
    wait_for(lambda: "svids" in workload(agent.socket, 1061, 1061, "x509"), 60, "an SVID")
    # A stream open before the federation: the new bundle is pushed on it.
    stream = workload_process(agent.socket, 1061, 1061, "stream", "2")
    before = read_json_line(stream)
    assert f"spiffe://{FOREIGN}" not in before["bundles"]
    made = json.loads(
        spiffe_stack.kmsctl(
            "spiffe", "federate", "--trust-domain", FOREIGN, "--bundle-url",
            f"{foreign.url}/bundle", "--endpoint-ca", str(foreign.tls_ca), "-o", "json",
        ).stdout
    )  # fmt: skip
    assert made == {
        "trust_domain": FOREIGN,
        "bundle_url": f"{foreign.url}/bundle",
        "endpoint_profile": "https_web",
        "endpoint_spiffe_id": "",
        "x509_authorities": 1,
        "jwt_keys": 1,
        "sequence": 7,
        "refresh_hint_seconds": 60,
    }
    try:
        pushed = read_json_line(stream, timeout=60)
        assert f"spiffe://{FOREIGN}" in pushed["bundles"], pushed
        assert pushed["svids"] == before["svids"]  # same SVID: only the bundles changed
    finally:
        stream.kill()
        stream.wait()
    answer = wait_for(
        lambda: (a := workload(agent.socket, 1061, 1061, "x509")).get("bundles") and a,
        60,
        "the federated bundle at the workload",
    )
    assert f"spiffe://{FOREIGN}" in answer["bundles"]
    bundles = workload(agent.socket, 1061, 1061, "bundles")["bundles"]
    assert bundles[f"spiffe://{TRUST_DOMAIN}"] == 1 and bundles[f"spiffe://{FOREIGN}"] == 1
    # A JWT-SVID of the foreign domain, signed with its key, validates here.
    now = int(time.time())
    claims = {"sub": f"spiffe://{FOREIGN}/client", "aud": ["nas-api"], "exp": now + 60, "iat": now}
    signing_input = sp.jwt_signing_input({"alg": "ES256", "kid": foreign.kid, "typ": "JWT"}, claims)
    signature = sp.der_to_jose(foreign.jwt_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    token = f"{signing_input.decode()}.{sp.b64url(signature)}"
    valid = workload(agent.socket, 1061, 1061, "validate", "nas-api", token)
    assert valid == {"spiffe_id": f"spiffe://{FOREIGN}/client", "sub": f"spiffe://{FOREIGN}/client"}


def test_federation_refuses_bad_urls_endpoints_and_bundles(
    spiffe_stack: SpiffeStack, foreign: Foreign
) -> None:
    def federate(td: str, url: str, *extra: str) -> tuple[int, str]:
        done = spiffe_stack.kmsctl(
            "spiffe", "federate", "--trust-domain", td, "--bundle-url", url, *extra, check=False
        )
        return done.returncode, done.stderr

    ca = ("--endpoint-ca", str(foreign.tls_ca))
    code, err = federate("third.example", "http://127.0.0.1:1/bundle", *ca)
    assert code == 3 and err.startswith("kmsctl: spiffe.bundle_url_invalid:"), err
    code, err = federate("third.example", f"{foreign.url}/bundle")  # TLS not trusted
    assert code == 6 and err.startswith("kmsctl: spiffe.bundle_unreachable:"), err
    code, err = federate("third.example", f"{foreign.url}/junk", *ca)
    assert code == 3 and err.startswith("kmsctl: spiffe.bundle_invalid:"), err
    code, err = federate(TRUST_DOMAIN, f"{foreign.url}/bundle", *ca)
    assert code == 3 and err.startswith("kmsctl: spiffe.trust_domain_own:"), err
    with spiffe_stack.stack.client() as admin:
        assert "third.example" not in {f.trust_domain for f in admin.spiffe_bundle().federated}


def test_a_federated_bundle_is_read_again_at_its_refresh_hint(
    spiffe_stack: SpiffeStack, foreign: Foreign
) -> None:
    """fast.example says spiffe_refresh_hint 10: a changed bundle (new root, sequence 2)
    replaces the stored one once the hint has passed, without another `federate`."""
    old = json.loads(foreign.documents["/bundle"])
    foreign.documents["/fast"] = json.dumps(
        {**old, "spiffe_sequence": 1, "spiffe_refresh_hint": 10}
    ).encode()
    spiffe_stack.kmsctl(
        "spiffe", "federate", "--trust-domain", "fast.example", "--bundle-url",
        f"{foreign.url}/fast", "--endpoint-ca", str(foreign.tls_ca),
    )  # fmt: skip
    new_root = _self_signed(ec.generate_private_key(ec.SECP256R1()), "fast root 2", ca=True)
    new_der = new_root.public_bytes(serialization.Encoding.DER)
    public = new_root.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    keys = [{**sp.jwk_of(public, "", "x509-svid"), "x5c": [base64.b64encode(new_der).decode()]}]
    foreign.documents["/fast"] = json.dumps(
        {"keys": keys, "spiffe_sequence": 2, "spiffe_refresh_hint": 10}
    ).encode()

    def refreshed() -> bool:
        with spiffe_stack.stack.client() as admin:
            fast = [f for f in admin.spiffe_bundle().federated if f.trust_domain == "fast.example"]
        return bool(fast) and list(fast[0].x509_authorities_der) == [new_der]

    wait_for(refreshed, 90, "fast.example's new bundle")


def test_unfederate_takes_the_foreign_bundle_off_the_open_streams(
    spiffe_stack: SpiffeStack, agent: Agent, foreign: Foreign
) -> None:
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/unfederated-user", "unix:uid:1091")
    spiffe_stack.kmsctl(
        "spiffe", "federate", "--trust-domain", "gone.example", "--bundle-url",
        f"{foreign.url}/bundle", "--endpoint-ca", str(foreign.tls_ca),
    )  # fmt: skip
    wait_for(
        lambda: (
            "spiffe://gone.example" in workload(agent.socket, 1091, 1091, "x509").get("bundles", [])
        ),
        60,
        "gone.example's bundle at the workload",
    )
    stream = workload_process(agent.socket, 1091, 1091, "stream", "5")
    jwks = workload_process(agent.socket, 1091, 1091, "jwtbundles", "5")
    try:
        assert "spiffe://gone.example" in read_json_line(stream)["bundles"]
        assert "spiffe://gone.example" in read_json_line(jwks)["kids"]
        gone = json.loads(
            spiffe_stack.kmsctl(
                "spiffe", "unfederate", "--trust-domain", "gone.example", "-o", "json"
            ).stdout
        )
        assert gone == {"trust_domain": "gone.example", "bundle_url": f"{foreign.url}/bundle"}
        pushed = read_json_line(stream, timeout=60)
        assert "spiffe://gone.example" not in pushed["bundles"], pushed
        assert f"spiffe://{TRUST_DOMAIN}/unfederated-user" in [
            s["spiffe_id"] for s in pushed["svids"]
        ]
        assert "spiffe://gone.example" not in read_json_line(jwks, timeout=60)["kids"]
    finally:
        for proc in (stream, jwks):
            proc.kill()
            proc.wait()
    with spiffe_stack.stack.client() as admin:
        assert "gone.example" not in {f.trust_domain for f in admin.spiffe_bundle().federated}
    again = spiffe_stack.kmsctl(
        "spiffe", "unfederate", "--trust-domain", "gone.example", check=False
    )
    assert again.returncode == 4, again.stderr
    assert again.stderr.startswith("kmsctl: spiffe.federation_not_found:"), again.stderr
    bad = spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", "Bad:Name", check=False)
    assert bad.returncode == 3 and "spiffe.trust_domain_invalid" in bad.stderr, bad.stderr


def test_a_spire_domain_signing_jwts_with_rsa_is_validated(
    spiffe_stack: SpiffeStack, agent: Agent, foreign: Foreign
) -> None:
    """A SPIRE server may publish an RSA JWT key (jwt_key_type rsa-2048): its RS256 and
    PS256 JWT-SVIDs validate through ValidateJWTSVID once federated, and an ES256 token
    naming that RSA key does not."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = rsa_key.public_key().public_numbers()
    jwk = {
        "kty": "RSA", "use": "jwt-svid", "kid": "spire-rsa-1",
        "n": sp.b64url(numbers.n.to_bytes(256, "big")), "e": sp.b64url(b"\x01\x00\x01"),
    }  # fmt: skip
    x = foreign.root.public_key()
    assert isinstance(x, ec.EllipticCurvePublicKey)
    root_der = foreign.root.public_bytes(serialization.Encoding.DER)
    x509_key = {**sp.jwk_of(x, "", "x509-svid"), "x5c": [base64.b64encode(root_der).decode()]}
    del x509_key["kid"]
    foreign.documents["/bundle-rsa"] = json.dumps(
        {"keys": [x509_key, jwk], "spiffe_sequence": 1, "spiffe_refresh_hint": 300}
    ).encode()
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/rsa-validator", "unix:uid:1093")
    spiffe_stack.kmsctl(
        "spiffe", "federate", "--trust-domain", "spire.example", "--bundle-url",
        f"{foreign.url}/bundle-rsa", "--endpoint-ca", str(foreign.tls_ca),
    )  # fmt: skip
    try:
        now = int(time.time())
        claims = {"sub": "spiffe://spire.example/db", "aud": ["nas-api"], "exp": now + 120}

        def token(alg: str, pad: padding.AsymmetricPadding) -> str:
            head = sp.jwt_signing_input({"alg": alg, "kid": "spire-rsa-1", "typ": "JWT"}, claims)
            return f"{head.decode()}.{sp.b64url(rsa_key.sign(head, pad, hashes.SHA256()))}"

        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        rs256 = token("RS256", padding.PKCS1v15())
        valid = wait_for(
            lambda: (
                (a := workload(agent.socket, 1093, 1093, "validate", "nas-api", rs256)).get(
                    "spiffe_id"
                )
                and a
            ),
            60,
            "spire.example's JWT keys at the agent",
        )
        assert valid == {
            "spiffe_id": "spiffe://spire.example/db",
            "sub": "spiffe://spire.example/db",
        }
        ps256 = workload(agent.socket, 1093, 1093, "validate", "nas-api", token("PS256", pss))
        assert ps256.get("spiffe_id") == "spiffe://spire.example/db", ps256
        head = sp.jwt_signing_input({"alg": "ES256", "kid": "spire-rsa-1"}, claims).decode()
        confused = workload(
            agent.socket, 1093, 1093, "validate", "nas-api", f"{head}.{sp.b64url(bytes(64))}"
        )
        assert confused["error"] == "INVALID_ARGUMENT", confused
        assert "jwt.key_unsupported" in confused["details"], confused
    finally:
        spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", "spire.example")


def test_our_bundle_endpoint_over_https_federates_another_stack(
    spiffe_stack: SpiffeStack, tmp_path: Path
) -> None:
    """The https_web profile: /spiffe/bundle on the CA's HTTPS (ACME) listener, with the
    mini-CA's server certificate. `kmsctl spiffe federate` reads it over HTTPS, checking
    that certificate against --endpoint-ca (our root), as a second trust domain would;
    here the same stack trusts itself under another name (mirror.example)."""
    root_pem = tmp_path / "root.pem"
    spiffe_stack.kmsctl("spiffe", "bundle", "--out", str(root_pem))
    url = f"{spiffe_stack.https_url}/spiffe/bundle"
    context = ssl.create_default_context(cafile=str(root_pem))

    def read() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as r:  # noqa: S310 - the test's own loopback URL
                return dict(json.loads(r.read()))
        except OSError:
            return None  # the ACME listener starts once the CA has issued its certificate

    body = wait_for(read, 90, "the bundle endpoint over HTTPS")
    assert sorted(k["use"] for k in body["keys"]) == ["jwt-svid", "x509-svid"]
    # Not trusted without the endpoint's CA: the certificate is checked, not just TLS.
    untrusted = spiffe_stack.kmsctl(
        "spiffe", "federate", "--trust-domain", "mirror.example", "--bundle-url", url,
        check=False,
    )  # fmt: skip
    assert untrusted.returncode == 6, untrusted.stderr
    assert untrusted.stderr.startswith("kmsctl: spiffe.bundle_unreachable:"), untrusted.stderr
    made = json.loads(
        spiffe_stack.kmsctl(
            "spiffe", "federate", "--trust-domain", "mirror.example", "--bundle-url", url,
            "--endpoint-ca", str(root_pem), "-o", "json",
        ).stdout
    )  # fmt: skip
    assert made["trust_domain"] == "mirror.example" and made["x509_authorities"] == 1
    with spiffe_stack.stack.client() as admin:
        ours = admin.spiffe_bundle()
    mirror = next(f for f in ours.federated if f.trust_domain == "mirror.example")
    assert list(mirror.x509_authorities_der) == list(ours.x509_authorities_der)
    ours_kids = {k["kid"] for k in json.loads(ours.jwks)["keys"]}
    assert {k["kid"] for k in json.loads(mirror.jwks)["keys"]} == ours_kids
    spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", "mirror.example")
