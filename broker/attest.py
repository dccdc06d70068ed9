"""TPM-attested enrollment on the broker: the manufacturer CAs, the EK checks and the
one-time challenges (edgekms.tpmcred does the TPM structures and the cryptography).

A challenge is a fresh 32-byte nonce, TPM2_MakeCredential'd to the device's EK and bound
to its AK's name. It lives in this broker's memory only (a device finishes on the broker
it began with), for CHALLENGE_TTL, and is taken out at its first use, right or wrong, so
no answer is accepted twice. Challenges are rationed per source address (PER_PEER in
PEER_WINDOW) and in all (MAX_OUTSTANDING), so a flood costs the broker a bounded amount of
memory and RSA work and never crowds out the challenges already given.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms import tpmcred
from edgekms.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted

CHALLENGE_TTL = 60.0
PER_PEER = 20
PEER_WINDOW = 60.0
MAX_OUTSTANDING = 4096
NONCE_SIZE = 32
MAX_EK_CERT = 4096


class ManufacturerCAs:
    """The TPM manufacturers' CA certificates an EK certificate must chain to.

    Self-signed ones are roots; the others are trusted as intermediates only on the way
    to a root, unless no root is given at all (then every certificate is an anchor)."""

    def __init__(self, certificates: list[x509.Certificate]):
        roots = [c for c in certificates if c.issuer == c.subject]
        others = [c for c in certificates if c.issuer != c.subject]
        self.anchors = roots or others
        self.intermediates = others if roots else []

    @classmethod
    def load(cls, path: Path | None) -> ManufacturerCAs:
        if path is None:
            return cls([])
        data = path.read_bytes()
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ValueError(f"{path}: not a PEM bundle of certificates: {exc}") from None
        return cls(certificates)

    def __bool__(self) -> bool:
        return bool(self.anchors)


@dataclass
class Challenge:
    id: str
    nonce: bytes
    token_id: str
    ek_sha256: bytes
    ak_public: bytes
    expires: float
    ek_public: bytes = b""


@dataclass(frozen=True)
class CheckedEvidence:
    ek_sha256: bytes
    ek: tpmcred.TpmPublic
    ak: tpmcred.TpmPublic


def check_evidence(
    ek_certificate: bytes,
    ek_public: bytes,
    ak_public: bytes,
    pinned_ek: bytes,
    cas: ManufacturerCAs,
) -> CheckedEvidence:
    """The EK is trusted (the token's pinned EK, or a certificate chaining to a
    manufacturer CA, for the same key as `ek_public`) and the AK is a proper AK."""
    if len(ek_certificate) > MAX_EK_CERT:
        raise InvalidArgument("attest.malformed", f"an EK certificate is at most {MAX_EK_CERT}")
    ek = tpmcred.parse_public(ek_public, "the EK's TPMT_PUBLIC")
    tpmcred.check_ek(ek)
    ak = tpmcred.parse_public(ak_public, "the AK's TPMT_PUBLIC")
    tpmcred.check_ak(ak)
    identity = tpmcred.ek_identity(ek.public_key_der)
    if pinned_ek:
        if not hmac.compare_digest(identity, pinned_ek):
            raise PermissionDenied(
                "attest.ek_unknown", "this TPM's EK is not the one registered for the token"
            )
        return CheckedEvidence(identity, ek, ak)
    if not ek_certificate:
        raise PermissionDenied(
            "attest.ek_unknown",
            "no EK certificate was sent and the token registers no EK",
        )
    if not cas:
        raise PermissionDenied(
            "attest.ek_untrusted", "no manufacturer CA is configured (broker ek_ca_file)"
        )
    cert = tpmcred.verify_ek_certificate(ek_certificate, cas.anchors, cas.intermediates)
    cert_key = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if tpmcred.ek_identity(cert_key) != identity:
        raise PermissionDenied(
            "attest.ek_mismatch", "the EK certificate is for another key than the EK sent"
        )
    return CheckedEvidence(identity, ek, ak)


class ChallengeBook:
    """Outstanding challenges by id, single-use and short-lived, rationed per source."""

    def __init__(
        self,
        ttl: float = CHALLENGE_TTL,
        per_peer: int = PER_PEER,
        window: float = PEER_WINDOW,
        limit: int = MAX_OUTSTANDING,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl = ttl
        self.per_peer = per_peer
        self.window = window
        self.limit = limit
        self.clock = clock
        self._open: OrderedDict[str, Challenge] = OrderedDict()
        self._issued: dict[str, deque[float]] = {}

    def _sweep(self, now: float) -> None:
        while self._open:
            first = next(iter(self._open.values()))
            if first.expires > now:
                break
            self._open.popitem(last=False)
        if len(self._issued) > self.limit:
            for peer in [p for p, times in self._issued.items() if times[-1] <= now - self.window]:
                del self._issued[peer]

    def ration(self, peer: str) -> None:
        """Count one challenge for `peer`; ResourceExhausted("attest.throttled") past the
        ration, or when the book is full."""
        now = self.clock()
        self._sweep(now)
        times = self._issued.setdefault(peer, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.per_peer:
            retry = max(1, int(times[0] + self.window - now) + 1)
            raise ResourceExhausted(
                "attest.throttled",
                f"too many challenges from this address; try again in {retry} s",
                {"retry_after_seconds": str(retry)},
            )
        if len(self._open) >= self.limit:
            raise ResourceExhausted(
                "attest.throttled", "too many challenges outstanding; try again shortly"
            )
        times.append(now)

    def issue(
        self, token_id: str, ek_sha256: bytes, ak_public: bytes, ek_public: bytes = b""
    ) -> Challenge:
        challenge = Challenge(
            ek_public=ek_public,
            id=secrets.token_hex(16),
            nonce=secrets.token_bytes(NONCE_SIZE),
            token_id=token_id,
            ek_sha256=ek_sha256,
            ak_public=ak_public,
            expires=self.clock() + self.ttl,
        )
        self._open[challenge.id] = challenge
        return challenge

    def take(self, challenge_id: str, token_id: str) -> Challenge:
        """The challenge, removed: a second use finds nothing. Refused if unknown, used,
        expired or given for another token."""
        challenge = self._open.pop(challenge_id, None)
        if challenge is None:
            raise FailedPrecondition(
                "attest.challenge_unknown",
                "no such challenge: unknown, used already, or expired (ask for a new one)",
            )
        if challenge.expires <= self.clock():
            raise FailedPrecondition(
                "attest.challenge_expired", "the challenge expired; ask for a new one"
            )
        if challenge.token_id != token_id:
            raise PermissionDenied(
                "attest.challenge_mismatch", "the challenge is for another token"
            )
        return challenge

    def __len__(self) -> int:
        return len(self._open)
