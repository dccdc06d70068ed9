"""Checks TPM key-attestation evidence (TPM2_Certify) without a TPM and without tpm2-pytss.

`kmsctl key attest` runs on an administrator's machine, so everything here is parsing
of the TPM's wire structures and software signature checks. The evidence proves a key
lives in a given TPM when all of these hold:

* the attestation key (AK) is the one pinned for that TPM (`expected_ak_der`): the KMS
  reports which AK it used, but only the pin makes it mean "this TPM";
* the AK's ECDSA signature covers the TPMS_ATTEST bytes exactly;
* TPMS_ATTEST starts with TPM_GENERATED_VALUE and is of type TPM_ST_ATTEST_CERTIFY: a
  restricted AK signs such bytes only when the TPM made them itself;
* extraData equals the caller's fresh nonce (no replay);
* the certified name equals nameAlg || H(TPMT_PUBLIC) of the public area supplied;
* that public area says fixedTPM and fixedParent (created in this TPM, never to leave it)
  and sensitiveDataOrigin, and its key is the registry's public key.

Every failure is a FailedPrecondition with a stable `reason` under "attest.".
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.tpmwire import TpmReader
from edgekms.v1 import common_pb2 as pb

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_ECC = 0x0023
ALG_ECDAA = 0x001A

ATTR_FIXED_TPM = 0x00000002
ATTR_FIXED_PARENT = 0x00000010
ATTR_SENSITIVE_DATA_ORIGIN = 0x00000020
ATTR_RESTRICTED = 0x00010000
ATTR_SIGN = 0x00040000

_NAME_HASHES = {
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


def _reader(data: bytes, what: str) -> TpmReader:
    """A cursor whose short or trailing data is attest.malformed (FailedPrecondition)."""
    return TpmReader(data, what, lambda message: _bad("malformed", message))


@dataclass(frozen=True)
class CertifyInfo:
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    name: bytes
    qualified_name: bytes


def parse_attest(data: bytes) -> CertifyInfo:
    """TPMS_ATTEST of a TPM2_Certify; other attestation types are refused."""
    r = _reader(data, "TPMS_ATTEST")
    magic = r.u32()
    if magic != TPM_GENERATED_VALUE:
        raise _bad("not_tpm_generated", f"magic is {magic:#x}, not TPM_GENERATED_VALUE")
    st = r.u16()
    if st != TPM_ST_ATTEST_CERTIFY:
        raise _bad("wrong_type", f"attestation type {st:#x} is not TPM_ST_ATTEST_CERTIFY")
    signer = r.tpm2b()
    extra = r.tpm2b()
    clock, reset, restart, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    name = r.tpm2b()
    qname = r.tpm2b()
    r.end()
    return CertifyInfo(
        magic, st, signer, extra, clock, reset, restart, bool(safe), firmware, name, qname
    )


@dataclass(frozen=True)
class PublicArea:
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    public_key_der: bytes

    @property
    def fixed_tpm(self) -> bool:
        return bool(self.attributes & ATTR_FIXED_TPM)

    @property
    def fixed_parent(self) -> bool:
        return bool(self.attributes & ATTR_FIXED_PARENT)


def _skip_scheme(r: TpmReader) -> None:
    alg = r.u16()
    if alg != ALG_NULL:
        r.u16()  # hashAlg
        if alg == ALG_ECDAA:
            r.u16()  # count


def parse_public(data: bytes) -> PublicArea:
    """TPMT_PUBLIC of an RSA or ECC key, with its key as SubjectPublicKeyInfo DER."""
    r = _reader(data, "TPMT_PUBLIC")
    key_type, name_alg, attrs = r.u16(), r.u16(), r.u32()
    policy = r.tpm2b()
    sym = r.u16()
    if sym != ALG_NULL:
        r.u16()  # keyBits
        r.u16()  # mode
    _skip_scheme(r)
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if key_type == ALG_RSA:
            r.u16()  # keyBits
            exponent = r.u32() or 65537
            modulus = int.from_bytes(r.tpm2b(), "big")
            key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        elif key_type == ALG_ECC:
            curve_id = r.u16()
            _skip_scheme(r)  # kdf
            x, y = r.tpm2b(), r.tpm2b()
            curve = _CURVES.get(curve_id)
            if curve is None:
                raise _bad("unsupported_key", f"ECC curve {curve_id:#x} is not supported")
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        else:
            raise _bad("unsupported_key", f"key type {key_type:#x} is not RSA or ECC")
    except ValueError as exc:
        raise _bad("malformed", f"TPMT_PUBLIC holds no valid public key: {exc}") from None
    r.end()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicArea(key_type, name_alg, attrs, policy, der)


def object_name(public_area: bytes) -> bytes:
    """A TPM object's name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
    if len(public_area) < 4:
        raise _bad("malformed", "TPMT_PUBLIC is truncated")
    name_alg = struct.unpack(">H", public_area[2:4])[0]
    hash_name = _NAME_HASHES.get(name_alg)
    if hash_name is None:
        raise _bad("unsupported_key", f"name algorithm {name_alg:#x} is not supported")
    return public_area[2:4] + hashlib.new(hash_name, public_area).digest()


