"""The route CA of a `kmsctl cluster init` cluster: its own software key, and one route
certificate per node (docs/cluster.md, "TLS on routes").

The internal CA cannot sign route certificates: its key is made in the first node's
token by the ceremony, which runs after the bundles exist. So the cluster gets a CA of
its own for routes only. Its key is written once, to the admin's part of the output
(OUT/_admin, 0600), never into a node's bundle: a node holds its route certificate and
key and the CA certificate, so a stolen bundle gives one node's route identity and
cannot mint a route certificate for another address. `kmsctl cluster add-node
--route-ca OUT/_admin` issues the new node's certificate with it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgekms.client_certs import host_names, leaf_certificate, now, self_signed_ca
from edgekms.errors import FailedPrecondition, InvalidArgument
from mgmt.pki import write_private

# The admin's part of `cluster init --out` (a node name cannot start with "_").
ADMIN_DIR = "_admin"
ROUTE_CA_KEY_FILE = "route-ca.key"
ROUTE_CA_CERT_FILE = "route-ca.crt"
# In each node's bundle (and its installed DATA_DIR/secrets/cluster).
ROUTE_CERT_FILE = "route.crt"
ROUTE_KEY_FILE = "route.key"
ROUTES_CA_FILE = "routes-ca.crt"
ROUTE_FILES = (ROUTE_CERT_FILE, ROUTE_KEY_FILE, ROUTES_CA_FILE)
# Route certificates live as long as the route CA: nothing renews them yet, and an
# expired one would cut the node off its cluster (docs/cluster.md, "Not yet").
ROUTE_VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class RouteCA:
    """The cluster's route CA: certificate and software key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class RouteFiles:
    """One node's route TLS files as PEM: its certificate, its key, the route CA's cert."""

    cert: bytes
    key: bytes
    ca: bytes

    def by_name(self) -> dict[str, bytes]:
        return {ROUTE_CERT_FILE: self.cert, ROUTE_KEY_FILE: self.key, ROUTES_CA_FILE: self.ca}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_route_ca(cluster: str) -> RouteCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeKMS"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"EdgeKMS route CA {cluster}"),
        ]
    )
    return RouteCA(self_signed_ca(key, name, ROUTE_VALIDITY), key)


def write_route_ca(ca: RouteCA, directory: Path) -> None:
    write_private(directory / ROUTE_CA_KEY_FILE, _key_pem(ca.key))
    write_private(directory / ROUTE_CA_CERT_FILE, ca.cert_pem)


def issue_route(ca: RouteCA, node: str, host: str) -> RouteFiles:
    """A node's route certificate: CN the node's name, SAN the host the other nodes dial
    (nats-server checks it when it dials), serverAuth and clientAuth (a route is both
    dialled and accepted)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf_certificate(
        ca.cert,
        ca.key,
        node,
        key.public_key(),
        host_names([host]),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        not_after=now() + ROUTE_VALIDITY,
    )
    return RouteFiles(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), ca.cert_pem)


def _bad(where: Path, why: str) -> InvalidArgument:
    return InvalidArgument("cluster.bundle_invalid", f"{where}: {why}", {"path": str(where)[:200]})


def load_route_ca(directory: Path) -> RouteCA:
    """The route CA from `cluster init`'s OUT/_admin; cluster.route_ca_invalid when a
    file is missing, is not a P-256 key and CA certificate, or the two do not match."""
    try:
        key = serialization.load_pem_private_key(_read(directory / ROUTE_CA_KEY_FILE), None)
        cert = x509.load_pem_x509_certificate(_read(directory / ROUTE_CA_CERT_FILE))
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            "cluster.route_ca_invalid",
            f"{directory}: not a route CA (want {ROUTE_CA_KEY_FILE} and {ROUTE_CA_CERT_FILE} "
            f"as `kmsctl cluster init` wrote them under OUT/{ADMIN_DIR}; {type(exc).__name__})",
            {"path": str(directory)[:200]},
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise InvalidArgument(
            "cluster.route_ca_invalid",
            f"{directory}: the route CA's key does not match its certificate",
            {"path": str(directory)[:200]},
        )
    return RouteCA(cert, key)


def check_same_ca(ca: RouteCA, bundle_ca_pem: bytes | None, source: Path) -> None:
    """The route CA given to add-node is the one the cluster's bundles trust."""
    if bundle_ca_pem is not None and ca.cert_pem.strip() != bundle_ca_pem.strip():
        raise FailedPrecondition(
            "cluster.route_ca_mismatch",
            f"the route CA given is not the one {source} trusts for routes: its nodes would "
            "refuse the new node's certificate",
            {"path": str(source)[:200]},
        )


def check_route_files(files: RouteFiles, host: str, where: Path) -> None:
    """A bundle's route files hang together: a certificate and key that match, issued by
    the CA given, naming the node's host, for server and client auth. InvalidArgument
    cluster.bundle_invalid otherwise, so a node never starts with routes its peers
    would refuse (or that it would refuse)."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert)
        ca = x509.load_pem_x509_certificate(files.ca)
        key = serialization.load_pem_private_key(files.key, None)
    except (ValueError, TypeError) as exc:
        raise _bad(where, f"route TLS files not readable as PEM ({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise _bad(where / ROUTE_KEY_FILE, "not the key of route.crt")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _bad(where / ROUTE_CERT_FILE, "not issued by routes-ca.crt") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise _bad(where / ROUTE_CERT_FILE, "a route certificate needs SAN and EKU") from None
    if host_names([host])[0] not in list(sans):
        raise _bad(where / ROUTE_CERT_FILE, f"does not name this node's host {host!r}")
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku):
        raise _bad(where / ROUTE_CERT_FILE, "a route certificate needs serverAuth and clientAuth")


def _read(path: Path) -> bytes:
    if path.stat().st_size > 64 * 1024:
        raise ValueError("too large")
    return path.read_bytes()
