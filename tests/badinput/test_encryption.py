"""Bad Encrypt / Decrypt / GenerateDataKey / RotateKey requests through the broker of a
real `kmsctl up` stack (SoftHSM), one case each. Every refusal is a typed error, is
audited with its reason, and leaves the keys as they were (same version, still
decrypting what they made)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from edgekms import envelope, errors
from edgekms.algorithms import MAX_AAD, MAX_PLAINTEXT
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from tests.e2e.conftest import KmsStack
from tests.e2e.test_broker import _client_with, issue_client_cert
from tests.e2e.test_encryption import audit_bytes, audit_entries

AES = "badinput/enc-aes"
OTHER_AES = "badinput/enc-aes-other"
RSA = "badinput/enc-rsa"
SIGNING = "badinput/enc-signing"
GUARDED = "badinput/enc-guarded"
AAD = b"volume=data"
SECRET = b"the passphrase of volume data"
MALFORMED = envelope.MALFORMED


@pytest.fixture(scope="module")
def kms(kms_stack: KmsStack) -> Iterator[KMSClient]:
    encrypt = pb.KeyOptions(usage=pb.KEY_USAGE_ENCRYPT_DECRYPT)
    with kms_stack.client(timeout=60) as client:
        for name, key_type, options, policy in (
            (AES, "aes-256", None, None),
            (OTHER_AES, "aes-256", None, None),
            (RSA, "rsa-2048", encrypt, None),
            (SIGNING, "ec-p256", None, None),
            # Signers may only encrypt with it: decrypting is someone else's job.
            (
                GUARDED,
                "aes-256",
                None,
                pb.KeyPolicy(
                    rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KEY_OPERATION_ENCRYPT])]
                ),
            ),
        ):
            try:
                client.get_key(name)
            except errors.NotFound:
                client.create_key(name, key_type, options=options, policy=policy)
        yield client


@pytest.fixture(scope="module")
def sealed(kms: KMSClient) -> bytes:
    return kms.encrypt(AES, SECRET, aad=AAD).ciphertext


def _unchanged(kms: KMSClient, sealed: bytes) -> None:
    """What every refusal must leave: the key at version 1, its ciphertext still good."""
    assert kms.get_key(AES).version == 1
    assert kms.decrypt(sealed, aad=AAD) == SECRET


def _edit(sealed: bytes, **changes: object) -> bytes:
    return replace(envelope.decode(sealed), **changes).encode()  # type: ignore[arg-type]


def _flip_last_byte(sealed: bytes) -> bytes:
    return sealed[:-1] + bytes((sealed[-1] ^ 0x01,))


DECRYPT_CASES: dict[str, tuple[Callable[[bytes], bytes], bytes, str, str]] = {
    "tampered_ciphertext": (lambda s: _flip_last_byte(s), AAD, "", "decrypt.failed"),
    "tampered_nonce": (
        lambda s: _edit(s, nonce=bytes(12)),
        AAD,
        "",
        "decrypt.failed",
    ),
    "wrong_aad": (lambda s: s, b"volume=other", "", "decrypt.failed"),
    "aad_left_out": (lambda s: s, b"", "", "decrypt.failed"),
    "header_renamed_to_another_key": (
        lambda s: _edit(s, key_name=OTHER_AES),
        AAD,
        "",
        "decrypt.failed",
    ),
    "ciphertext_for_another_key": (lambda s: s, AAD, OTHER_AES, "decrypt.key_mismatch"),
    "unknown_version": (
        lambda s: _edit(s, key_version=7),
        AAD,
        "",
        "key.version_not_found",
    ),
    "algorithm_byte_changed": (
        lambda s: _edit(s, algorithm=pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256),
        AAD,
        "",
        "decrypt.algorithm_mismatch",
    ),
    "truncated_to_the_header": (
        lambda s: s[: len(s) - 40],
        AAD,
        "",
        "decrypt.failed",
    ),
    "garbage": (lambda s: b"\x00garbage, not an envelope" * 3, AAD, "", MALFORMED),
    "empty": (lambda s: b"", AAD, "", MALFORMED),
    "header_names_signing_key": (
        lambda s: _edit(s, key_name=SIGNING),
        AAD,
        "",
        "key.usage_mismatch",
    ),
    "header_names_absent_key": (
        lambda s: _edit(s, key_name="badinput/no-such-key"),
        AAD,
        "",
        "key.not_found",
    ),
}


@pytest.mark.parametrize("case", sorted(DECRYPT_CASES))
def test_bad_decrypt_is_refused_and_changes_nothing(
    kms: KMSClient, sealed: bytes, case: str
) -> None:
    edit, aad, name, reason = DECRYPT_CASES[case]
    with pytest.raises(errors.KMSError) as refused:
        kms.decrypt(edit(sealed), aad=aad, name=name)
    assert refused.value.reason == reason, refused.value
    assert isinstance(refused.value, errors.InvalidArgument | errors.NotFound), refused.value
    _unchanged(kms, sealed)


ENCRYPT_CASES = {
    "signing_key_used_to_encrypt": (SIGNING, b"x", b"", "key.usage_mismatch"),
    "plaintext_over_64_kib": (AES, bytes(MAX_PLAINTEXT + 1), b"", "encrypt.plaintext_too_large"),
    "aad_over_8_kib": (AES, b"x", bytes(MAX_AAD + 1), "encrypt.aad_too_large"),
    "rsa_plaintext_over_the_oaep_block": (RSA, bytes(191), b"", "encrypt.plaintext_too_large"),
    "absent_key": ("badinput/no-such-key", b"x", b"", "key.not_found"),
}


@pytest.mark.parametrize("case", sorted(ENCRYPT_CASES))
def test_bad_encrypt_is_refused_and_changes_nothing(
    kms: KMSClient, sealed: bytes, case: str
) -> None:
    name, plaintext, aad, reason = ENCRYPT_CASES[case]
    with pytest.raises(errors.KMSError) as refused:
        kms.encrypt(name, plaintext, aad=aad)
    assert refused.value.reason == reason, refused.value
    _unchanged(kms, sealed)


def test_plaintext_of_exactly_64_kib_is_accepted(kms: KMSClient) -> None:
    data = bytes(range(256)) * (MAX_PLAINTEXT // 256)
    assert kms.decrypt(kms.encrypt(AES, data).ciphertext) == data


def test_encryption_key_refuses_to_sign(kms: KMSClient, sealed: bytes) -> None:
    with pytest.raises(errors.KMSError) as refused:
        kms.sign(RSA, b"data", algorithm="rsa-pkcs1-sha256")
    assert refused.value.reason == "key.usage_mismatch"
    _unchanged(kms, sealed)


def test_aes_key_has_no_public_key(kms: KMSClient) -> None:
    with pytest.raises(errors.FailedPrecondition) as refused:
        kms.get_public_key(AES)
    assert refused.value.reason == "key.no_public_key"


def test_signing_key_is_not_rotated(kms: KMSClient) -> None:
    with pytest.raises(errors.FailedPrecondition) as refused:
        kms.rotate_key(SIGNING)
    assert refused.value.reason == "key.rotate_unsupported"
    assert kms.get_key(SIGNING).version == 1


def test_ec_key_cannot_be_made_for_encryption(kms: KMSClient) -> None:
    options = pb.KeyOptions(usage=pb.KEY_USAGE_ENCRYPT_DECRYPT)
    with pytest.raises(errors.InvalidArgument) as refused:
        kms.create_key("badinput/enc-ec", "ec-p256", options=options)
    assert refused.value.reason == "key.usage_unsupported"
    with pytest.raises(errors.NotFound):
        kms.get_key("badinput/enc-ec")


def test_disabled_key_decrypts_nothing(kms: KMSClient) -> None:
    made = kms.encrypt(OTHER_AES, b"kept")
    kms.disable_key(OTHER_AES)
    try:
        with pytest.raises(errors.FailedPrecondition) as refused:
            kms.decrypt(made.ciphertext)
        assert refused.value.reason == "key.disabled"
    finally:
        kms.enable_key(OTHER_AES)
    assert kms.decrypt(made.ciphertext) == b"kept"


def test_caller_without_the_permission_is_refused_and_audited(
    kms_stack: KmsStack, kms: KMSClient, sealed: bytes
) -> None:
    cert, key = issue_client_cert(kms_stack, "badinput-enc-signer", "signer")
    with _client_with(kms_stack, cert, key) as signer:
        # The key policy grants signers encrypt only (and binds the admin too, as for Sign).
        guarded = signer.encrypt(GUARDED, b"for the right decrypter").ciphertext
        with pytest.raises(errors.PermissionDenied) as denied:
            signer.decrypt(guarded)
        assert denied.value.reason == "authz.policy_denied"
        with pytest.raises(errors.PermissionDenied) as no_rotate:
            signer.rotate_key(AES)
        assert no_rotate.value.reason == "authz.role_denied"
    cert, key = issue_client_cert(kms_stack, "badinput-enc-operator", "operator")
    with _client_with(kms_stack, cert, key) as operator:
        with pytest.raises(errors.PermissionDenied) as role:
            operator.decrypt(sealed, aad=AAD)
        assert role.value.reason == "authz.role_denied"
    _unchanged(kms, sealed)
    out = audit_bytes(kms_stack)
    refusals = {
        (e["action"], e["target"], e["outcome"], e["actor"]["client"]) for e in audit_entries(out)
    }
    assert ("Decrypt", GUARDED, "authz.policy_denied", "badinput-enc-signer") in refusals
    assert ("Decrypt", "", "authz.role_denied", "badinput-enc-operator") in refusals
    assert SECRET not in out
