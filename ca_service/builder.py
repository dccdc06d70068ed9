"""Builds the CA's certificates (root, intermediate, leaves) with cryptography's builder.

Signer-agnostic: the CA key is any cryptography private-key object, in production a
edgekms.remote_key RemoteKey whose signatures come from the token. Nothing here does I/O
except through that key's sign().
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from ca_service.policy import IssuePlan, PublicKey
from edgekms.durations import backdate_for, format_ttl
from edgekms.errors import FailedPrecondition

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Leaves start a little in the past so that a relying party whose clock lags accepts them.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CaUrls:
    """Where relying parties fetch revocation data and the issuer: put into every leaf
    (CRL distribution point, AIA OCSP and caIssuers) when set."""

    crl: str = ""
    ocsp: str = ""
    ca_issuers: str = ""
    # What the intermediate itself carries: the root's CRL and certificate.
    root_crl: str = ""
    root_issuers: str = ""
    base: str = ""

    @classmethod
    def from_base(cls, base_url: str) -> CaUrls:
        if not base_url:
            return cls()
        base = base_url.rstrip("/")
        return cls(
            crl=f"{base}/crl",
            ocsp=f"{base}/ocsp",
            ca_issuers=f"{base}/ca.crt",
            root_crl=f"{base}/root.crl",
            root_issuers=f"{base}/root.crt",
            base=base,
        )

    def for_issuer(self, key_id: str) -> CaUrls:
        """The URLs a leaf of one intermediate carries: its issuer's own CRL and
        certificate (/crl/<KEYID>, /ca/<KEYID>.crt), which stay put after a rotation
        makes another intermediate the current one."""
        if not self.base:
            return self
        return dataclasses.replace(
            self, crl=f"{self.base}/crl/{key_id}", ca_issuers=f"{self.base}/ca/{key_id}.crt"
        )


def random_serial() -> int:
    """128 random bits, positive and non-zero (RFC 5280: at most 20 octets)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def serial_hex(serial: int) -> str:
    return f"{serial:X}"


def signing_hash(key: CAKey | PublicKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash a CA key signs with: SHA-384 for P-384, none for Ed25519, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    return hashes.SHA256()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def ca_name(common_name: str, organization: str = "") -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _ca_key_usage(digital_signature: bool = True) -> x509.KeyUsage:
    # digitalSignature too: the issuing CA signs OCSP responses itself.
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root(
    key: CAKey, subject: x509.Name, days: int, now: datetime.datetime | None = None
) -> x509.Certificate:
    now = now or _now()
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, signing_hash(key))


def build_intermediate(
    root_key: CAKey,
    root_cert: x509.Certificate,
    public_key: PublicKey,
    subject: x509.Name,
    days: int,
    now: datetime.datetime | None = None,
    name_constraints: x509.NameConstraints | None = None,
    urls: CaUrls = CaUrls(),
    spiffe_id: str = "",
) -> x509.Certificate:
    """An issuing CA under the root; `name_constraints` is marked critical (RFC 5280
    says it MUST be, so a verifier that cannot enforce it rejects the chain).

    With `spiffe_id` (a trust domain's ID, no path) it is an X.509-SVID signing
    certificate as the X509-SVID specification has it: that ID as its one URI SAN, and
    key usage keyCertSign and cRLSign only (digitalSignature is for leaves there; this
    CA signs no OCSP responses)."""
    now = now or _now()
    not_after = now - BACKDATE + datetime.timedelta(days=days)
    if not_after > root_cert.not_valid_after_utc:
        raise FailedPrecondition(
            "cert.validity_exceeds_issuer",
            "the intermediate would outlive the root",
            {"issuer_not_after": root_cert.not_valid_after_utc.isoformat()},
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(digital_signature=not spiffe_id), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(root_cert), critical=False)
    )
    if spiffe_id:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
        builder = builder.add_extension(san, critical=False)
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    # Where a strict verifier (openssl -crl_check_all) finds the root's CRL and the root.
    builder = _add_revocation_urls(builder, urls.root_crl, urls.ocsp, urls.root_issuers)
    return builder.sign(root_key, signing_hash(root_key))


def key_id_hex(cert: x509.Certificate) -> str:
    """A CA certificate's subject key identifier, upper-case hex: how records, URLs and
    the store name an intermediate."""
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex().upper()


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _leaf_key_usage(plan: IssuePlan) -> x509.KeyUsage:
    is_rsa = isinstance(plan.public_key, rsa.RSAPublicKey)
    is_ec = isinstance(plan.public_key, ec.EllipticCurvePublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=is_ec and plan.profile.key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_leaf(
    ca_key: CAKey,
    ca_cert: x509.Certificate,
    plan: IssuePlan,
    serial: int,
    urls: CaUrls = CaUrls(),
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """The end-entity certificate for an allowed plan (ca_service.policy)."""
    now = now or _now()
    # The whole validity period is the lifetime asked for; a short one is backdated less.
    backdate = datetime.timedelta(
        seconds=int(backdate_for(plan.validity, BACKDATE).total_seconds())
    )
    not_before = now - backdate
    not_after = not_before + plan.validity
    if not_after > ca_cert.not_valid_after_utc:
        raise FailedPrecondition(
            "cert.validity_exceeds_issuer",
            f"{format_ttl(plan.validity)} would outlive the issuing CA "
            f"(valid until {ca_cert.not_valid_after_utc.isoformat()})",
            {"issuer_not_after": ca_cert.not_valid_after_utc.isoformat()},
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(plan.subject)
        .issuer_name(ca_cert.subject)
        .public_key(plan.public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(plan), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(plan.profile.extended_key_usages)), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(plan.public_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if plan.san is not None:
        # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(plan.san, critical=len(plan.subject) == 0)
    builder = _add_revocation_urls(builder, urls.crl, urls.ocsp, urls.ca_issuers)
    return builder.sign(ca_key, signing_hash(ca_key))


def _add_revocation_urls(
    builder: x509.CertificateBuilder, crl: str, ocsp: str, ca_issuers: str
) -> x509.CertificateBuilder:
    """CRL distribution point and AIA (OCSP, caIssuers), each only when configured."""
    if crl:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    access = []
    if ocsp:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp)
            )
        )
    if ca_issuers:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(ca_issuers),
            )
        )
    if access:
        builder = builder.add_extension(x509.AuthorityInformationAccess(access), critical=False)
    return builder
