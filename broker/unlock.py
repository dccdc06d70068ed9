"""Remote unlock on the broker: secrets of TPM-attested devices, kept encrypted under a
KMS key with a release policy, and released against a fresh TPM2_Quote.

Release (the enrollment listener; the device has no client certificate at early boot):

1. BeginUnlock(device, volume): the device is attested (EK and AK recorded), not denied,
   and the volume has a secret; the answer is a one-time 32-byte nonce (the challenge
   book of broker.attest: single use, 60 s, rationed per address) and the PCRs the
   policy covers.
2. Unlock(challenge, quote, signature): the challenge is taken out (single use), the
   quote is verified with the device's pinned AK (signature, TPM-generated, a Quote, its
   nonce, exactly the policy's PCR selection of the sha256 bank, their digest), then
   the deny list, the EK identity and the time window again. Only then is the secret
   decrypted by its crypto service (AAD binds it to device and volume), wrapped under a
   one-time AES-256-GCM key, and that key is TPM2_MakeCredential'd to the device's EK
   for its AK: only that TPM can recover it.

Every attempt is audited by the caller's AuditScope (the enrollment listener's).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.attest import ChallengeBook
from edgekms import envelope, tpmcred
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edgekms.identity import CLIENT_NAME_RE
from edgekms.unlockpolicy import VOLUME_RE, secret_aad
from edgekms.v1 import crypto_pb2, enroll_pb2

PCR_BANK_SHA256 = tpmcred.ALG_SHA256
MAX_PCR = 23


def check_names(device: str, volume: str) -> None:
    if not CLIENT_NAME_RE.match(device):
        raise InvalidArgument("unlock.device_invalid", f"device {device[:80]!r} is not a name")
    if not VOLUME_RE.match(volume):
        raise InvalidArgument(
            "unlock.volume_invalid", f"volume {volume[:80]!r} must match {VOLUME_RE.pattern}"
        )


def _parse_time(value: str, field: str) -> datetime.datetime | None:
    if not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument("unlock.window_invalid", f"{field} is not RFC 3339") from None
    if when.tzinfo is None:
        raise InvalidArgument("unlock.window_invalid", f"{field} needs a time zone")
    return when


def check_policy(secret: enroll_pb2.UnlockSecret) -> None:
    """A policy that can be satisfied: PCRs 0..23, once each, a 32-byte digest with them,
    a window whose end is after its start."""
    pcrs = list(secret.pcrs)
    if any(p > MAX_PCR for p in pcrs) or len(set(pcrs)) != len(pcrs):
        raise InvalidArgument("unlock.pcrs_invalid", "PCRs are 0 to 23, each once")
    if pcrs and len(secret.pcr_digest) != 32:
        raise InvalidArgument(
            "unlock.pcr_digest_invalid", "a PCR policy needs the SHA-256 digest of their values"
        )
    if not pcrs and secret.pcr_digest:
        raise InvalidArgument("unlock.pcr_digest_invalid", "a PCR digest needs its PCRs")
    start = _parse_time(secret.not_before, "not_before")
    end = _parse_time(secret.not_after, "not_after")
    if start and end and end <= start:
        raise InvalidArgument("unlock.window_invalid", "not_after must be after not_before")
    if len(secret.ciphertext) > 70 * 1024 or not secret.ciphertext:
        raise InvalidArgument(
            "unlock.ciphertext_invalid", "the KMS ciphertext is missing or too big"
        )
    sealed = envelope.decode(secret.ciphertext)
    if sealed.key_name != secret.key_name:
        raise InvalidArgument(
            "unlock.ciphertext_invalid", "the ciphertext was not made with the key named"
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_window(secret: enroll_pb2.UnlockSecret) -> None:
    now = _now()
    start = _parse_time(secret.not_before, "not_before")
    end = _parse_time(secret.not_after, "not_after")
    if (start and now < start) or (end and now >= end):
        raise PermissionDenied(
            "unlock.outside_window",
            f"the secret is released only from {secret.not_before or '-'} "
            f"to {secret.not_after or '-'}",
        )


def attested_device(book: Any, name: str) -> enroll_pb2.Device:
    """The device, if it enrolled with its TPM and is not denied."""
    device: enroll_pb2.Device | None = book.devices.get(name)
    if device is None or not device.ek_sha256:
        raise NotFound("unlock.device_unknown", f"no TPM-attested device {name[:80]!r}")
    if book.is_denied(name):
        raise PermissionDenied("enroll.denied", f"device {name!r} is denied")
    return device


def begin(
    book: Any, challenges: ChallengeBook, request: enroll_pb2.BeginUnlockRequest, peer: str
) -> enroll_pb2.UnlockChallenge:
    check_names(request.device, request.volume)
    device = attested_device(book, request.device)
    secret = book.unlocks.get(f"{request.device}.{request.volume}")
    if secret is None:
        raise NotFound(
            "unlock.not_found", f"device {request.device!r} has no secret for {request.volume!r}"
        )
    challenges.ration(peer)
    challenge = challenges.issue(
        f"unlock:{request.device}.{request.volume}", device.ek_sha256, device.ak_public
    )
    expires = _now() + datetime.timedelta(seconds=challenges.ttl)
    return enroll_pb2.UnlockChallenge(
        challenge_id=challenge.id,
        nonce=challenge.nonce,
        pcrs=list(secret.pcrs),
        expires_at=expires.isoformat(timespec="seconds"),
    )


def verify_quote(
    device: enroll_pb2.Device,
    secret: enroll_pb2.UnlockSecret,
    nonce: bytes,
    quote: bytes,
    signature: bytes,
) -> None:
    """The device's pinned AK quoted exactly the policy's PCRs, at the policy's values,
    over this challenge's nonce."""
    ak = tpmcred.parse_public(device.ak_public, "the device's AK")
    info = tpmcred.verify_signed(ak, quote, signature)
    if info.type != tpmcred.TPM_ST_ATTEST_QUOTE:
        raise FailedPrecondition("attest.wrong_type", "the evidence is not a TPM2_Quote")
    if not hmac.compare_digest(info.extra_data, nonce):
        raise FailedPrecondition(
            "attest.nonce_mismatch", "the quote answers another nonce (stale or replayed)"
        )
    if info.pcr_bank != PCR_BANK_SHA256 or sorted(info.pcrs) != sorted(secret.pcrs):
        raise FailedPrecondition(
            "unlock.pcr_selection", "the quote does not cover exactly the policy's sha256 PCRs"
        )
    if secret.pcrs and not hmac.compare_digest(info.pcr_digest, secret.pcr_digest):
        raise FailedPrecondition(
            "unlock.pcr_mismatch",
            "the PCR values differ from the policy's: the boot chain is not the enrolled one",
        )


