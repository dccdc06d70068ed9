"""The broker's audit archiver: keeps each writer's stream to its window (edgekms.retention).

Why the broker. Archiving needs to read every writer's stream, write files in the data
dir and sign checkpoints in the token. The broker already reads every audit stream (for
TailAudit) and already signs with the internal CA's key (client certificates), so the
only power it gains is purging audit streams, and only streams it can read whole: no
process can purge what it could not have archived. The CA and the crypto services can
purge nothing. A compromised broker could purge without archiving; docs/security.md
("Retention") says what that leaves and what shows it.

One archiver per deployment: run it in one broker (`audit_archive_dir` in broker.toml;
`kmsctl up` sets it). Rounds run every `interval_s`; a round that fails (no room for the
archive, the token unreachable) logs `audit archive failed` with its typed reason and
purges nothing, and the next round tries again. If archiving stays behind, the stream
fills to its limit and appends fail with `audit.full`: records are refused, never
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import nats.errors
import nats.js.errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.js import JetStreamContext, api

from broker.registry import KeyRegistry
from edgekms.audit import (
    LEGACY_STREAM,
    STREAM_PREFIX,
    AuditWriter,
    audit_streams,
    link_of,
    subject_writer,
)
from edgekms.client_certs import INTERNAL_CA_KEY
from edgekms.crypto_client import CryptoClient
from edgekms.errors import KMSError, NotFound, Unavailable
from edgekms.logs import fields
from edgekms.retention import (
    TMP_SUFFIX,
    Checkpoint,
    CheckpointError,
    RetentionPolicy,
    checkpoint_files,
    checkpoint_name,
    encode_line,
    key_id,
    now_rfc3339,
    remove_quietly,
    segment_name,
    stream_dir,
    write_atomic,
)
from edgekms.v1 import common_pb2, crypto_pb2
from edgekms.v1.common_pb2 import KeyRecord

log = logging.getLogger(__name__)

# At most this many segments per stream per round, so one round ends in bounded time.
MAX_SEGMENTS_PER_ROUND = 64
# JetStream's per-message overhead in a stream's byte count, roughly (its file store
# adds a record header and a hash); only used to pick a segment's end, the loop then
# re-reads the real count.
MESSAGE_OVERHEAD = 40


class CheckpointSigner(Protocol):
    """Signs checkpoint digests in the token (the broker: the internal CA's key)."""

    async def key_id(self) -> str: ...

    async def public_key_der(self) -> bytes: ...

    async def sign(self, digest: bytes) -> bytes: ...


class InternalKeySigner:
    """The internal CA's key (registry key edgekms/internal-ca, class "internal"),
    through its crypto service: the key kmsctl already trusts (the client's ca.crt),
    kept in the token. The checkpoint's domain tag keeps its signatures apart from the
    certificates the same key signs."""

    def __init__(self, registry: KeyRegistry, crypto: CryptoClient, timeout: float) -> None:
        self.registry = registry
        self.crypto = crypto
        self.timeout = timeout

    def _record(self) -> KeyRecord:
        try:
            return self.registry.get(INTERNAL_CA_KEY)
        except NotFound:
            raise Unavailable(
                "audit.archive_failed", "no internal CA key in the registry to sign checkpoints"
            ) from None

    async def key_id(self) -> str:
        return key_id(self._record().public_key_der)

    async def public_key_der(self) -> bytes:
        return bytes(self._record().public_key_der)

    async def sign(self, digest: bytes) -> bytes:
        record = self._record()
        request = crypto_pb2.SignRequest(
            key_id=record.key_id,
            algorithm=common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
            data=digest,
        )
        reply = await self.crypto.sign(record.provider, request, timeout=self.timeout)
        return reply.signature


@dataclass
class Taken:
    """Messages read for one segment."""

    lines: list[bytes]
    first: int = 0
    last: int = 0
    last_raw: bytes = b""
    stored: int = 0  # estimated bytes in the stream's count
    size: int = 0  # bytes of the segment's lines
    cut: bool = False  # ended by the segment size: there is more to take


class Archiver:
    def __init__(
        self,
        js: JetStreamContext,
        archive_dir: Path,
        signer: CheckpointSigner,
        policy: RetentionPolicy | None = None,
        read_timeout: float = 5.0,
        audit: AuditWriter | None = None,
    ) -> None:
        # The broker's own audit writer: each purge is recorded in its chain.
        self.audit = audit
        self.js = js
        self.archive_dir = archive_dir
        self.signer = signer
        self.policy = policy or RetentionPolicy()
        self.read_timeout = read_timeout
        self._warned: set[str] = set()
        # What status and metrics read: the last round's failure (None: it went well),
        # totals since start, and the wall-clock time of the last round that went well.
        self.last_error: KMSError | None = None
        self.archived_messages = 0
        self.archived_segments = 0
        self.last_ok_at: float | None = None

    async def run(self) -> None:
        """Rounds until cancelled; a failed round is logged and retried next interval."""
        while True:
            with contextlib.suppress(KMSError):
                await self.round()
            await asyncio.sleep(self.policy.interval_s)

    async def round(self) -> dict[str, int]:
        """One pass over every writer's stream: messages archived per stream. Raises the
        first typed failure after trying every stream (a full archive disk stops one
        stream as much as all)."""
        archived: dict[str, int] = {}
        failure: KMSError | None = None
        try:
            streams = [s for s in await audit_streams(self.js) if s.startswith(STREAM_PREFIX)]
        except (nats.errors.Error, TimeoutError) as exc:
            streams, failure = [], Unavailable("audit.unavailable", f"audit streams: {exc}")
        for stream in streams:
            try:
                archived[stream] = await self.archive_stream(stream)
            except KMSError as err:
                log.error(
                    "audit archive failed",
                    extra=fields(
                        event="audit_archive_failed",
                        stream=stream,
                        reason=err.reason,
                        error=err.message,
                    ),
                )
                failure = failure or err
            except (nats.errors.Error, TimeoutError) as exc:
                log.error(
                    "audit archive failed",
                    extra=fields(
                        event="audit_archive_failed",
                        stream=stream,
                        reason="audit.unavailable",
                        error=type(exc).__name__,
                    ),
                )
                failure = failure or Unavailable("audit.unavailable", f"{stream}: {exc}")
        self.last_error = failure
        if failure is not None:
            raise failure
        self.last_ok_at = time.time()
        return archived

    async def _covered(self, stream: str) -> int:
        """The last sequence the newest checkpoint of `stream` covers (0: none), once
        its signature (by this archiver's key) and its segment's SHA-256 are checked:
        the purge after a cut-off round trusts it, so a checkpoint planted in the
        archive dir must not be able to purge what was never archived. Stray temporary
        files of an interrupted round are removed."""
        folder = stream_dir(self.archive_dir, stream)
        if folder.is_dir():
            for stray in folder.glob(f"*{TMP_SUFFIX}"):
                remove_quietly(stray)
        files = checkpoint_files(self.archive_dir, stream)
        if not files:
            return 0
        der = await self.signer.public_key_der()
        public = serialization.load_der_public_key(der)
        try:
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise CheckpointError("checkpoint_invalid", "the signing key is not EC")
            checkpoint = Checkpoint.from_json(files[-1].read_bytes())
            checkpoint.verify({key_id(der): public})
            if checkpoint.stream != stream:
                raise CheckpointError("checkpoint_invalid", f"it is {checkpoint.stream}'s")
            segment = (folder / checkpoint.segment).read_bytes()
            if hashlib.sha256(segment).hexdigest() != checkpoint.sha256:
                raise CheckpointError("archive_tampered", "its segment is not the one it signed")
        except (CheckpointError, OSError) as exc:
            raise Unavailable(
                "audit.archive_failed",
                f"{files[-1]} does not hold ({exc}): archiving {stream} stops until an "
                "operator looks (docs/security.md, Retention)",
            ) from None
        return checkpoint.last_seq

    async def archive_stream(self, stream: str) -> int:
        """Archive, checkpoint and purge `stream` down to its window; messages archived."""
        info = await self.js.stream_info(stream)
        if stream == LEGACY_STREAM or info.config.deny_purge:
            if stream not in self._warned:
                self._warned.add(stream)
                log.warning(
                    "audit stream cannot be pruned",
                    extra=fields(event="audit_purge_denied", stream=stream),
                )
            return 0
        covered = await self._covered(stream)
        if info.state.first_seq <= covered < info.state.last_seq:
            # A checkpoint written in a round that did not get to its purge.
            await self._purge(stream, covered)
        archived = 0
        # Past the window: down to its low-water mark. Within it: only what is too old.
        window = self.policy.window_fraction
        fraction = window * self.policy.low_water if self._past(info, window) else window
        for _ in range(MAX_SEGMENTS_PER_ROUND):
            info = await self.js.stream_info(stream)
            taken = await self._take(stream, info, fraction)
            if not taken.lines:
                break
            await self._archive(stream, info, taken)
            await self._purge(stream, taken.last)
            archived += len(taken.lines)
            self.archived_messages += len(taken.lines)
            self.archived_segments += 1
            if not taken.cut:
                break  # down to the mark: what came in meanwhile waits for a later round
        return archived

    @staticmethod
    def _past(info: api.StreamInfo, fraction: float) -> bool:
        """Whether the stream holds more than `fraction` of its bytes or messages."""
        state, config = info.state, info.config
        max_bytes, max_msgs = int(config.max_bytes or -1), int(config.max_msgs or -1)
        return (max_bytes > 0 and int(state.bytes or 0) > max_bytes * fraction) or (
            max_msgs > 0 and int(state.messages or 0) > max_msgs * fraction
        )

    async def _take(self, stream: str, info: api.StreamInfo, fraction: float) -> Taken:
        """The oldest messages beyond `fraction` of the stream's limits, or older than the
        age bound, at most a segment, never the last message (the writer chains on to it)."""
        state, config = info.state, info.config
        policy = self.policy
        first, last = int(state.first_seq or 0), int(state.last_seq or 0)
        if int(state.messages or 0) <= 1 or first >= last:
            return Taken([])
        max_bytes, max_msgs = int(config.max_bytes or -1), int(config.max_msgs or -1)
        over_bytes = int(state.bytes or 0) - int(max_bytes * fraction) if max_bytes > 0 else 0
        over_msgs = int(state.messages or 0) - int(max_msgs * fraction) if max_msgs > 0 else 0
        cutoff = (
            datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=policy.max_age_s)
            if policy.max_age_s > 0
            else None
        )
        taken = Taken([])
        sub = await self.js.subscribe(
            ">",
            stream=stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first
            ),
            inactive_threshold=30.0,
        )
        try:
            while taken.last < last - 1:
                try:
                    msg = await sub.next_msg(timeout=self.read_timeout)
                except nats.errors.TimeoutError:
                    break
                meta = msg.metadata
                seq = meta.sequence.stream
                if seq >= last:
                    break
                old = cutoff is not None and meta.timestamp < cutoff
                if not old and taken.stored >= over_bytes and len(taken.lines) >= over_msgs:
                    break
                raw = bytes(msg.data)
                line = encode_line(seq, msg.subject, raw)
                size = len(line)
                if taken.lines and taken.size + size > policy.segment_bytes:
                    taken.cut = True
                    break
                headers = sum(len(k) + len(v) + 4 for k, v in (msg.headers or {}).items())
                taken.stored += len(msg.subject) + len(raw) + headers + MESSAGE_OVERHEAD
                taken.lines.append(line)
                taken.size += size
                taken.first = taken.first or seq
                taken.last = seq
                taken.last_raw = raw
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if taken.lines and taken.last - taken.first + 1 != len(taken.lines):
            # A hole in what the stream handed out: archive nothing rather than a
            # segment whose checkpoint would vouch for a gap.
            raise Unavailable(
                "audit.archive_failed",
                f"{stream}: sequences {taken.first}..{taken.last} came with holes",
            )
        return taken

    async def _archive(self, stream: str, info: api.StreamInfo, taken: Taken) -> None:
        """Segment file, then its signed checkpoint; the segment is removed again if the
        checkpoint cannot be made, so no unsigned segment is ever left."""
        subjects = list(info.config.subjects or [])
        writer = subject_writer(subjects[0]) if len(subjects) == 1 else None
        if writer is None:
            raise Unavailable("audit.archive_failed", f"{stream} is no writer's stream")
        folder = stream_dir(self.archive_dir, stream)
        data = gzip.compress(b"".join(taken.lines), compresslevel=9, mtime=0)
        segment = folder / segment_name(taken.first, taken.last)
        write_atomic(segment, data)
        checkpoint_path = folder / checkpoint_name(taken.first, taken.last)
        try:
            unsigned = Checkpoint(
                stream=stream,
                writer=writer,
                first_seq=taken.first,
                last_seq=taken.last,
                hash=link_of(taken.last_raw).hex(),
                messages=len(taken.lines),
                time=now_rfc3339(),
                segment=segment.name,
                sha256=hashlib.sha256(data).hexdigest(),
                key=await self.signer.key_id(),
            )
            signature = await self.signer.sign(unsigned.digest())
            checkpoint = replace(unsigned, signature=signature.hex())
            write_atomic(checkpoint_path, checkpoint.to_json())
        except BaseException:
            remove_quietly(segment)
            raise
        log.info(
            "audit archived",
            extra=fields(
                event="audit_archived",
                stream=stream,
                first_seq=taken.first,
                last_seq=taken.last,
                bytes=len(data),
                raw_bytes=taken.size,
            ),
        )

    async def _purge(self, stream: str, through: int) -> None:
        """Drop `stream`'s messages up to and including `through`, which a checkpoint
        on disk covers, and record it in the broker's chain (action `audit.purge`).
        The record comes after the purge: the signed checkpoint already vouches for
        it, and a full broker stream must still be prunable, so a record that cannot
        be stored is logged, not a reason to keep the entries."""
        await self.js.purge_stream(stream, seq=through + 1)
        log.info(
            "audit purged",
            extra=fields(event="audit_purged", stream=stream, through=through),
        )
        if self.audit is None:
            return
        try:
            await self.audit.append(
                "audit.purge", "ok", target=stream, details={"through": str(through)}
            )
        except KMSError as err:
            log.warning(
                "audit purge not recorded",
                extra=fields(event="audit_purge_unrecorded", stream=stream, reason=err.reason),
            )


__all__ = ["Archiver", "CheckpointSigner", "InternalKeySigner"]
