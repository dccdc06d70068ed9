"""The verifier's half of TPM-attested enrollment, in software: no TPM, no tpm2-pytss.

The broker runs this (it must stay free of native TPM libraries), so everything here is
parsing of TPM wire structures and `cryptography`:

* `parse_public`: a TPMT_PUBLIC (an EK's or an AK's) with what MakeCredential needs
  (name algorithm, the storage key's symmetric cipher) and its key as SPKI DER;
* `ek_identity`: a device's identity, SHA-256 of its EK's SubjectPublicKeyInfo DER (the
  same from the EK certificate or from the EK's public area);
* `verify_ek_certificate`: the EK certificate chains to one of the manufacturer CAs;
* `check_ak`: an AK public area is a restricted signing key made in its TPM, so what it
  signs (TPMS_ATTEST) was made by the TPM itself;
* `make_credential`: TPM2_MakeCredential (TPM 2.0 Part 1 §24: a seed encrypted to the EK,
  KDFa-derived AES-CFB key and HMAC key, bound to the AK's name). Only the TPM holding
  that EK, and holding an object with that exact name, returns the credential from
  TPM2_ActivateCredential;
* `verify_certify`: the AK's TPM2_Certify of a device key over the challenge's nonce.

Every refusal is a typed error whose reason starts with "attest.".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 43 keeps CFB among the "decrepit" modes
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from edgekms.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from edgekms.tpmwire import TpmReader

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017
TPM_ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_AES = 0x0006
ALG_CFB = 0x0043

ATTR_FIXED_TPM = 0x00000002
ATTR_FIXED_PARENT = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN = 0x00000020
ATTR_RESTRICTED = 0x00010000
ATTR_DECRYPT = 0x00020000
ATTR_SIGN = 0x00040000

MAX_STRUCT = 4096  # no TPM structure we take is longer; a bigger one is refused unread
MAX_CHAIN = 5

_HASHES: dict[int, str] = {
    ALG_SHA1: "sha1",
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
}
_CURVES: dict[int, ec.EllipticCurve] = {
    0x0003: ec.SECP256R1(),
    0x0004: ec.SECP384R1(),
    0x0005: ec.SECP521R1(),
}


def _bad(reason: str, message: str) -> FailedPrecondition:
    return FailedPrecondition("attest." + reason, message)


def _malformed(message: str) -> InvalidArgument:
    return InvalidArgument("attest.malformed", message)


def _reader(data: bytes, what: str) -> TpmReader:
    """A cursor whose short, trailing or over-long data is attest.malformed
    (InvalidArgument): what a device sent, refused unread past MAX_STRUCT."""
    return TpmReader(data, what, _malformed, MAX_STRUCT)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC (RSA or ECC)."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    sym_alg: int
    sym_bits: int
    sym_mode: int
    scheme: int
    scheme_hash: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def public_key_der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def name(self) -> bytes:
        """nameAlg || H_nameAlg(TPMT_PUBLIC): what the TPM calls this object."""
        return (
            struct.pack(">H", self.name_alg)
            + hashlib.new(_HASHES[self.name_alg], self.raw).digest()
        )

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits


def _scheme(r: TpmReader) -> tuple[int, int]:
    alg = r.u16()
    hash_alg = 0
    if alg != ALG_NULL:
        hash_alg = r.u16()
        if alg == ALG_ECDAA:
            r.u16()  # count
    return alg, hash_alg


def parse_public(data: bytes, what: str = "TPMT_PUBLIC") -> TpmPublic:
    """TPMT_PUBLIC of an RSA or ECC key; other object types are refused."""
    r = _reader(data, what)
    key_type, name_alg, attrs = r.u16(), r.u16(), r.u32()
    if key_type not in (ALG_RSA, ALG_ECC):
        raise _bad("unsupported_key", f"{what}: key type {key_type:#x} is not RSA or ECC")
    if name_alg not in _HASHES:
        raise _bad("unsupported_key", f"{what}: name algorithm {name_alg:#x} is not supported")
    policy = r.tpm2b()
    sym_alg, sym_bits, sym_mode = r.u16(), 0, 0
    if sym_alg != ALG_NULL:
        sym_bits, sym_mode = r.u16(), r.u16()
    scheme, scheme_hash = _scheme(r)
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if key_type == ALG_RSA:
            r.u16()  # keyBits
            exponent = r.u32() or 65537
            modulus = int.from_bytes(r.tpm2b(), "big")
            key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        elif key_type == ALG_ECC:
            curve_id = r.u16()
            _scheme(r)  # kdf
            x, y = r.tpm2b(), r.tpm2b()
            curve = _CURVES.get(curve_id)
            if curve is None:
                raise _bad("unsupported_key", f"{what}: ECC curve {curve_id:#x} is not supported")
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        else:
            raise _bad("unsupported_key", f"{what}: key type {key_type:#x} is not RSA or ECC")
    except ValueError as exc:
        raise InvalidArgument("attest.malformed", f"{what} holds no valid key: {exc}") from None
    r.end()
    return TpmPublic(
        data,
        key_type,
        name_alg,
        attrs,
        policy,
        sym_alg,
        sym_bits,
        sym_mode,
        scheme,
        scheme_hash,
        key,
    )


def ek_identity(public_key_der: bytes) -> bytes:
    """A device's identity: SHA-256 of its EK's SubjectPublicKeyInfo (DER)."""
    key = serialization.load_der_public_key(public_key_der)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def check_ek(ek: TpmPublic) -> None:
    """An EK is a restricted decryption (storage) key made in its TPM, with the AES-CFB
    symmetric cipher MakeCredential encrypts the credential with."""
    if not ek.has(ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_RESTRICTED | ATTR_DECRYPT):
        raise _bad("ek_invalid", "the EK is not a fixed, restricted decryption key")
    if ek.has(ATTR_SIGN):
        raise _bad("ek_invalid", "the EK is a signing key")
    if ek.sym_alg != ALG_AES or ek.sym_mode != ALG_CFB or ek.sym_bits not in (128, 192, 256):
        raise _bad("ek_invalid", "the EK's symmetric cipher is not AES-CFB")


def check_ak(ak: TpmPublic) -> None:
    """The AK signs only what the TPM made (restricted), was made in this TPM and stays
    there (fixedTPM, fixedParent, sensitiveDataOrigin), and is ECDSA P-256/SHA-256."""
    need = (
        ATTR_FIXED_TPM
        | ATTR_FIXED_PARENT
        | ATTR_SENSITIVE_DATA_ORIGIN
        | ATTR_RESTRICTED
        | ATTR_SIGN
    )
    if not ak.has(need) or ak.has(ATTR_DECRYPT):
        raise _bad(
            "ak_invalid",
            "the AK is not a restricted signing key made in its TPM (fixedTPM, fixedParent, "
            "sensitiveDataOrigin, restricted, sign)",
        )
    if not isinstance(ak.key, ec.EllipticCurvePublicKey) or ak.key.curve.name != "secp256r1":
        raise _bad("ak_invalid", "the AK must be ECC P-256")
    if ak.name_alg != ALG_SHA256:
        raise _bad("ak_invalid", "the AK's name algorithm must be SHA-256")


def verify_ek_certificate(
    cert_der: bytes, anchors: list[x509.Certificate], intermediates: list[x509.Certificate]
) -> x509.Certificate:
    """The EK certificate, once it chains to one of `anchors` (the manufacturer CAs,
    self-signed or not: a CA in the bundle is trusted as given) within its validity.

    EK certificates do not follow the web PKI profile (empty subject, a critical SAN of
    TPM attributes), so the chain is walked here: each certificate's signature verified
    with its issuer's key, issuers found by name among the bundle, at most MAX_CHAIN deep.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise InvalidArgument("attest.ek_cert_malformed", "the EK certificate is not DER") from None
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    pool = anchors + intermediates
    current = cert
    for _ in range(MAX_CHAIN):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise _bad("ek_cert_expired", "a certificate of the EK's chain is not valid now")
        issuers = [c for c in pool if c.subject == current.issuer]
        found = None
        for issuer in issuers:
            try:
                current.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            found = issuer
            break
        if found is None:
            raise PermissionDenied(
                "attest.ek_untrusted",
                "the EK certificate does not chain to a configured manufacturer CA",
            )
        if any(found == a for a in anchors):
            return cert
        current = found
    raise PermissionDenied("attest.ek_untrusted", "the EK certificate's chain is too long")


