"""A small ACME (RFC 8555) client on http.client and cryptography: what `make bench`
drives the CA's ACME server with, and what the tests use to send the requests a real
client never would (a reused nonce, a JWS for another URL, a CSR for other names).

Synchronous on purpose: each call is one HTTPS request on a fresh connection (the server
closes after every answer), run from threads by the bench for requests in flight.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

AccountKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: AccountKey) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        nums = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = "P-256" if key.curve.key_size == 256 else "P-384"
        x, y = nums.x.to_bytes(size, "big"), nums.y.to_bytes(size, "big")
        return {"crv": crv, "kty": "EC", "x": b64(x), "y": b64(y)}
    rnums = key.public_key().public_numbers()
    e = rnums.e.to_bytes((rnums.e.bit_length() + 7) // 8, "big")
    return {"e": b64(e), "kty": "RSA", "n": b64(rnums.n.to_bytes(key.key_size // 8, "big"))}


def thumbprint(key: AccountKey) -> str:
    canon = json.dumps(jwk(key), sort_keys=True, separators=(",", ":")).encode()
    return b64(hashlib.sha256(canon).digest())


def alg_of(key: AccountKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return "ES256" if key.curve.key_size == 256 else "ES384"


def sign(key: AccountKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    digest: hashes.HashAlgorithm = hashes.SHA256() if key.curve.key_size == 256 else hashes.SHA384()
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def jws(key: AccountKey, protected: dict[str, Any], payload: Any) -> dict[str, str]:
    """A flattened JWS; payload None is POST-as-GET (empty payload)."""
    p64 = b64(json.dumps(protected).encode())
    body64 = "" if payload is None else b64(json.dumps(payload).encode())
    signature = sign(key, f"{p64}.{body64}".encode())
    return {"protected": p64, "payload": body64, "signature": b64(signature)}


def csr_for(names: list[str], key: Any = None) -> tuple[bytes, Any]:
    """(DER CSR, its key) naming `names` as SANs (DNS or IP), CN the first."""
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER), key


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def problem_type(self) -> str:
        if not self.headers.get("content-type", "").startswith("application/problem+json"):
            return ""
        value = self.json()
        return str(value.get("type", "")) if isinstance(value, dict) else ""


class AcmeError(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(f"{answer.status} {answer.body[:300]!r}")
        self.answer = answer


@dataclass
class AcmeClient:
    directory_url: str
    cafile: str
    key: AccountKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    kid: str = ""
    directory: dict[str, Any] = field(default_factory=dict)
    nonce: str = ""
    timeout: float = 30.0
    # Between looks at a pending order or challenge. certbot and lego wait about a
    # second; 0.2 s keeps the bench's own polling from being most of the CA's load.
    poll_interval: float = 0.2

    def __post_init__(self) -> None:
        self.context = ssl.create_default_context(cafile=self.cafile)

    def request(self, method: str, url: str, body: bytes = b"", content_type: str = "") -> Answer:
        parts = urlsplit(url)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, context=self.context, timeout=self.timeout
        )
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            conn.request(method, parts.path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()
        if "replay-nonce" in answer.headers:
            self.nonce = answer.headers["replay-nonce"]
        return answer

    def load_directory(self) -> dict[str, Any]:
        self.directory = self.request("GET", self.directory_url).json()
        return self.directory

    def new_nonce(self) -> str:
        if not self.directory:
            self.load_directory()
        self.request("HEAD", self.directory["newNonce"])
        return self.nonce

    def post_raw(
        self,
        url: str,
        payload: Any,
        *,
        protected: dict[str, Any] | None = None,
        key: AccountKey | None = None,
        use_jwk: bool = False,
    ) -> Answer:
        """One signed POST; `protected` overrides header fields (bad-input tests)."""
        key = key or self.key
        if not self.nonce:
            self.new_nonce()
        header: dict[str, Any] = {"alg": alg_of(key), "nonce": self.nonce, "url": url}
        if use_jwk or not self.kid:
            header["jwk"] = jwk(key)
        else:
            header["kid"] = self.kid
        header.update(protected or {})
        self.nonce = ""
        body = json.dumps(jws(key, header, payload)).encode()
        return self.request("POST", url, body, "application/jose+json")

    def post(self, url: str, payload: Any, **kw: Any) -> Answer:
        """POST, retrying once on badNonce as every client does; AcmeError if refused."""
        for attempt in range(3):
            answer = self.post_raw(url, payload, **kw)
            if answer.problem_type.endswith(":badNonce") and attempt < 2:
                continue
            if answer.status >= 400:
                raise AcmeError(answer)
            return answer
        raise AssertionError("unreachable")

    def register(self, **fields: Any) -> Answer:
        if not self.directory:
            self.load_directory()
        answer = self.post(
            self.directory["newAccount"], {"termsOfServiceAgreed": True, **fields}, use_jwk=True
        )
        self.kid = answer.headers["location"]
        return answer

    def new_order(self, names: list[str]) -> tuple[str, dict[str, Any]]:
        idents = [
            {
                "type": "ip" if name.replace(".", "").isdigit() or ":" in name else "dns",
                "value": name,
            }
            for name in names
        ]
        answer = self.post(self.directory["newOrder"], {"identifiers": idents})
        return answer.headers["location"], answer.json()

    def get(self, url: str) -> Answer:
        return self.post(url, None)

    def key_authorization(self, token: str) -> str:
        return f"{token}.{thumbprint(self.key)}"

    def challenges(self, order: dict[str, Any], kind: str = "http-01") -> list[dict[str, Any]]:
        found = []
        for authz_url in order["authorizations"]:
            authz = self.get(authz_url).json()
            found += [c for c in authz["challenges"] if c["type"] == kind]
        return found

    def poll(self, url: str, until: tuple[str, ...], deadline: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + deadline
        while True:
            value: dict[str, Any] = self.get(url).json()
            if value["status"] in until or time.monotonic() > end:
                return value
            time.sleep(self.poll_interval)

    def obtain(
        self,
        names: list[str],
        answer: Any,
        kind: str = "http-01",
    ) -> tuple[str, bytes, Any]:
        """New order → challenges answered by `answer(token, key_authorization)` →
        finalize → certificate. (order URL, PEM chain, certificate key)."""
        order_url, order = self.new_order(names)
        for chall in self.challenges(order, kind):
            answer(chall["token"], self.key_authorization(chall["token"]))
            self.post(chall["url"], {})
        order = self.poll(order_url, ("ready", "invalid"))
        if order["status"] != "ready":
            raise AssertionError(f"order not ready: {order}")
        csr, cert_key = csr_for(names)
        self.post(order["finalize"], {"csr": b64(csr)})
        order = self.poll(order_url, ("valid", "invalid"))
        pem = self.get(order["certificate"]).body
        return order_url, pem, cert_key
