"""The device's half of remote unlock (`kmsctl unlock fetch`): ask the KMS for a
challenge, answer with a TPM2_Quote by the enrolled AK over the policy's PCRs and the
challenge's nonce, and recover the released secret with TPM2_ActivateCredential (only
this TPM's EK can; docs/security.md, "Remote unlock").

The KMS is found from the enrollment's device.json (the enrollment listener and the CA
fingerprint pinned then) or given. Nothing is written but the secret, to stdout or a
0600 file, for cryptsetup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.v1 import enroll_pb2
from mgmt.attested_enroll import DEVICE_FILE, enrollment_stub
from mgmt.client import error_from_rpc
from mgmt.tpmdevice import DeviceTpm


@dataclass(frozen=True)
class Target:
    """Where the KMS is and who this device is."""

    server: str
    fingerprint: str
    device: str


def target_from(
    device_dir: Path, server: str = "", fingerprint: str = "", device: str = ""
) -> Target:
    """The enrollment's device.json, overridden by what is given."""
    saved: dict[str, str] = {}
    path = device_dir / DEVICE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
    found = Target(
        server or saved.get("enrollment", ""),
        fingerprint or saved.get("fingerprint", ""),
        device or saved.get("name", ""),
    )
    if not (found.server and found.fingerprint and found.device):
        raise InvalidArgument(
            "unlock.target_unknown",
            f"no KMS address, fingerprint or device name: enroll with --attest into "
            f"{device_dir} first, or give --server, --fingerprint and --device",
        )
    return found


# The refusals that say only "this challenge is gone" (expired while the TPM answered,
# or lost with a broker that restarted between BeginUnlock and Unlock): a fresh
# challenge is the whole remedy, so fetch asks again rather than fail the boot.
STALE_CHALLENGE = frozenset({"attest.challenge_unknown", "attest.challenge_expired"})
FETCH_ATTEMPTS = 2


def fetch(
    target: Target,
    volume: str,
    tcti: str | None,
    *,
    endorsement_auth: bytes = b"",
    timeout: float = 30.0,
    attempts: int = FETCH_ATTEMPTS,
) -> bytes:
    """The volume's secret, released to this TPM; KMSError on any refusal. A challenge
    that died before its answer came (STALE_CHALLENGE) is asked for again, up to
    `attempts` challenges in all; every other refusal is final at once."""
    for attempt in range(1, attempts + 1):
        try:
            return _fetch_once(target, volume, tcti, endorsement_auth, timeout)
        except FailedPrecondition as err:
            if err.reason not in STALE_CHALLENGE or attempt == attempts:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _fetch_once(
    target: Target, volume: str, tcti: str | None, endorsement_auth: bytes, timeout: float
) -> bytes:
    """One challenge, its quote, and the release opened by this TPM."""
    with enrollment_stub(target.server, target.fingerprint) as stub:
        try:
            challenge = stub.BeginUnlock(
                enroll_pb2.BeginUnlockRequest(device=target.device, volume=volume),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        with DeviceTpm(tcti, endorsement_auth) as tpm:
            quote, signature = tpm.quote(list(challenge.pcrs), challenge.nonce)
            try:
                released = stub.Unlock(
                    enroll_pb2.UnlockRequest(
                        challenge_id=challenge.challenge_id,
                        device=target.device,
                        volume=volume,
                        quote=quote,
                        signature=signature,
                    ),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from None
            return open_released(tpm, released, challenge.challenge_id)


def open_released(tpm: DeviceTpm, released: enroll_pb2.UnlockResponse, challenge_id: str) -> bytes:
    """Activate the one-time key in this TPM and open the secret with it."""
    key = tpm.activate(released.credential_blob, released.encrypted_secret)
    if len(key) != 32 or len(released.sealed) < 12 + 16:
        raise FailedPrecondition("unlock.release_malformed", "the released secret is malformed")
    try:
        return AESGCM(key).decrypt(
            released.sealed[:12], released.sealed[12:], challenge_id.encode()
        )
    except InvalidTag:
        raise FailedPrecondition(
            "unlock.release_malformed", "the released secret does not open with this TPM's key"
        ) from None
