"""Federation over the `https_spiffe` bundle endpoint profile against the real stack: a
stand-in SPIRE server (HTTPS on loopback, made here with its own SPIFFE CA) presents an
X509-SVID for spiffe://peer.example/spire/server and serves its bundle; `kmsctl spiffe
federate --endpoint-spiffe-id ... --bundle FILE` authenticates that SVID against the
bundle given, then each background refresh against the last good bundle, so a rotation
on the peer (new authority published first, then used) keeps refreshing. An SVID of the
wrong ID, from another CA, expired, or a plain server certificate is refused with
nothing stored, as are a malformed --bundle and a mix of the two profiles' options."""

from __future__ import annotations

import base64
import datetime
import functools
import http.server
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_service.config import CAConfigError, load_serve_config
from edgekms import spiffe as sp
from edgekms.client_certs import self_signed_ca
from edgekms.errors import InvalidArgument
from mgmt.natsserver import free_port, free_port_pair
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, start_stack, stop_stack
from tests.e2e.test_stack_lock import _up
from tests.logevents import count_event
from tests.spiffe.conftest import DEVICE, TRUST_DOMAIN, SpiffeStack, wait_for

PEER = "peer.example"
SERVER_ID = f"spiffe://{PEER}/spire/server"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class SpiffeCA:
    """A peer trust domain's X.509 authority (self-signed, as SPIRE's upstream-less CA)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str) -> SpiffeCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return cls(key, self_signed_ca(key, subject, datetime.timedelta(days=1)))

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def leaf(
        self, uri: str = SERVER_ID, *, expired: bool = False, ip_only: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """An X509-SVID for `uri` (or, `ip_only`, an ordinary https server certificate
        for 127.0.0.1 with no URI SAN), signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = _now() - (datetime.timedelta(days=2) if expired else datetime.timedelta(minutes=5))
        end = (
            _now() - datetime.timedelta(days=1) if expired else _now() + datetime.timedelta(hours=1)
        )
        names: list[x509.GeneralName] = (
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            if ip_only
            else [x509.UniformResourceIdentifier(uri)]
        )
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def bundle_json(authorities: list[SpiffeCA], sequence: int, hint: int = 10) -> bytes:
    keys = []
    for ca in authorities:
        public = ca.cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        key = {**sp.jwk_of(public, "", "x509-svid"), "x5c": [base64.b64encode(ca.der).decode()]}
        del key["kid"]
        keys.append(key)
    body = {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": hint}
    return json.dumps(body).encode()


class _Server(http.server.ThreadingHTTPServer):
    """TLS per connection with the identity of the moment, so a test can switch the
    endpoint's SVID as a rotating peer does."""

    daemon_threads = True
    context: ssl.SSLContext

    def handle_error(self, request: object, client_address: object) -> None:
        """A client refusing our certificate is what these tests are about: no trace."""

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


@dataclass
class Endpoint:
    """A stand-in SPIRE bundle endpoint (https_spiffe): GET / serves `document`."""

    where: Path
    document: bytes = b""
    server: _Server | None = None
    thread: threading.Thread | None = None
    generation: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.server_address[1]}/"

    def present(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        """Present this certificate from the next connection on."""
        self.generation += 1
        cert_path = self.where / f"svid{self.generation}.pem"
        key_path = self.where / f"svid{self.generation}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        assert self.server is not None
        self.server.context = context

    def start(self) -> None:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = endpoint.document
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def endpoints(tmp_path: Path) -> Iterator[list[Endpoint]]:
    """Make endpoints with `new_endpoint(endpoints, ...)`; all stopped at the end."""
    made: list[Endpoint] = []
    yield made
    for e in made:
        e.stop()


def new_endpoint(
    made: list[Endpoint],
    where: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    document: bytes,
) -> Endpoint:
    where.mkdir(parents=True, exist_ok=True)
    endpoint = Endpoint(where, document)
    endpoint.start()
    endpoint.present(cert, key)
    made.append(endpoint)
    return endpoint


def federated(spiffe_stack: SpiffeStack, td: str) -> list[bytes] | None:
    """The X.509 authorities stored for `td`, None if not federated."""
    with spiffe_stack.stack.client() as admin:
        found = [f for f in admin.spiffe_bundle().federated if f.trust_domain == td]
    return list(found[0].x509_authorities_der) if found else None


def test_https_spiffe_federates_and_follows_a_rotation_of_the_peer(
    spiffe_stack: SpiffeStack, endpoints: list[Endpoint], tmp_path: Path
) -> None:
    old = SpiffeCA.make("peer.example A")
    endpoint = new_endpoint(
        endpoints, tmp_path / "peer", *old.leaf(), bundle_json([old], sequence=1)
    )
    given = tmp_path / "peer.example.bundle.json"
    given.write_bytes(bundle_json([old], sequence=1))
    made = json.loads(
        spiffe_stack.kmsctl(
            "spiffe", "federate", "--trust-domain", PEER, "--bundle-url", endpoint.url,
            "--endpoint-spiffe-id", SERVER_ID, "--bundle", str(given), "-o", "json",
        ).stdout
    )  # fmt: skip
    assert made == {
        "trust_domain": PEER,
        "bundle_url": endpoint.url,
        "endpoint_profile": "https_spiffe",
        "endpoint_spiffe_id": SERVER_ID,
        "x509_authorities": 1,
        "jwt_keys": 0,
        "sequence": 1,
        "refresh_hint_seconds": 10,
    }
    try:
        assert federated(spiffe_stack, PEER) == [old.der]
        # The peer rotates: the new authority is published while the old one still
        # signs the endpoint's SVID...
        new = SpiffeCA.make("peer.example B")
        endpoint.document = bundle_json([old, new], sequence=2)
        wait_for(
            lambda: federated(spiffe_stack, PEER) == [old.der, new.der],
            120,
            "the bundle with both authorities",
        )
        # ...then the endpoint presents an SVID of the new authority, which the bootstrap
        # bundle alone would not trust: the refresh uses the last good bundle.
        endpoint.present(*new.leaf())
        endpoint.document = bundle_json([new], sequence=3)
        wait_for(
            lambda: federated(spiffe_stack, PEER) == [new.der],
            120,
            "the bundle after the rotation",
        )
        # A refresh from an endpoint whose SVID the stored bundle does not trust keeps
        # the last good bundle and says why.
        stranger = SpiffeCA.make("not peer.example")
        endpoint.present(*stranger.leaf())
        endpoint.document = bundle_json([stranger], sequence=4)
        ca_log = spiffe_stack.stack.data_dir / "logs" / "ca.log"

        def refused() -> int:
            federated(spiffe_stack, PEER)  # a bundle read starts the refresh when due
            return count_event(
                ca_log.read_text(errors="replace"),
                "spiffe_federation_refresh_failed",
                trust_domain=PEER,
                reason="spiffe.endpoint_svid_invalid",
            )

        wait_for(refused, 120, "the refused refresh in the CA's log")
        assert federated(spiffe_stack, PEER) == [new.der]
    finally:
        spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", PEER)


BAD = "bad.example"
BAD_SERVER_ID = f"spiffe://{BAD}/spire/server"


@pytest.fixture(scope="module")
def bad_ca() -> SpiffeCA:
    return SpiffeCA.make("bad.example")


@pytest.fixture
def good(endpoints: list[Endpoint], tmp_path: Path, bad_ca: SpiffeCA) -> Endpoint:
    """The bad domain's endpoint, behaving: its SVID is BAD_SERVER_ID's, from bad_ca."""
    return new_endpoint(
        endpoints, tmp_path / "good", *bad_ca.leaf(BAD_SERVER_ID),
        bundle_json([bad_ca], sequence=1, hint=300),
    )  # fmt: skip


def federate_bad(spiffe_stack: SpiffeStack, url: str, *extra: str) -> tuple[int, str]:
    done = spiffe_stack.kmsctl(
        "spiffe", "federate", "--trust-domain", BAD, "--bundle-url", url, *extra, check=False
    )  # fmt: skip
    return done.returncode, done.stderr


def bad_bundle_file(bad_ca: SpiffeCA, where: Path) -> Path:
    given = where / "bundle.json"
    given.write_bytes(bundle_json([bad_ca], sequence=1, hint=300))
    return given


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("wrong_id", "not 'spiffe://bad.example/spire/server'"),
        ("another_ca", "unable to get local issuer certificate"),
        ("no_uri_san", "no URI SAN"),
        ("expired", "expired"),
    ],
)
def test_https_spiffe_refuses_an_endpoint_that_is_not_the_svid_configured(
    spiffe_stack: SpiffeStack,
    endpoints: list[Endpoint],
    tmp_path: Path,
    bad_ca: SpiffeCA,
    case: str,
    says: str,
) -> None:
    """The SVID of another ID, one from a CA not in the bundle, an ordinary https server
    certificate (IP SAN, no URI SAN) from the bundle's own CA, an expired SVID."""
    leaf = {
        "wrong_id": lambda: bad_ca.leaf(f"spiffe://{BAD}/not/the/server"),
        "another_ca": lambda: SpiffeCA.make("another CA").leaf(BAD_SERVER_ID),
        "no_uri_san": lambda: bad_ca.leaf(ip_only=True),
        "expired": lambda: bad_ca.leaf(BAD_SERVER_ID, expired=True),
    }[case]()
    document = bundle_json([bad_ca], sequence=1, hint=300)
    endpoint = new_endpoint(endpoints, tmp_path / "endpoint", *leaf, document)
    code, err = federate_bad(
        spiffe_stack, endpoint.url, "--endpoint-spiffe-id", BAD_SERVER_ID, "--bundle",
        str(bad_bundle_file(bad_ca, tmp_path)),
    )  # fmt: skip
    assert code == 6, err
    assert err.startswith("kmsctl: spiffe.endpoint_svid_invalid:"), err
    assert says in err, err
    assert federated(spiffe_stack, BAD) is None