def kdfa(
    hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa of TPM 2.0 Part 1 §11.4.10.2: SP 800-108 counter-mode HMAC."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key,
            struct.pack(">I", counter)
            + label
            + b"\0"
            + context_u
            + context_v
            + struct.pack(">I", bits),
            hash_name,
        ).digest()
    return out[: (bits + 7) // 8]


def kdfe(
    hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe of TPM 2.0 Part 1 §11.4.10.3: SP 800-56A concatenation KDF over the ECDH x."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(
            hash_name, struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v
        ).digest()
    return out[: (bits + 7) // 8]


IDENTITY = b"IDENTITY"


def _seed(ek: TpmPublic) -> tuple[bytes, bytes]:
    """(seed, encrypted seed) for a secret to `ek` with label IDENTITY (Part 1 Annex B/C)."""
    hash_name = _HASHES[ek.name_alg]
    digest_size = hashlib.new(hash_name).digest_size
    if isinstance(ek.key, rsa.RSAPublicKey):
        seed = os.urandom(digest_size)
        algorithm = getattr(hashes, hash_name.upper())()
        encrypted = ek.key.encrypt(
            seed,
            padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=IDENTITY + b"\0"),
        )
        return seed, encrypted
    curve = ek.key.curve
    size = (curve.key_size + 7) // 8
    ephemeral = ec.generate_private_key(curve)
    z = ephemeral.exchange(ec.ECDH(), ek.key)
    point = ephemeral.public_key().public_numbers()
    ek_x = ek.key.public_numbers().x.to_bytes(size, "big")
    eph_x, eph_y = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
    seed = kdfe(hash_name, z, IDENTITY, eph_x, ek_x, digest_size * 8)
    return seed, _tpm2b(eph_x) + _tpm2b(eph_y)


def make_credential(ek: TpmPublic, credential: bytes, ak_name: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (TPMS_ID_OBJECT, encrypted secret), the two
    buffers TPM2_ActivateCredential takes (as the contents of TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET)."""
    check_ek(ek)
    if not 1 <= len(credential) <= 64:
        raise InvalidArgument("attest.credential_size", "a credential is 1 to 64 bytes")
    hash_name = _HASHES[ek.name_alg]
    digest_size = hashlib.new(hash_name).digest_size
    seed, encrypted_seed = _seed(ek)
    sym_key = kdfa(hash_name, seed, b"STORAGE", ak_name, b"", ek.sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(_tpm2b(credential)) + encryptor.finalize()
    hmac_key = kdfa(hash_name, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    integrity = hmac.new(hmac_key, enc_identity + ak_name, hash_name).digest()
    return _tpm2b(integrity) + enc_identity, encrypted_seed


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST (Certify or Quote)."""

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    # Certify: the certified object's name. Quote: the PCR selection (sha256 bank
    # indexes) and the digest of their values.
    name: bytes = b""
    pcr_bank: int = 0
    pcrs: tuple[int, ...] = ()
    pcr_digest: bytes = b""


def parse_attest(data: bytes) -> Attest:
    """TPMS_ATTEST of a TPM2_Certify or TPM2_Quote (one PCR bank); others refused."""
    r = _reader(data, "TPMS_ATTEST")
    magic = r.u32()
    if magic != TPM_GENERATED_VALUE:
        raise _bad("not_tpm_generated", f"magic is {magic:#x}, not TPM_GENERATED_VALUE")
    st = r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, reset, restart, safe = r.u64(), r.u32(), r.u32(), r.u8()
    r.u64()  # firmwareVersion
    if st == TPM_ST_ATTEST_CERTIFY:
        name = r.tpm2b()
        r.tpm2b()  # qualifiedName
        r.end()
        return Attest(st, signer, extra, clock, reset, restart, bool(safe), name=name)
    if st == TPM_ST_ATTEST_QUOTE:
        count = r.u32()
        if count != 1:
            raise _bad("quote_banks", "a quote must cover exactly one PCR bank")
        bank = r.u16()
        select = r.take(r.u8())
        pcrs = tuple(i for i in range(len(select) * 8) if select[i // 8] >> (i % 8) & 1)
        digest = r.tpm2b()
        r.end()
        return Attest(
            st,
            signer,
            extra,
            clock,
            reset,
            restart,
            bool(safe),
            pcr_bank=bank,
            pcrs=pcrs,
            pcr_digest=digest,
        )
    raise _bad("wrong_type", f"attestation type {st:#x} is not Certify or Quote")


def verify_signed(ak: TpmPublic, attest: bytes, signature_der: bytes) -> Attest:
    """The AK's ECDSA-SHA256 signature (DER) over TPMS_ATTEST, then the structure parsed."""
    if not isinstance(ak.key, ec.EllipticCurvePublicKey):
        raise _bad("ak_invalid", "the AK is not an EC key")
    try:
        ak.key.verify(signature_der, attest, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise _bad("bad_signature", "the AK's signature over TPMS_ATTEST does not verify") from None
    return parse_attest(attest)


def verify_certify(
    ak: TpmPublic, attest: bytes, signature_der: bytes, key_public: bytes, nonce: bytes
) -> TpmPublic:
    """The AK certified `key_public` over `nonce`, and that key never leaves its TPM.

    Returns the certified key's public area."""
    info = verify_signed(ak, attest, signature_der)
    if info.type != TPM_ST_ATTEST_CERTIFY:
        raise _bad("wrong_type", "the evidence is not a TPM2_Certify")
    if not hmac.compare_digest(info.extra_data, nonce):
        raise _bad("nonce_mismatch", "the certification answers another nonce")
    key = parse_public(key_public, "the device key's TPMT_PUBLIC")
    if not hmac.compare_digest(info.name, key.name):
        raise _bad("name_mismatch", "the certified object is not the key whose area was sent")
    if not key.has(ATTR_FIXED_TPM | ATTR_FIXED_PARENT | ATTR_SENSITIVE_DATA_ORIGIN):
        raise _bad(
            "not_fixed",
            "the device key lacks fixedTPM, fixedParent or sensitiveDataOrigin: it may exist "
            "outside the TPM",
        )
    return key
