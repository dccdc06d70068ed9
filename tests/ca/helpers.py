"""Helpers for the CA tests: software keys standing in for the token, CSRs, pkilint."""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_service.builder import CAKey, build_intermediate, build_root, ca_name

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class SoftCA:
    root_key: CAKey
    root: x509.Certificate
    key: CAKey
    cert: x509.Certificate


def make_soft_ca(kind: str = "ec-p256") -> SoftCA:
    def gen() -> CAKey:
        if kind == "ec-p384":
            return ec.generate_private_key(ec.SECP384R1())
        if kind == "rsa-2048":
            return rsa.generate_private_key(65537, 2048)
        if kind == "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        return ec.generate_private_key(ec.SECP256R1())

    root_key, key = gen(), gen()
    root = build_root(root_key, ca_name("Test Root CA", "EdgeKMS Tests"), 3650)
    cert = build_intermediate(
        root_key, root, key.public_key(), ca_name("Test Issuing CA", "EdgeKMS Tests"), 1825
    )
    return SoftCA(root_key, root, key, cert)


def make_key(kind: str) -> LeafKey:
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind.split("-")[1]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curves: dict[str, ec.EllipticCurve] = {
        "ec-p256": ec.SECP256R1(),
        "ec-p384": ec.SECP384R1(),
        "ec-p521": ec.SECP521R1(),
        "ec-k256": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[kind])


def san_of(*names: str) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        kind, _, value = n.partition(":")
        if kind == "dns":
            out.append(x509.DNSName(value))
        elif kind == "ip":
            out.append(x509.IPAddress(ipaddress.ip_address(value)))
        elif kind == "email":
            out.append(x509.RFC822Name(value))
        else:
            out.append(x509.UniformResourceIdentifier(value))
    return x509.SubjectAlternativeName(out)


def make_csr(
    key: LeafKey,
    cn: str = "nas.example.com",
    sans: tuple[str, ...] = ("dns:nas.example.com",),
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
    )
    if sans:
        builder = builder.add_extension(san_of(*sans), critical=False)
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


class PkilintLoadError(AssertionError):
    """pkilint could not read the document at all, so it has not been linted."""


def pkilint(kind: str, der: bytes, tmp: Path) -> str:
    """Run pkilint's linter on `der` in-process; returns findings at WARNING or above,
    "" only when pkilint read the whole document and found nothing.

    pkilint's command-line mains print a load failure to stderr and return 1, which
    looks like one finding with an empty report: the document is loaded here first,
    with the loader those mains use, and a failure raises PkilintLoadError. Anything
    on stderr, or a finding count without a report, raises too."""
    from pkilint import loader
    from pkilint.bin import lint_crl, lint_ocsp_response, lint_pkix_cert

    loaders: dict[str, loader.DocumentLoader] = {
        "cert": loader.RFC5280CertificateDocumentLoader(),
        "crl": loader.RFC5280CertificateListDocumentLoader(),
        "ocsp": loader.RFC6960OCSPResponseDocumentLoader(),
    }
    if kind not in loaders:
        raise ValueError(f"unknown document kind {kind!r}")
    try:
        loaders[kind].load_der_document(der, kind)
    except Exception as exc:  # pyasn1 raises its own errors as well as ValueError
        raise PkilintLoadError(f"pkilint cannot load this {kind}: {exc}") from exc
    path = tmp / f"doc-{kind}-{datetime.datetime.now().timestamp()}.der"
    path.write_bytes(der)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if kind == "cert":
            count = lint_pkix_cert.main(["lint", "-s", "WARNING", str(path)])
        elif kind == "crl":
            count = lint_crl.main(["lint", "-t", "CRL", "-p", "PKIX", "-s", "WARNING", str(path)])
        else:
            count = lint_ocsp_response.main(["lint", "-s", "WARNING", str(path)])
    text = out.getvalue().strip()
    if err.getvalue().strip():
        raise PkilintLoadError(f"pkilint reported on stderr: {err.getvalue().strip()}")
    if count and not text:
        raise PkilintLoadError(f"pkilint counted {count} findings but reported none")
    return text if count else ""
