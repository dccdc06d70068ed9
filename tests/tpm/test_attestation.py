"""Key attestation: TPM2_Certify evidence from swtpm verified by mgmt.attestation, and
forgeries of every kind rejected with the reason that names the flaw."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from crypto_service.providers.base import Attestation, KeyCreateOptions
from crypto_service.providers.tpm2 import Tpm2Provider
from edgekms.errors import FailedPrecondition
from edgekms.v1 import common_pb2 as pb
from mgmt.attestation import (
    ATTR_FIXED_PARENT,
    ATTR_FIXED_TPM,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_CERTIFY,
    object_name,
    parse_attest,
    parse_public,
    verify_certify,
)

pytestmark = pytest.mark.tpm


def check(att: Attestation, nonce: bytes, key_der: bytes, ak_der: bytes) -> None:
    verify_certify(
        attestation=att.attestation,
        signature=att.signature,
        signature_algorithm=att.signature_algorithm,
        attestation_key_der=att.attestation_key_der,
        key_public_area=att.key_public_area,
        nonce=nonce,
        expected_public_key_der=key_der,
        expected_ak_der=ak_der,
    )


def reason(att: Attestation, nonce: bytes, key_der: bytes, ak_der: bytes) -> str:
    with pytest.raises(FailedPrecondition) as exc:
        check(att, nonce, key_der, ak_der)
    return exc.value.reason


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def test_attestation_verifies_and_forgeries_fail(provider: Tpm2Provider) -> None:
    ak_der = provider.attestation_key()
    assert provider.attestation_key() == ak_der  # an endorsement primary: stable per TPM
    key_id, other_id = secrets.token_bytes(16), secrets.token_bytes(16)
    key_der = provider.generate(
        key_id, "att", pb.KEY_TYPE_RSA_2048, KeyCreateOptions(require_auth=True)
    ).public_key_der
    other_der = provider.generate(
        other_id, "other", pb.KEY_TYPE_EC_P256, KeyCreateOptions(pcr_indexes=(7,))
    ).public_key_der
    nonce = secrets.token_bytes(32)
    att = provider.attest(key_id, nonce)
    assert att.format == "tpm2" and att.attestation_key_der == ak_der
    check(att, nonce, key_der, ak_der)
    info = parse_attest(att.attestation)
    assert info.magic == TPM_GENERATED_VALUE and info.type == TPM_ST_ATTEST_CERTIFY
    assert info.extra_data == nonce
    area = parse_public(att.key_public_area)
    assert area.fixed_tpm and area.fixed_parent

    other_att = provider.attest(other_id, nonce)  # a PCR-bound key attests too
    check(other_att, nonce, other_der, ak_der)

    # Stale nonce, tampered bytes, another key's area, another registry key, another AK.
    assert reason(att, secrets.token_bytes(32), key_der, ak_der) == "attest.nonce_mismatch"
    flipped = bytearray(att.attestation)
    flipped[-1] ^= 1
    tampered = dataclasses.replace(att, attestation=bytes(flipped))
    assert reason(tampered, nonce, key_der, ak_der) == "attest.bad_signature"
    swapped = dataclasses.replace(att, key_public_area=other_att.key_public_area)
    assert reason(swapped, nonce, other_der, ak_der) == "attest.name_mismatch"
    assert reason(att, nonce, other_der, ak_der) == "attest.key_mismatch"
    software_ak = ec.generate_private_key(ec.SECP256R1())
    soft_ak_der = software_ak.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert reason(att, nonce, key_der, soft_ak_der) == "attest.ak_mismatch"

    # A forger with a software "AK" builds evidence for a key that lacks fixedTPM.
    area_bytes = bytearray(att.key_public_area)
    attrs = struct.unpack(">I", area_bytes[4:8])[0] & ~(ATTR_FIXED_TPM | ATTR_FIXED_PARENT)
    area_bytes[4:8] = struct.pack(">I", attrs)
    forged_area = bytes(area_bytes)
    body = (
        struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY)
        + tpm2b(b"\x00\x0b" + hashlib.sha256(b"signer").digest())
        + tpm2b(nonce)
        + struct.pack(">QIIBQ", 1, 0, 0, 1, 0)
        + tpm2b(object_name(forged_area))
        + tpm2b(object_name(forged_area))
    )
    forged = Attestation(
        format="tpm2",
        attestation=body,
        signature=software_ak.sign(body, ec.ECDSA(hashes.SHA256())),
        signature_algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        attestation_key_der=soft_ak_der,
        key_public_area=forged_area,
    )
    assert reason(forged, nonce, key_der, ak_der) == "attest.ak_mismatch"
    # Even if that software AK were wrongly pinned, the key's attributes betray it.
    assert reason(forged, nonce, key_der, soft_ak_der) == "attest.not_fixed"

    wrong_magic = dataclasses.replace(forged, attestation=b"\x00" * 4 + body[4:])
    wrong_magic = dataclasses.replace(
        wrong_magic,
        signature=software_ak.sign(wrong_magic.attestation, ec.ECDSA(hashes.SHA256())),
    )
    assert reason(wrong_magic, nonce, key_der, soft_ak_der) == "attest.not_tpm_generated"
    truncated = body[:20]
    short = dataclasses.replace(
        forged,
        attestation=truncated,
        signature=software_ak.sign(truncated, ec.ECDSA(hashes.SHA256())),
    )
    assert reason(short, nonce, key_der, soft_ak_der) == "attest.malformed"
    provider.destroy(key_id)
    provider.destroy(other_id)