def test_https_spiffe_refuses_a_malformed_bundle_file_and_takes_pem(
    spiffe_stack: SpiffeStack, good: Endpoint, tmp_path: Path, bad_ca: SpiffeCA
) -> None:
    given = tmp_path / "given"
    for content in (
        b'{"keys": [{"use": "x509-svid", "x5c": ["@@"]}]}',
        b'{"keys": []}',
        b"not a bundle",
        b"",
    ):
        given.write_bytes(content)
        code, err = federate_bad(
            spiffe_stack, good.url, "--endpoint-spiffe-id", BAD_SERVER_ID, "--bundle", str(given)
        )
        assert code == 3, (content, err)
        assert err.startswith("kmsctl: spiffe.endpoint_bundle_invalid:"), (content, err)
    assert federated(spiffe_stack, BAD) is None
    # The same endpoint, the bundle given as PEM certificates: accepted.
    given.write_bytes(bad_ca.cert.public_bytes(serialization.Encoding.PEM))
    code, err = federate_bad(
        spiffe_stack, good.url, "--endpoint-spiffe-id", BAD_SERVER_ID, "--bundle", str(given)
    )
    assert code == 0, err
    try:
        assert federated(spiffe_stack, BAD) == [bad_ca.der]
    finally:
        spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", BAD)


