"""Peer CAs measured beside EdgeKMS issuance in the same run (issue 19 item 3): step-ca
(smallstep 0.19.0 built from Debian's packaged Go source, badger DB, HTTPS, a JWK
provisioner and one one-time token per certificate) and `cfssl serve` with its SQLite
certificate database, both on free loopback ports in a temp dir, fed the same CSRs as
bench/issuance.py at the same concurrency through the same spawned load process.

Both store every certificate before they answer, as EdgeKMS does, so the comparison is
CSR in, stored certificate out. A peer that cannot be built or started here is skipped
with the reason (`Skipped`), never replaced by a number from elsewhere.

Building step-ca: Debian's `golang-github-smallstep-certificates-dev` ships the library
without `cmd/`, so `main.go` comes from Debian's source package of the same version
(fetched with a private apt state; the system's sources stay untouched), minus the blank
imports of four optional cloud back ends whose Go dependencies bookworm lacks; then a
GOPATH-mode build against /usr/share/gocode. The binary is cached (`peer_cache_dir()`),
so only the first `make bench` pays the ~2 min build.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import sqlite3
import ssl
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import RunResult
from mgmt.natsserver import free_port, wait_for_port

STEPCA_VERSION = "0.19.0"
STEPCA_SOURCE = "golang-github-smallstep-certificates"
STEPCA_LIBRARY = Path("/usr/share/gocode/src/github.com/smallstep/certificates")
# Optional back ends registered by blank imports in upstream's main.go; their Go
# dependencies (Google Cloud, Azure, Vault clients) are not packaged in bookworm.
STEPCA_DROPPED_IMPORTS = ("kms/azurekms", "kms/cloudkms", "cas/cloudcas", "cas/vaultcas")
PROVISIONER = "bench@edgekms"
STEPCA = "step-ca"
CFSSL_SQLITE = "cfssl-sqlite"

# cfssl's certdb table for SQLite: the columns Debian's cfssl (1.2.0+git20160825) INSERTs
# (serial, AKI, CA label, status, reason, expiry, revoked_at, PEM).
CFSSL_SCHEMA = """
CREATE TABLE certificates (
  serial_number BLOB NOT NULL,
  authority_key_identifier BLOB NOT NULL,
  ca_label BLOB,
  status BLOB NOT NULL,
  reason INT,
  expiry TIMESTAMP,
  revoked_at TIMESTAMP,
  pem BLOB NOT NULL,
  PRIMARY KEY (serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number BLOB NOT NULL,
  authority_key_identifier BLOB NOT NULL,
  body BLOB NOT NULL,
  expiry TIMESTAMP,
  PRIMARY KEY (serial_number, authority_key_identifier)
);
"""


class PeerUnavailable(Exception):
    """A peer CA cannot be built or started on this machine; the message says why."""


@dataclass(frozen=True)
class Skipped:
    """A peer left out of the run, and why (shown in the report instead of a figure)."""

    peer: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"peer": self.peer, "reason": self.reason}


def peer_cache_dir() -> Path:
    """Where the built step-ca (and its Go build cache) live between runs."""
    override = os.environ.get("EDGEKMS_PEERS_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgekms-bench" / "peers"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------- step-ca build


def stepca_missing() -> str:
    """Why step-ca cannot be built here ("" if it can): the Debian packages `make bench`
    installs (scripts/bootstrap.sh, WITH_BENCH) and apt to fetch one source file."""
    if shutil.which("go") is None:
        return "no Go toolchain (apt-get install golang-go)"
    if not (STEPCA_LIBRARY / "authority").is_dir():
        return f"no step-ca library source (apt-get install {STEPCA_SOURCE}-dev)"
    if shutil.which("apt-get") is None:
        return "no apt-get to fetch step-ca's main.go from Debian's source package"
    return ""


def strip_cloud_imports(main_go: str) -> str:
    """upstream main.go without the blank imports of the back ends bookworm cannot build."""
    out = []
    for line in main_go.splitlines(keepends=True):
        match = re.match(r'\s*_\s+"github\.com/smallstep/certificates/([a-z/]+)"', line)
        if match and match.group(1) in STEPCA_DROPPED_IMPORTS:
            continue
        out.append(line)
    return "".join(out)


def _apt_archive() -> str:
    """The archive the system's apt already uses (first URIs of its deb822 sources)."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            if line.startswith("deb "):
                return line.split()[1]
    raise PeerUnavailable("no apt archive configured to fetch step-ca's source from")


def _fetch_main_go(cache: Path) -> Path:
    """cmd/step-ca/main.go from Debian's source package, with a private apt state."""
    apt = cache / "aptsrc"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "parts").mkdir(exist_ok=True)
    (apt / "parts" / "debsrc.sources").write_text(
        f"Types: deb-src\nURIs: {_apt_archive()}\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    options = [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={apt / 'parts'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
    ]  # fmt: skip
    orig = apt / f"{STEPCA_SOURCE}_{STEPCA_VERSION}.orig.tar.gz"
    if not orig.exists():
        for command in (
            ["apt-get", *options, "update"],
            [
                "apt-get",
                *options,
                "source",
                "--download-only",
                f"{STEPCA_SOURCE}={STEPCA_VERSION}-1",
            ],
        ):
            done = subprocess.run(command, cwd=apt, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise PeerUnavailable(f"{' '.join(command[-2:])}: {done.stderr.strip()[-300:]}")
    member = f"{STEPCA_SOURCE}-{STEPCA_VERSION}/cmd/step-ca/main.go"
    with tarfile.open(orig) as archive:
        handle = archive.extractfile(member)
        if handle is None:
            raise PeerUnavailable(f"{member} missing from {orig.name}")
        source = handle.read().decode()
    target = cache / "stepca-main" / "main.go"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(strip_cloud_imports(source))
    return target


def build_stepca(cache: Path | None = None) -> Path:
    """The step-ca binary, built once into the cache; PeerUnavailable with the reason."""
    cache = cache or peer_cache_dir()
    binary = cache / "step-ca"
    if binary.exists():
        return binary
    missing = stepca_missing()
    if missing:
        raise PeerUnavailable(missing)
    cache.mkdir(parents=True, exist_ok=True)
    main_go = _fetch_main_go(cache)
    env = {
        **os.environ,
        "GOPATH": "/usr/share/gocode",
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
        "GOCACHE": str(cache / "gocache"),
    }
    partial = cache / "step-ca.partial"
    done = subprocess.run(
        ["nice", "go", "build", "-o", str(partial),
         f"-ldflags=-w -X main.Version={STEPCA_VERSION}-debian", "."],
        cwd=main_go.parent, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if done.returncode != 0:
        raise PeerUnavailable(f"go build of step-ca failed: {done.stderr.strip()[-400:]}")
    partial.replace(binary)
    return binary


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """A P-256 root and intermediate on disk; the peers sign with the intermediate."""

    root_crt: Path
    int_crt: Path
    int_key: Path


def make_pki(directory: Path, label: str) -> Pki:
    """Root (path length 1) and intermediate (path length 0), keys unencrypted SEC1 PEM
    (which step-ca's softkms and cfssl both read), key files 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip

    def ca(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        signer: ec.EllipticCurvePrivateKey,
        path_length: int,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(signer, hashes.SHA256())
        )

    root_key = ec.generate_private_key(ec.SECP256R1())
    root = ca(f"{label} Root CA", root_key, None, root_key, 1)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = ca(f"{label} Intermediate CA", int_key, root.subject, root_key, 0)
    pki = Pki(directory / "root_ca.crt", directory / "intermediate_ca.crt", directory / "int.key")
    pki.root_crt.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    pki.int_crt.write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    pki.int_key.touch(mode=0o600)
    pki.int_key.write_bytes(
        int_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return pki


def check_issued(cert_pem: bytes, csr_pem: bytes, pki: Pki) -> None:
    """A peer's answer really is the CSR's certificate: signed by the intermediate, the
    CSR's public key, its DNS name. PeerUnavailable otherwise (a peer that answers with
    something else is not measured)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate(cert_pem)
    csr = x509.load_pem_x509_csr(csr_pem)
    inter = x509.load_pem_x509_certificate(pki.int_crt.read_bytes())
    issuer_key = inter.public_key()
    if cert.issuer != inter.subject or not isinstance(issuer_key, ec.EllipticCurvePublicKey):
        raise PeerUnavailable("issued certificate is not from the intermediate")
    hash_algorithm = cert.signature_hash_algorithm
    if hash_algorithm is None:
        raise PeerUnavailable("issued certificate has no signature hash")
    try:
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
    except InvalidSignature as exc:
        raise PeerUnavailable("issued certificate is not signed by the intermediate") from exc
    if cert.public_key() != csr.public_key():
        raise PeerUnavailable("issued certificate does not carry the CSR's key")
    wanted = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    got = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if not set(wanted.get_values_for_type(x509.DNSName)) <= set(
        got.get_values_for_type(x509.DNSName)
    ):
        raise PeerUnavailable("issued certificate lacks the CSR's DNS names")


# --------------------------------------------------------------------------- step-ca


class Provisioner:
    """step-ca's JWK provisioner: the public JWK goes into ca.json, the private key stays
    with the client, which signs one one-time token (ES256 JWT) per certificate."""

    def __init__(self, name: str = PROVISIONER, private_pem: bytes | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if private_pem is None:
            self.key = ec.generate_private_key(ec.SECP256R1())
        else:
            loaded = serialization.load_pem_private_key(private_pem, None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise TypeError("the provisioner key must be EC P-256")
            self.key = loaded
        self.name = name
        numbers = self.key.public_key().public_numbers()
        self.x = _b64u(numbers.x.to_bytes(32, "big"))
        self.y = _b64u(numbers.y.to_bytes(32, "big"))
        # RFC 7638 thumbprint as the key id, as step's own tooling names JWKs.
        canonical = json.dumps(
            {"crv": "P-256", "kty": "EC", "x": self.x, "y": self.y},
            separators=(",", ":"), sort_keys=True,
        )  # fmt: skip
        self.kid = _b64u(hashlib.sha256(canonical.encode()).digest())
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        self._header = _b64u(json.dumps(header, separators=(",", ":")).encode())

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, str]:
        return {
            "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": self.x, "y": self.y,
        }  # fmt: skip

    def token(self, audience: str, subject: str, sans: Sequence[str], now: int) -> str:
        """A one-time token for one certificate: random jti, valid five minutes."""
        import secrets

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        claims = {
            "aud": audience, "iss": self.name, "sub": subject, "sans": list(sans),
            "iat": now, "nbf": now, "exp": now + 300, "jti": secrets.token_hex(32),
        }  # fmt: skip
        signing_input = (
            f"{self._header}.{_b64u(json.dumps(claims, separators=(',', ':')).encode())}"
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class RunningPeer:
    """A started peer: its process, where to send CSRs, and its directory."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    directory: Path
    pki: Pki

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _log(directory: Path, name: str) -> Any:
    return open(directory / f"{name}.log", "ab")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-300:]
    except OSError:
        return ""


def start_stepca(binary: Path, directory: Path) -> RunningPeer:
    """step-ca with a badger v2 DB, HTTPS on a free loopback port, one JWK provisioner;
    waits for /health. The provisioner's private key is left in the directory for the
    load process (provisioner.pem, 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "certs", "step-ca bench")
    provisioner = Provisioner()
    key_file = directory / "provisioner.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(provisioner.private_pem())
    port = free_port()
    config = {
        "root": str(pki.root_crt),
        "crt": str(pki.int_crt),
        "key": str(pki.int_key),
        "address": f"127.0.0.1:{port}",
        "dnsNames": ["127.0.0.1", "localhost"],
        "logger": {"format": "text"},
        "db": {"type": "badgerv2", "dataSource": str(directory / "db")},
        "authority": {
            "provisioners": [
                {"type": "JWK", "name": provisioner.name, "key": provisioner.public_jwk()}
            ]
        },
        "tls": {"minVersion": 1.2, "maxVersion": 1.3, "renegotiation": False},
    }
    (directory / "ca.json").write_text(json.dumps(config, indent=1))
    url = f"https://127.0.0.1:{port}"
    (directory / "peer.json").write_text(
        json.dumps({"name": provisioner.name, "audience": f"{url}/1.0/sign"})
    )
    log = _log(directory, "step-ca")
    proc = subprocess.Popen(
        [str(binary), str(directory / "ca.json")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    peer = RunningPeer(STEPCA, proc, url, directory, pki)
    context = ssl.create_default_context(cafile=str(pki.root_crt))
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(
                f"step-ca exited ({proc.returncode}): {_tail(directory / 'step-ca.log')}"
            )
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own https://127.0.0.1 URL
                f"{url}/health", context=context, timeout=2
            ) as answer:
                if json.load(answer).get("status") == "ok":
                    return peer
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.2)
    peer.stop()
    raise PeerUnavailable(f"step-ca /health not ok within 60 s: {last}")


def start_cfssl_sqlite(directory: Path) -> RunningPeer:
    """`cfssl serve` signing with the intermediate and INSERTing every certificate into a
    fresh SQLite database (its certdb), on a free loopback port (plain HTTP, as cfssl's
    API server speaks by default)."""
    binary = shutil.which("cfssl")
    if binary is None:
        raise PeerUnavailable("cfssl not found (apt-get install golang-cfssl)")
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "certs", "cfssl bench")
    database = directory / "certs.db"
    with sqlite3.connect(database) as connection:
        connection.executescript(CFSSL_SCHEMA)
    connection.close()
    (directory / "db-config.json").write_text(
        json.dumps({"driver": "sqlite3", "data_source": str(database)})
    )
    profile = {"expiry": "24h", "usages": ["digital signature", "server auth"]}
    (directory / "config.json").write_text(
        json.dumps({"signing": {"default": profile, "profiles": {"server": profile}}})
    )
    port = free_port()
    log = _log(directory, "cfssl")
    proc = subprocess.Popen(
        [
            binary, "serve", "-address", "127.0.0.1", "-port", str(port),
            "-ca", str(pki.int_crt), "-ca-key", str(pki.int_key),
            "-config", str(directory / "config.json"),
            "-db-config", str(directory / "db-config.json"), "-loglevel", "3",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    try:
        wait_for_port("127.0.0.1", port, 20.0, proc)
    except Exception as exc:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        raise PeerUnavailable(
            f"cfssl serve did not start: {exc} {_tail(directory / 'cfssl.log')}"
        ) from exc
    return RunningPeer(CFSSL_SQLITE, proc, f"http://127.0.0.1:{port}", directory, pki)


def cfssl_rows(directory: Path) -> int:
    """Certificates cfssl stored (read after it stopped)."""
    with sqlite3.connect(directory / "certs.db") as connection:
        (count,) = connection.execute("SELECT count(*) FROM certificates").fetchone()
    connection.close()
    return int(count)


# Tokens minted before the load starts, per second of window: above what step-ca reached
# on a quiet 2-core machine (~1,300/s at 16 in flight), so minting stays off the clock; a
# faster machine mints the rest on demand.
TOKENS_PER_SECOND = 2500
# At most this many pre-minted (about 2 s of minting), and none used older than
# TOKEN_FRESH_S: a token lives five minutes; a longer window mints the rest on demand.
MAX_PREMINTED = 20_000
TOKEN_FRESH_S = 240.0


def tokens_to_premint(duration: float, warmup: float) -> int:
    """How many one-time tokens step-ca's load process mints before its clock starts."""
    return min(MAX_PREMINTED, int(TOKENS_PER_SECOND * (duration + warmup)))


async def stepca_caller(spec: Any) -> tuple[Any, Any]:
    """For bench.issuance's load process: POST /1.0/sign {csr, ott} over keep-alive HTTPS,
    one fresh one-time token per certificate (pre-minted, as a provisioning client that
    batches its tokens would), a 201 with a certificate or an error."""
    import collections

    import aiohttp
    from cryptography import x509

    directory = Path(spec.data_dir)
    peer = json.loads((directory / "peer.json").read_text())
    provisioner = Provisioner(peer["name"], (directory / "provisioner.pem").read_bytes())
    audience = peer["audience"]
    names: dict[bytes, tuple[str, list[str]]] = {}
    for pem in spec.csrs:
        csr = x509.load_pem_x509_csr(pem)
        common = csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names[pem] = (str(common), list(sans.get_values_for_type(x509.DNSName)))
    pool: dict[bytes, collections.deque[tuple[float, str]]] = {
        pem: collections.deque() for pem in spec.csrs
    }

    def mint(pem: bytes) -> str:
        subject, sans = names[pem]
        return provisioner.token(audience, subject, sans, int(time.time()))

    per_csr = tokens_to_premint(spec.duration, spec.warmup) // len(spec.csrs) + 2
    for pem in spec.csrs:
        pool[pem].extend((time.time(), mint(pem)) for _ in range(per_csr))
    context = ssl.create_default_context(cafile=str(directory / "certs" / "root_ca.crt"))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=spec.inflight, ssl=context)
    )

    async def call(pem: bytes) -> None:
        tokens = pool[pem]
        while tokens and tokens[0][0] < time.time() - TOKEN_FRESH_S:
            tokens.popleft()
        token = tokens.popleft()[1] if tokens else mint(pem)
        body = {"csr": pem.decode(), "ott": token}
        async with session.post(f"{spec.target}/1.0/sign", json=body) as resp:
            answer = await resp.json(content_type=None)
            status = resp.status
        if status != 201 or not str(answer.get("crt", "")).startswith("-----BEGIN CERTIFICATE"):
            raise RuntimeError(f"step-ca {status}: {str(answer)[:160]}")

    return call, session.close


def _issue_one(peer: RunningPeer, csr: bytes) -> bytes:
    """One certificate from the peer, synchronously, for check_issued."""
    if peer.name == STEPCA:
        info = json.loads((peer.directory / "peer.json").read_text())
        provisioner = Provisioner(info["name"], (peer.directory / "provisioner.pem").read_bytes())
        from cryptography import x509

        parsed = x509.load_pem_x509_csr(csr)
        cn = str(parsed.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)
        sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        token = provisioner.token(
            info["audience"], cn, sans.get_values_for_type(x509.DNSName), int(time.time())
        )
        body = {"csr": csr.decode(), "ott": token}
        path = "/1.0/sign"
        context: ssl.SSLContext | None = ssl.create_default_context(cafile=str(peer.pki.root_crt))
    else:
        body = {"certificate_request": csr.decode(), "profile": "server"}
        path = "/api/v1/cfssl/sign"
        context = None
    request = urllib.request.Request(  # noqa: S310 - the peer's loopback URL
        peer.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:  # noqa: S310
            data = json.load(answer)
    except OSError as exc:
        raise PeerUnavailable(f"{peer.name} did not issue: {exc}") from exc
    pem = data.get("crt") if peer.name == STEPCA else data.get("result", {}).get("certificate")
    if not pem:
        raise PeerUnavailable(f"{peer.name} answered without a certificate: {str(data)[:200]}")
    return str(pem).encode()


# --------------------------------------------------------------------------- the run


def _measure_peer(
    peer: RunningPeer, csrs: tuple[bytes, ...], levels: Sequence[int], duration: float,
    warmup: float,
) -> list[RunResult]:  # fmt: skip
    from bench import issuance

    check_issued(_issue_one(peer, csrs[0]), csrs[0], peer.pki)
    runs = []
    for n in levels:
        target = str(peer.directory) if peer.name == STEPCA else ""
        spec = issuance.IssueSpec(peer.name, peer.url, target, csrs, n, duration, warmup)
        # step-ca's load process mints its tokens before the start: give it the time.
        lead = 3.0 + tokens_to_premint(duration, warmup) / 4000 if peer.name == STEPCA else 3.0
        result, _, _ = issuance.measure(spec, {peer.name: peer.proc.pid}, lead=lead)
        runs.append(result)
    return runs


def run(
    work: Path,
    csrs: tuple[bytes, ...],
    levels: Sequence[int],
    duration: float,
    warmup: float,
) -> tuple[list[RunResult], list[Skipped]]:
    """step-ca, then cfssl + SQLite, each alone on the machine beside the (idle) stack,
    the same CSRs at each level. A peer that cannot be built, started or does not issue
    a correct certificate is skipped with the reason."""
    runs: list[RunResult] = []
    skipped: list[Skipped] = []
    for name in (STEPCA, CFSSL_SQLITE):
        peer: RunningPeer | None = None
        try:
            if name == STEPCA:
                peer = start_stepca(build_stepca(), work / "step-ca")
            else:
                peer = start_cfssl_sqlite(work / "cfssl-sqlite")
            measured = _measure_peer(peer, csrs, levels, duration, warmup)
        except (PeerUnavailable, OSError, ValueError, subprocess.SubprocessError) as exc:
            # Build, start or first-certificate failure: no figure for this peer, the reason.
            skipped.append(Skipped(name, str(exc) or type(exc).__name__))
            continue
        finally:
            if peer is not None:
                peer.stop()
        if name == STEPCA and peer is not None:
            size = sum(f.stat().st_size for f in (peer.directory / "db").rglob("*") if f.is_file())
            for r in measured:
                r.note = (r.note + f" badger DB after the run: {size / 1e6:.1f} MB").strip()
        if name == CFSSL_SQLITE and peer is not None:
            stored = cfssl_rows(peer.directory)
            answered = sum(r.count for r in measured)
            if stored < answered:
                skipped.append(
                    Skipped(name, f"stored {stored} rows for {answered} certificates answered")
                )
                continue
            for r in measured:
                r.note = (r.note + f" certdb rows after the run: {stored}").strip()
        runs += measured
    return runs, skipped


# How each peer keeps what it issued, for the report.
PEERS_NOTE = (
    "step-ca 0.19.0 (Debian source): badger v2 DB, HTTPS, JWK provisioner, one one-time "
    "token per certificate (pre-minted by the load process); cfssl (Debian golang-cfssl) "
    "serve with its SQLite certdb (one INSERT per certificate), plain HTTP."
)


def run_block(
    work: Path, csrs: tuple[bytes, ...], duration: float, warmup: float
) -> dict[str, Any]:
    """results.json's "peers" block: the runs, what was skipped and why, how they store."""
    from bench.issuance import LEVELS

    runs, skipped = run(work, csrs, LEVELS, duration, warmup)
    return {
        "runs": [r.to_json() for r in runs],
        "skipped": [s.to_json() for s in skipped],
        "note": PEERS_NOTE,
    }


def render(results: Mapping[str, Any]) -> str:
    """issuance_peers.md: the verdict rows and the side-by-side table of one run."""
    from bench import report
    from bench.stats import targets_table

    issue = report._runs(results.get("issuance"))
    peers = report._runs((results.get("peers") or {}).get("runs"))
    machine = results.get("machine", {})
    load, end = machine.get("loadavg_at_start"), machine.get("loadavg_at_end")
    parts = [
        "# Issuance against step-ca and cfssl + SQLite (issue 19 item 3)",
        "",
        f"Produced by `{results.get('command', 'make bench')}` (bench/peers.py); "
        f"{machine.get('cpus', '?')} CPUs"
        + (f", 1-min load average {load[0]:.1f} at start" if load else "")
        + (f", {end[0]:.1f} at end" if end else "")
        + f"; {results['settings']['warmup_s']:g} s warm-up, "
        f"{results['settings']['duration_s']:g} s measured per run. EdgeKMS: "
        "CertificateAuthority/IssueCertificate through the broker (mutual TLS), CA key in "
        "SoftHSM, every certificate stored in the CA bucket and audited before it returns.",
        "",
        targets_table(report.peer_targets(issue, peers, report._skipped(dict(results)))),
        "",
        *report.peers_section(dict(results)),
    ]
    return "\n".join(parts) + "\n"


def write(results: Mapping[str, Any], out: Path) -> None:
    (out / "issuance_peers.md").write_text(render(results))


def main() -> None:
    """`python -m bench.peers`: EdgeKMS issuance on a fresh stack, then step-ca and cfssl
    + SQLite on the same CSRs at 1 and 16 in flight; writes issuance_peers.{md,json}."""
    import argparse
    import tempfile

    from bench import issuance, stackrun

    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=main.__doc__)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekms-peers-"))
    results: dict[str, Any] = {
        "command": "python -m bench.peers",
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_at_start": os.getloadavg()},
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup},
    }
    try:
        csrs = issuance.make_csrs()
        stack = stackrun.start(work / "data")
        try:
            pids = stack.pids()
            issuance._init_ca(stack.client_config)
            runs = []
            for n in issuance.LEVELS:
                spec = issuance.IssueSpec(
                    "edgekms", stack.broker, str(stack.data_dir), csrs, n,
                    args.duration, args.warmup,
                )  # fmt: skip
                runs.append(issuance.measure(spec, pids)[0])
            results["issuance"] = [r.to_json() for r in runs]
            results["peers"] = run_block(work / "peers", csrs, args.duration, args.warmup)
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "issuance_peers.json").write_text(json.dumps(results, indent=1) + "\n")
    write(results, args.out)
    print((args.out / "issuance_peers.md").read_text())


if __name__ == "__main__":
    main()