_SIG_HASHES: dict[int, hashes.HashAlgorithm] = {
    pb.SIGNATURE_ALGORITHM_ECDSA_SHA256: hashes.SHA256(),
    pb.SIGNATURE_ALGORITHM_ECDSA_SHA384: hashes.SHA384(),
    pb.SIGNATURE_ALGORITHM_ECDSA_SHA512: hashes.SHA512(),
}


def _same_key(a_der: bytes, b_der: bytes) -> bool:
    """Compare two SPKIs by their key, not their bytes (encodings of one key may differ)."""

    def norm(der: bytes) -> bytes:
        key = serialization.load_der_public_key(der)
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    try:
        return norm(a_der) == norm(b_der)
    except ValueError:
        return False


@dataclass(frozen=True)
class VerifiedAttestation:
    info: CertifyInfo
    public: PublicArea


def verify_certify(
    *,
    attestation: bytes,
    signature: bytes,
    signature_algorithm: int,
    attestation_key_der: bytes,
    key_public_area: bytes,
    nonce: bytes,
    expected_public_key_der: bytes,
    expected_ak_der: bytes,
) -> VerifiedAttestation:
    """Check TPM2_Certify evidence (see the module docstring); returns what it proved.

    `expected_ak_der` is the AK pinned for the device at enrollment; `nonce` is the
    fresh value the verifier sent; `expected_public_key_der` comes from the key registry.
    """
    if not nonce:
        raise InvalidArgument("attest.nonce_missing", "a verifier nonce is required")
    if not _same_key(attestation_key_der, expected_ak_der):
        raise _bad("ak_mismatch", "the attestation key is not the one pinned for this TPM")
    hash_alg = _SIG_HASHES.get(signature_algorithm)
    if hash_alg is None:
        raise _bad("signature_algorithm", "the AK signature is not ECDSA")
    ak = serialization.load_der_public_key(attestation_key_der)
    if not isinstance(ak, ec.EllipticCurvePublicKey):
        raise _bad("ak_type", "the attestation key is not an EC key")
    try:
        ak.verify(signature, attestation, ec.ECDSA(hash_alg))
    except (InvalidSignature, ValueError):
        raise _bad("bad_signature", "the AK signature over TPMS_ATTEST does not verify") from None
    info = parse_attest(attestation)
    if info.extra_data != nonce:
        raise _bad("nonce_mismatch", "the evidence answers another nonce (stale or replayed)")
    if info.name != object_name(key_public_area):
        raise _bad("name_mismatch", "the certified object is not the key whose area was sent")
    public = parse_public(key_public_area)
    missing = [
        flag
        for flag, bit in (
            ("fixedTPM", ATTR_FIXED_TPM),
            ("fixedParent", ATTR_FIXED_PARENT),
            ("sensitiveDataOrigin", ATTR_SENSITIVE_DATA_ORIGIN),
        )
        if not public.attributes & bit
    ]
    if missing:
        raise _bad("not_fixed", f"the key lacks {', '.join(missing)}: it may exist outside the TPM")
    if not _same_key(public.public_key_der, expected_public_key_der):
        raise _bad("key_mismatch", "the certified key is not the registry's public key")
    return VerifiedAttestation(info, public)