def verify_enrollment_pcrs(
    ak: tpmcred.TpmPublic, quote: bytes, signature: bytes, values: list[bytes], nonce: bytes
) -> dict[int, bytes]:
    """PCR values sent at attested enrollment, once the AK's quote over the challenge's
    nonce vouches for them: {pcr: value}."""
    info = tpmcred.verify_signed(ak, quote, signature)
    if info.type != tpmcred.TPM_ST_ATTEST_QUOTE:
        raise FailedPrecondition("attest.wrong_type", "the PCR evidence is not a TPM2_Quote")
    if not hmac.compare_digest(info.extra_data, nonce):
        raise FailedPrecondition("attest.nonce_mismatch", "the PCR quote answers another nonce")
    if info.pcr_bank != PCR_BANK_SHA256 or len(values) != len(info.pcrs):
        raise FailedPrecondition(
            "attest.pcr_values", "the PCR values do not match the quote's sha256 selection"
        )
    if any(len(v) != 32 for v in values) or not hmac.compare_digest(
        hashlib.sha256(b"".join(values)).digest(), info.pcr_digest
    ):
        raise FailedPrecondition("attest.pcr_values", "the PCR values are not the quoted ones")
    return dict(zip(sorted(info.pcrs), values, strict=True))


def digest_from_recorded(device: enroll_pb2.Device, pcrs: list[int]) -> bytes:
    """The policy digest of `pcrs` from the values recorded at enrollment."""
    missing = [p for p in pcrs if p not in device.pcr_values]
    if missing:
        raise InvalidArgument(
            "unlock.pcr_digest_invalid",
            f"no values were recorded at enrollment for PCR {missing[0]}: give --pcr-digest",
        )
    return hashlib.sha256(b"".join(device.pcr_values[p] for p in sorted(pcrs))).digest()


def wrap_for_device(
    device: enroll_pb2.Device, plaintext: bytes, challenge_id: str
) -> enroll_pb2.UnlockResponse:
    """The secret under a one-time key that only the device's TPM can recover."""
    key = secrets.token_bytes(32)
    nonce = secrets.token_bytes(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, challenge_id.encode())
    ek = tpmcred.parse_public(device.ek_public, "the device's EK")
    ak = tpmcred.parse_public(device.ak_public, "the device's AK")
    blob, encrypted = tpmcred.make_credential(ek, key, ak.name)
    return enroll_pb2.UnlockResponse(
        credential_blob=blob, encrypted_secret=encrypted, sealed=sealed
    )


def decrypt_request(
    secret: enroll_pb2.UnlockSecret, record: Any
) -> tuple[str, crypto_pb2.DecryptRequest]:
    """(provider, the crypto service's DecryptRequest) for the secret's KMS ciphertext."""
    from broker.keys import version_key_id

    sealed = envelope.decode(secret.ciphertext)
    return record.provider, crypto_pb2.DecryptRequest(
        key_id=version_key_id(record, sealed.key_version),
        algorithm=sealed.algorithm,
        nonce=sealed.nonce,
        ciphertext=sealed.body,
        aad=envelope.bound_aad(
            sealed.key_name, sealed.key_version, secret_aad(secret.device, secret.volume)
        ),
    )


def new_secret_exists(existing: tuple[enroll_pb2.UnlockSecret, int] | None, replace: bool) -> None:
    live = existing is not None and not existing[0].removed
    if live and not replace:
        raise AlreadyExists(
            "unlock.exists", "the volume has a secret already (kmsctl unlock rotate replaces it)"
        )
    if not live and replace:
        raise NotFound("unlock.not_found", "the volume has no secret to rotate")