def test_https_spiffe_and_https_web_options_exclude_each_other(
    spiffe_stack: SpiffeStack, good: Endpoint, tmp_path: Path, bad_ca: SpiffeCA
) -> None:
    endpoint_ca = tmp_path / "ca.pem"
    endpoint_ca.write_bytes(bad_ca.cert.public_bytes(serialization.Encoding.PEM))
    given = bad_bundle_file(bad_ca, tmp_path)
    code, err = federate_bad(
        spiffe_stack, good.url, "--endpoint-spiffe-id", BAD_SERVER_ID, "--bundle", str(given),
        "--endpoint-ca", str(endpoint_ca),
    )  # fmt: skip
    assert code == 3 and err.startswith("kmsctl: spiffe.endpoint_profile_conflict:"), err
    # The CA refuses the mix too, whatever client sends it.
    with spiffe_stack.stack.client() as admin, pytest.raises(InvalidArgument) as refused:
        admin.spiffe_federate(
            BAD, good.url, endpoint_ca.read_bytes(), BAD_SERVER_ID, given.read_bytes()
        )
    assert refused.value.reason == "spiffe.endpoint_profile_conflict"
    code, err = federate_bad(spiffe_stack, good.url, "--endpoint-spiffe-id", BAD_SERVER_ID)
    assert code == 2 and "--endpoint-spiffe-id and --bundle go together" in err, err
    assert federated(spiffe_stack, BAD) is None


