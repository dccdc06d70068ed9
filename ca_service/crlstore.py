"""The current CRL in the CA's KV bucket, in chunks, and the background job that builds
the next one.

A CRL grows by about 40 bytes per revoked certificate: past roughly 3,000 entries it is
larger than one bus message, and storing or sending it whole made nats-server drop the
CA's connection for good (issue 11). So the DER is kept in CHUNK_SIZE pieces under
`crl.der.<slot>.<index>`, and `crl.meta` (a StoredCRL: number, size, SHA-256, slot)
says which; GetCRL hands it out in pieces of the same size.

A new CRL goes into the slot the current one does not use, and `crl.meta` moves to it
only if its number is higher than the current one's (a revision check), so a reader
never sees a CRL half written and two replicas building at once keep the newer. The
slots are fixed names, so the bucket does not collect a delete marker per CRL.

CRLJobs builds in the background: a revocation reserves the next CRL number and
returns; one build then serves every revocation that reserved a number before it
started. Revoking therefore costs the same with 50,000 revoked certificates as with
none, and the CRL each revocation names (by its number) lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgekms.errors import FailedPrecondition, Internal, Unavailable
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

CRL_META_KEY = "crl.meta"
# One KV value and one GetCRL reply: half the stack's 128 KiB max_payload.
CHUNK_SIZE = 64 * 1024
_SLOTS = ("a", "b")
_CAS_RETRIES = 20
# Pause between two background CRL builds while revocations keep arriving.
BUILD_GAP = 1.0


def chunk_key(slot: str, index: int) -> str:
    return f"crl.der.{slot}.{index:05d}"


class CRLStore:
    """Reads and writes the current CRL; keeps the last one read or written in memory,
    so GetCRL's chunks and /crl do not read the bucket each time."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._cached: tuple[ca_pb2.StoredCRL, bytes] | None = None

    async def meta(self) -> tuple[ca_pb2.StoredCRL, int] | None:
        try:
            entry = await self.kv.get(CRL_META_KEY)
        except KeyNotFoundError:
            return None
        meta = ca_pb2.StoredCRL()
        meta.ParseFromString(entry.value)
        return meta, int(entry.revision)

    async def publish(
        self, crl_number: int, next_update: str, der: bytes, revoked: int
    ) -> ca_pb2.StoredCRL:
        """Store `der` as the current CRL unless one with a higher number is there; the
        current one either way."""
        found = await self.meta()
        if found is not None and found[0].crl_number >= crl_number:
            return found[0]
        slot = _SLOTS[1] if found is not None and found[0].slot == _SLOTS[0] else _SLOTS[0]
        chunks = [der[i : i + CHUNK_SIZE] for i in range(0, len(der), CHUNK_SIZE)] or [b""]
        for index, chunk in enumerate(chunks):
            await self.kv.put(chunk_key(slot, index), chunk)
        meta = ca_pb2.StoredCRL(
            crl_number=crl_number,
            next_update=next_update,
            total_size=len(der),
            sha256=hashlib.sha256(der).digest(),
            chunk_size=CHUNK_SIZE,
            chunks=len(chunks),
            slot=slot,
            revoked=revoked,
        )
        for _ in range(_CAS_RETRIES):
            found = await self.meta()
            if found is not None and found[0].crl_number >= crl_number:
                return found[0]  # a newer CRL got there first; ours is not needed
            try:
                if found is None:
                    await self.kv.create(CRL_META_KEY, meta.SerializeToString())
                else:
                    await self.kv.update(CRL_META_KEY, meta.SerializeToString(), last=found[1])
            except KeyWrongLastSequenceError:
                continue
            self._cached = (meta, der)
            return meta
        raise Internal("store.contention", "the CRL kept changing; try again")

    async def current(self) -> tuple[ca_pb2.StoredCRL, bytes] | None:
        """The current CRL and its DER, checked against its SHA-256."""
        for _ in range(3):
            found = await self.meta()
            if found is None:
                return None
            meta = found[0]
            cached = self._cached
            if cached is not None and (cached[0].crl_number, cached[0].sha256) == (
                meta.crl_number,
                meta.sha256,
            ):
                return meta, cached[1]
            parts = []
            try:
                for index in range(meta.chunks):
                    parts.append((await self.kv.get(chunk_key(meta.slot, index))).value or b"")
            except KeyNotFoundError:
                continue
            der = b"".join(parts)
            if len(der) == meta.total_size and hashlib.sha256(der).digest() == meta.sha256:
                self._cached = (meta, der)
                return self._cached
            # Overwritten while read: a newer CRL is being stored in that slot.
            await asyncio.sleep(0.05)
        raise Unavailable("crl.changing", "the CRL is being replaced; try again")

    async def chunk(self, req: ca_pb2.GetCRLRequest) -> ca_pb2.GetCRLResponse:
        """GetCRL's answer: the chunk at `req.offset` of the current CRL, or of the one
        numbered `req.crl_number` while it is still current."""
        found = await self.current()
        if found is None:
            raise FailedPrecondition("ca.not_initialized", "no CRL yet: run `kmsctl ca init`")
        meta, der = found
        if req.crl_number and req.crl_number != meta.crl_number:
            raise FailedPrecondition(
                "crl.changed",
                f"CRL {req.crl_number} was replaced by {meta.crl_number}: fetch it again",
                {"crl_number": str(meta.crl_number)},
            )
        if req.offset > len(der):
            raise FailedPrecondition(
                "crl.offset_invalid", f"offset {req.offset} is past the CRL's {len(der)} bytes"
            )
        return ca_pb2.GetCRLResponse(
            crl_der=der[req.offset : req.offset + CHUNK_SIZE],
            crl_number=meta.crl_number,
            next_update=meta.next_update,
            total_size=meta.total_size,
            sha256=meta.sha256,
        )


class CRLJobs:
    """Builds the CRL in the background, one build at a time, each for the highest CRL
    number reserved before it started (CRL numbers need only increase, RFC 5280 5.2.3,
    so the numbers skipped are fine)."""

    def __init__(self, build: Callable[[int], Awaitable[object]], gap: float = BUILD_GAP) -> None:
        self._build = build
        self._gap = gap
        self._wanted = 0
        self._built = 0
        self._runner: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    def want(self, crl_number: int) -> None:
        """Have a CRL numbered at least `crl_number` built soon."""
        self._wanted = max(self._wanted, crl_number)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())

    @property
    def busy(self) -> bool:
        return self._wanted > self._built

    async def settled(self) -> None:
        """Wait until every CRL asked for so far is built (or its build failed: the
        stored CRL is then what there is, and the next revocation or refresh retries)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self.busy or self._runner is None)

    async def _run(self) -> None:
        while self._wanted > self._built:
            number = self._wanted
            try:
                await self._build(number)
            except Exception as exc:  # logged; the next want() or refresh tries again
                log.warning(
                    "event=ca_crl_build_failed number=%d error=%s",
                    number,
                    getattr(exc, "reason", type(exc).__name__),
                )
            self._built = max(self._built, number)
            async with self._changed:
                self._changed.notify_all()
            if self._wanted > self._built:
                # Revocations keep coming: leave the CA a moment for them between builds
                # (one build of 50,000 entries is seconds of work on a small machine).
                await asyncio.sleep(self._gap)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
