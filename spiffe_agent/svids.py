"""The device's SPIFFE material: its entries, the bundle, and an SVID per entry.

Why one SVID per entry (not per connection): every workload matching an entry is that
identity, so they share it, and rotation costs one signature per entry however many
programs hold it. Keys are made here (EC P-256) and only a CSR leaves the device.

The KMS is asked through the device's own client certificate (KMSClient, sync gRPC on
worker threads). Each SVID is renewed at half its lifetime; a failure (KMS away) keeps
the current SVID, which is still served, and retries with backoff, never later than a
quarter of what it has left; an expired one is dropped. A refusal of the device itself
(denied, revoked: UNAUTHENTICATED or PERMISSION_DENIED on the entry list) ends every
open stream with that error and drops every SVID.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms import spiffe as sp
from edgekms.errors import KMSError, PermissionDenied, Unauthenticated
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

RETRY_INITIAL = 1.0
RETRY_MAX = 60.0


@dataclass
class Svid:
    entry: ca_pb2.SpiffeEntry
    key_der: bytes  # PKCS#8
    chain_der: list[bytes]  # leaf first
    not_before: float
    not_after: float
    failures: int = 0
    due: float = 0.0

    @property
    def renew_at(self) -> float:
        return self.not_before + (self.not_after - self.not_before) / 2


@dataclass
class JwtCached:
    token: str
    expires: float
    issued: float


@dataclass
class State:
    entries: list[ca_pb2.SpiffeEntry] = field(default_factory=list)
    bundle: ca_pb2.SpiffeBundle | None = None
    svids: dict[str, Svid] = field(default_factory=dict)  # by entry id
    denied: KMSError | None = None
    synced: bool = False


def _is_device_refusal(exc: KMSError) -> bool:
    return isinstance(exc, Unauthenticated) or (
        isinstance(exc, PermissionDenied) and not exc.reason.startswith("spiffe.")
    )


class Identities:
    """The agent's view of the KMS; `version` moves (and `changed` fires) whenever what
    a stream would send may have changed."""

    def __init__(self, kms: Any, sync_interval: float, clock: Callable[[], float] = time.time):
        self.kms = kms
        self.sync_interval = sync_interval
        self.clock = clock
        self.state = State()
        self.version = 0
        self.changed = asyncio.Condition()
        self._minting: dict[str, asyncio.Future[Svid]] = {}
        self._jwts: dict[tuple[str, tuple[str, ...]], JwtCached] = {}
        self._wake = asyncio.Event()
        self._sync_failures = 0

    async def _bump(self) -> None:
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    async def wait_change(self, seen: int) -> None:
        """Return once `version` is no longer `seen`."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.version != seen)

    # ---- entries and bundle ---------------------------------------------------------

    async def sync(self) -> None:
        try:
            entries = await asyncio.to_thread(lambda: list(self.kms.spiffe_iter_entries()))
            bundle = await asyncio.to_thread(self.kms.spiffe_bundle)
        except KMSError as exc:
            if _is_device_refusal(exc):
                if self.state.denied is None:
                    log.warning("event=spiffe_device_refused reason=%s", exc.reason)
                self.state.denied = exc
                self.state.svids.clear()
                self._jwts.clear()
                await self._bump()
            raise
        changed = (
            self.state.denied is not None
            or not self.state.synced
            or [e.SerializeToString() for e in entries]
            != [e.SerializeToString() for e in self.state.entries]
            or self.state.bundle is None
            or bundle.SerializeToString() != self.state.bundle.SerializeToString()
        )
        old_bundle = self.state.bundle
        self.state.denied = None
        self.state.synced = True
        self.state.entries = entries
        self.state.bundle = bundle
        if old_bundle is not None and old_bundle.jwks != bundle.jwks:
            self._jwts.clear()  # a rotated JWT key: new tokens from the new one
        self._renew_other_ca(bundle.signing_ca_der)
        live = {e.entry_id: e for e in entries}
        for eid in list(self.state.svids):
            entry = live.get(eid)
            if (
                entry is None
                or entry.SerializeToString() != self.state.svids[eid].entry.SerializeToString()
            ):
                del self.state.svids[eid]  # deleted or changed: no new SVID under the old one
        if changed:
            log.info("event=spiffe_synced entries=%d sequence=%d", len(entries), bundle.sequence)
            await self._bump()

    def _renew_other_ca(self, signing_ca_der: bytes) -> None:
        """After a rotation of the SPIFFE signing CA, renew now (not at half-life) the
        SVIDs the old CA signed: new SVIDs come from the new CA."""
        if not signing_ca_der:
            return
        stale = [
            s
            for s in self.state.svids.values()
            if s.chain_der[1:2] != [signing_ca_der] and not s.due
        ]
        for svid in stale:
            svid.due = self.clock()
        if stale:
            log.info("event=spiffe_signing_ca_changed renew=%d", len(stale))
            self._wake.set()

    def matching(self, selectors: frozenset[str]) -> list[ca_pb2.SpiffeEntry]:
        return [e for e in self.state.entries if sp.matches(list(e.selectors), selectors)]

    # ---- X.509-SVIDs ----------------------------------------------------------------

    async def svid(self, entry: ca_pb2.SpiffeEntry) -> Svid:
        """The entry's current SVID, minted now if there is none (one mint at a time
        per entry, however many workloads ask at once)."""
        found = self.state.svids.get(entry.entry_id)
        if found is not None and found.not_after > self.clock():
            return found
        pending = self._minting.get(entry.entry_id)
        if pending is None:
            pending = asyncio.ensure_future(self._mint(entry))
            self._minting[entry.entry_id] = pending
            pending.add_done_callback(lambda _: self._minting.pop(entry.entry_id, None))
        return await asyncio.shield(pending)

    async def _mint(self, entry: ca_pb2.SpiffeEntry) -> Svid:
        svid = await self._sign(entry)
        if self.state.denied is None and any(
            e.entry_id == entry.entry_id for e in self.state.entries
        ):
            self.state.svids[entry.entry_id] = svid
            self._wake.set()
        log.info(
            "event=spiffe_svid_minted spiffe_id=%s not_after=%d", entry.spiffe_id, svid.not_after
        )
        return svid

    async def _sign(self, entry: ca_pb2.SpiffeEntry) -> Svid:
        def make() -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([]))
                .sign(key, hashes.SHA256())
            )
            key_der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            return key_der, csr.public_bytes(serialization.Encoding.DER)

        key_der, csr_der = await asyncio.to_thread(make)
        try:
            answer = await asyncio.to_thread(
                self.kms.spiffe_sign_x509_svid, entry.spiffe_id, csr_der
            )
        except KMSError as exc:
            if _is_device_refusal(exc):
                self.state.denied = exc
                self.state.svids.clear()
                await self._bump()
            raise
        leaf = x509.load_der_x509_certificate(answer.certificate_der)
        _check_svid(leaf, entry.spiffe_id, key_der)
        return Svid(
            entry,
            key_der,
            [answer.certificate_der, *answer.intermediates_der],
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
        )

    def next_due(self) -> float | None:
        times = [s.due or s.renew_at for s in self.state.svids.values()]
        return min(times) if times else None

    async def rotate_due(self) -> int:
        """Renew every SVID past half its lifetime; returns how many were renewed."""
        now = self.clock()
        due = [s for s in self.state.svids.values() if (s.due or s.renew_at) <= now]
        renewed = 0
        for old in due:
            try:
                new = await self._sign(old.entry)
            except KMSError as exc:
                if self.state.denied is not None:
                    return renewed
                old.failures += 1
                left = old.not_after - self.clock()
                step = min(RETRY_MAX, RETRY_INITIAL * 2 ** (old.failures - 1))
                wait = random.uniform(step / 2, step)
                old.due = self.clock() + max(0.2, min(wait, left / 4))
                log.warning(
                    "event=spiffe_rotation_retry spiffe_id=%s reason=%s failures=%d retry_in=%.1f",
                    old.entry.spiffe_id, exc.reason, old.failures, old.due - self.clock(),
                )  # fmt: skip
                if left <= 0:
                    self.state.svids.pop(old.entry.entry_id, None)
                    log.warning("event=spiffe_svid_expired spiffe_id=%s", old.entry.spiffe_id)
                    await self._bump()
                continue
            if self.state.svids.get(old.entry.entry_id) is old:
                self.state.svids[old.entry.entry_id] = new
                renewed += 1
                log.info(
                    "event=spiffe_svid_rotated spiffe_id=%s not_after=%d",
                    old.entry.spiffe_id, new.not_after,
                )  # fmt: skip
        if renewed:
            await self._bump()
        return renewed

    # ---- JWT-SVIDs ------------------------------------------------------------------

    async def jwt(self, entry: ca_pb2.SpiffeEntry, audience: list[str]) -> str:
        key = (entry.entry_id, tuple(sorted(audience)))
        now = self.clock()
        cached = self._jwts.get(key)
        if cached is not None and now < cached.issued + (cached.expires - cached.issued) / 2:
            return cached.token
        try:
            answer = await asyncio.to_thread(
                self.kms.spiffe_sign_jwt_svid, entry.spiffe_id, audience
            )
        except KMSError as exc:
            if cached is not None and cached.expires > now:
                log.warning("event=spiffe_jwt_renewal_failed reason=%s", exc.reason)
                return cached.token
            raise
        expires = datetime.datetime.strptime(answer.expires_at, "%Y-%m-%dT%H:%M:%SZ")
        if len(self._jwts) > 10000:
            self._jwts.clear()
        self._jwts[key] = JwtCached(
            answer.token, expires.replace(tzinfo=datetime.UTC).timestamp(), now
        )
        return str(answer.token)

    # ---- the loops ------------------------------------------------------------------

    async def run_sync(self) -> None:
        while True:
            try:
                await self.sync()
                self._sync_failures = 0
                wait = self.sync_interval
            except KMSError as exc:
                self._sync_failures += 1
                step = min(RETRY_MAX, RETRY_INITIAL * 2 ** (self._sync_failures - 1))
                wait = min(self.sync_interval, random.uniform(step / 2, step))
                log.warning(
                    "event=spiffe_sync_retry reason=%s failures=%d retry_in=%.1f",
                    exc.reason, self._sync_failures, wait,
                )  # fmt: skip
            await asyncio.sleep(wait)

    async def run_rotation(self) -> None:
        while True:
            due = self.next_due()
            wait = 3600.0 if due is None else max(0.0, due - self.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(wait, 3600.0))
                continue  # a new SVID: its due time may be the earliest
            except TimeoutError:
                pass
            started = time.monotonic()
            renewed = await self.rotate_due()
            if renewed:
                # One line per pass: what rotating N identities costs (bench/spiffe.py).
                log.info(
                    "event=spiffe_rotation_pass renewed=%d seconds=%.3f held=%d",
                    renewed, time.monotonic() - started, len(self.state.svids),
                )  # fmt: skip


def _check_svid(leaf: x509.Certificate, spiffe_id: str, key_der: bytes) -> None:
    """What the KMS signed is ours: our key, and exactly the ID asked for."""
    key = serialization.load_der_private_key(key_der, None)
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if ours != theirs or uris.get_values_for_type(x509.UniformResourceIdentifier) != [spiffe_id]:
        raise PermissionDenied("spiffe.svid_mismatch", "the KMS answered with another SVID")