def test_https_spiffe_endpoint_id_must_be_in_the_federated_domain(
    spiffe_stack: SpiffeStack, endpoints: list[Endpoint], tmp_path: Path, bad_ca: SpiffeCA
) -> None:
    elsewhere = "spiffe://elsewhere.example/spire/server"
    good = new_endpoint(
        endpoints, tmp_path / "good", *bad_ca.leaf(elsewhere),
        bundle_json([bad_ca], sequence=1, hint=300),
    )  # fmt: skip
    given = str(bad_bundle_file(bad_ca, tmp_path))
    for endpoint_id in (elsewhere, "spiffe://bad.example/a/../b", "https://bad.example/x"):
        code, err = federate_bad(
            spiffe_stack, good.url, "--endpoint-spiffe-id", endpoint_id, "--bundle", given
        )
        assert code == 3, (endpoint_id, err)
        assert err.startswith(
            ("kmsctl: spiffe.endpoint_id_invalid:", "kmsctl: spiffe.id_invalid:")
        ), (endpoint_id, err)
    assert federated(spiffe_stack, BAD) is None


def subprocess_kmsctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """kmsctl against another stack than the SPIFFE tests' one."""
    return subprocess.run(
        [str(BIN / "kmsctl"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _svid_of(url: str) -> x509.Certificate | None:
    """The certificate the endpoint at `url` presents, unverified (the test looks at
    it; the CA's fetch is what verifies); None while it does not listen yet."""
    host, port = url.removeprefix("https://").split("/")[0].rsplit(":", 1)
    try:
        pem = ssl.get_server_certificate((host, int(port)), timeout=10)
    except OSError:
        return None
    return x509.load_pem_x509_certificate(pem.encode())


def test_edgekms_federates_edgekms_over_https_spiffe_both_ways(
    spiffe_stack: SpiffeStack, tmp_path: Path
) -> None:
    """Two EdgeKMS stacks, each serving its bundle endpoint over https_spiffe
    (`kmsctl up --spiffe-bundle-listen`), each federating the other over https_spiffe
    with the other's X.509 authorities (`kmsctl spiffe bundle --out`) as --bundle."""
    port = free_port()
    office = start_stack(tmp_path / "office", "--spiffe-bundle-listen", f"127.0.0.1:{port}")
    try:
        with office.client(timeout=60) as kms:
            kms.ca_init("Office CA")
            kms.spiffe_init("office.example")
        office_url = f"https://127.0.0.1:{port}/spiffe/bundle"
        for url, td in (
            (office_url, "office.example"),
            (spiffe_stack.spiffe_bundle_url, TRUST_DOMAIN),
        ):
            svid = wait_for(functools.partial(_svid_of, url), 90, f"{td}'s endpoint")
            uris = svid.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
            assert uris == [f"spiffe://{td}/edgekms/bundle-endpoint"]
            assert not svid.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

        home_root = tmp_path / "home.pem"
        spiffe_stack.kmsctl("spiffe", "bundle", "--out", str(home_root))
        office_root = tmp_path / "office.pem"
        office_env = {**office.env()}
        done = subprocess_kmsctl(office_env, "spiffe", "bundle", "--out", str(office_root))
        assert done.returncode == 0, done.stderr

        # home.arpa federates office.example...
        made = json.loads(
            spiffe_stack.kmsctl(
                "spiffe", "federate", "--trust-domain", "office.example", "--bundle-url",
                office_url, "--endpoint-spiffe-id",
                "spiffe://office.example/edgekms/bundle-endpoint", "--bundle", str(office_root),
                "-o", "json",
            ).stdout
        )  # fmt: skip
        assert made["endpoint_profile"] == "https_spiffe" and made["jwt_keys"] == 1
        with office.client() as kms:
            office_bundle = kms.spiffe_bundle()
        assert federated(spiffe_stack, "office.example") == list(office_bundle.x509_authorities_der)
        # ...and office.example federates home.arpa.
        done = subprocess_kmsctl(
            office_env, "spiffe", "federate", "--trust-domain", TRUST_DOMAIN, "--bundle-url",
            spiffe_stack.spiffe_bundle_url, "--endpoint-spiffe-id",
            f"spiffe://{TRUST_DOMAIN}/edgekms/bundle-endpoint", "--bundle", str(home_root),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with office.client() as kms:
            seen = {f.trust_domain: f for f in kms.spiffe_bundle().federated}
        with spiffe_stack.stack.client() as admin:
            home_bundle = admin.spiffe_bundle()
        assert list(seen[TRUST_DOMAIN].x509_authorities_der) == list(
            home_bundle.x509_authorities_der
        )
        # The wrong endpoint ID for office.example's endpoint is refused.
        wrong = spiffe_stack.kmsctl(
            "spiffe", "federate", "--trust-domain", "office.example", "--bundle-url",
            office_url, "--endpoint-spiffe-id", "spiffe://office.example/spire/server",
            "--bundle", str(office_root), check=False,
        )  # fmt: skip
        assert wrong.returncode == 6, wrong.stderr
        assert "spiffe.endpoint_svid_invalid" in wrong.stderr, wrong.stderr
    finally:
        spiffe_stack.kmsctl("spiffe", "unfederate", "--trust-domain", "office.example", check=False)
        assert stop_stack(office) == 0


@pytest.mark.parametrize("value", ["8444", "127.0.0.1:x", "127.0.0.1:70000"])
def test_a_bad_spiffe_bundle_listen_is_refused_before_anything_starts(
    tmp_path: Path, value: str
) -> None:
    """`kmsctl up --spiffe-bundle-listen` that is not HOST:PORT: refused first, as every
    listen option; and the same value in ca.toml keeps the CA from starting."""
    data_dir = tmp_path / "data"
    argv = _up(data_dir, free_port(), f"127.0.0.1:{free_port_pair()}", f"127.0.0.1:{free_port()}")
    done = subprocess.run(
        [*argv, "--spiffe-bundle-listen", value],
        capture_output=True, text=True, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("kmsctl: stack.listen_invalid: --spiffe-bundle-listen"), (
        done.stderr
    )
    assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")) == [
        "run",
        "run/up.lock",
    ]
    config = tmp_path / "ca.toml"
    config.write_text(
        f'nats_url = "nats://127.0.0.1:4222"\nspiffe_bundle_listen = {json.dumps(value)}\n'
    )
    with pytest.raises(CAConfigError, match="spiffe_bundle_listen must be host:port"):
        load_serve_config(config)


def test_no_entry_may_take_the_bundle_endpoints_id(spiffe_stack: SpiffeStack) -> None:
    """A node holding an SVID of spiffe://<td>/edgekms/bundle-endpoint could serve our
    peers a bundle of its choosing: the CA keeps that ID for itself."""
    reserved = f"spiffe://{TRUST_DOMAIN}/edgekms/bundle-endpoint"
    done = spiffe_stack.kmsctl(
        "spiffe", "entry", "create", "--id", reserved, "--node", DEVICE,
        "--selector", "unix:uid:1000", check=False,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("kmsctl: spiffe.id_reserved:"), done.stderr
    listed = json.loads(spiffe_stack.kmsctl("spiffe", "entry", "list", "-o", "json").stdout)
    entries = listed["entries"] if isinstance(listed, dict) else listed
    assert reserved not in [e["spiffe_id"] for e in entries]
