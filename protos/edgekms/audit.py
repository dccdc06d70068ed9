"""The audit log's one shared definition: entry encoding, hash chain, append, verify.

Shared because the broker and the CA service append to the same chain, and kmsctl
verifies it; all three must agree byte for byte on what is hashed.

Storage. Entries are messages in the JetStream stream KMS_AUDIT (file storage, no limits,
so nothing is discarded by age or size; nats-server runs with `sync_interval: always`, so
an acknowledged append is on disk). Each writer publishes on `kms.audit.<writer>`.

Encoding. The stored bytes are the canonical JSON of the entry: keys sorted, no
whitespace, UTF-8, strings only (no floats). Canonical JSON rather than deterministic
protobuf because protobuf's "deterministic" serialization is explicitly not canonical
(it may differ between library versions and languages, and unknown fields survive
re-encoding), while sorted-key JSON can be recomputed by any auditor with any JSON
library, `jq -cS` included. The stream sequence number is NOT part of the entry: it is
assigned by the server after the hash is fixed; a missing number shows as a gap.

Chain. hash = SHA-256(prev_hash || canonical(entry without "hash")), prev_hash being the
previous entry's hash (32 zero bytes for the first). Both travel hex-encoded in the entry.
One global chain across writers: an append reads the head (last sequence and its hash,
cached per writer), publishes with Nats-Expected-Last-Sequence = that sequence, and on
"wrong last sequence" (another writer got there first) re-reads the head and retries, a
bounded number of times. The server's check is atomic, so the chain never forks.

Fail closed. An append that cannot be stored raises Unavailable("audit.unavailable"); the
broker then refuses the operation it was recording.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from edgekms.errors import Unavailable
from edgekms.logs import fields
from edgekms.subjects import AUDIT_PREFIX, AUDIT_STREAM

log = logging.getLogger(__name__)

STREAM = AUDIT_STREAM
SUBJECT_PREFIX = AUDIT_PREFIX
GENESIS = bytes(32)
FORMAT_VERSION = "1"
# JetStream's error code for a failed Nats-Expected-Last-Sequence check.
WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
# How far back the writer looks for a readable head when the newest entries were deleted.
HEAD_SEARCH_LIMIT = 1000

_ENTRY_FIELDS = frozenset(
    {
        "v",
        "time",
        "writer",
        "actor",
        "action",
        "target",
        "outcome",
        "request_id",
        "details",
        "prev_hash",
        "hash",
    }
)


def audit_subject(writer: str) -> str:
    return f"{SUBJECT_PREFIX}.{writer}"


def stream_config() -> api.StreamConfig:
    """Append-only by convention, whole by construction: nothing expires, nothing is
    discarded. deny_delete/deny_purge are left off on purpose: they cannot be undone on
    a stream, and the chain detects a deletion anyway (see docs/security.md)."""
    return api.StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}.>"],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        num_replicas=1,
        allow_direct=True,
    )


def canonical(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8; strings, dicts and lists only."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The hex hash an entry must carry: over its prev_hash bytes and the rest of it."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    prev = bytes.fromhex(str(entry.get("prev_hash", "")))
    return hashlib.sha256(prev + canonical(body)).hexdigest()


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_entry(
    *,
    writer: str,
    action: str,
    outcome: str,
    prev_hash: bytes,
    client: str = "",
    role: str = "",
    target: str = "",
    request_id: str = "",
    details: Mapping[str, str] | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """A sealed entry (with its hash) chained to `prev_hash`."""
    entry: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "time": time or now_rfc3339(),
        "writer": writer,
        "actor": {"client": client, "role": role},
        "action": action,
        "target": target,
        "outcome": outcome,
        "request_id": request_id,
        "details": {str(k): str(v) for k, v in (details or {}).items()},
        "prev_hash": prev_hash.hex(),
    }
    entry["hash"] = entry_hash(entry)
    return entry


def parse_entry(raw: bytes) -> dict[str, Any]:
    """The entry in `raw`, or ValueError saying why it is not one."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    missing = _ENTRY_FIELDS - entry.keys()
    if missing:
        raise ValueError(f"missing fields {', '.join(sorted(missing))}")
    for name in ("prev_hash", "hash"):
        value = entry[name]
        if not isinstance(value, str) or len(value) != 64:
            raise ValueError(f"{name} is not a hex SHA-256")
        try:
            bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"{name} is not hex") from None
    if not isinstance(entry["actor"], dict) or not isinstance(entry["details"], dict):
        raise ValueError("actor and details must be objects")
    return entry


def link_of(raw: bytes) -> bytes:
    """What the next entry must carry as prev_hash: the entry's own hash field, or, for
    bytes that are no entry at all, their SHA-256 (writer and verifier agree on this, so
    one corrupt message is reported once instead of breaking every link after it)."""
    try:
        return bytes.fromhex(parse_entry(raw)["hash"])
    except ValueError:
        return hashlib.sha256(raw).digest()


# -- writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Appended:
    seq: int
    entry: dict[str, Any]


class AuditWriter:
    """Appends to the global chain for one process. Appends from one writer are
    serialized (a lock); appends from several processes race on the server's
    expected-last-sequence check and the loser retries on the new head."""

    def __init__(
        self,
        js: JetStreamContext,
        writer: str,
        *,
        timeout: float = 2.0,
        max_attempts: int = 50,
    ) -> None:
        self.js = js
        self.writer = writer
        self.subject = audit_subject(writer)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._head: tuple[int, bytes] | None = None
        self._lock = asyncio.Lock()

    async def ensure_stream(self) -> None:
        """Create KMS_AUDIT if missing; an existing stream is left as it is."""
        try:
            await self.js.stream_info(STREAM)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await self.js.add_stream(stream_config())
            log.info("audit stream created", extra=fields(stream=STREAM))
        except nats.js.errors.BadRequestError:
            # Another writer created it between our look and our add.
            await self.js.stream_info(STREAM)

    async def read_head(self) -> tuple[int, bytes]:
        """(last sequence, hash to chain to). The last sequence is the stream's, even if
        that message was deleted: the publish precondition compares against it."""
        info = await self.js.stream_info(STREAM)
        last = info.state.last_seq
        if last == 0:
            return 0, GENESIS
        return last, await self._link_below(last + 1, info.state.first_seq)

    async def _link_below(self, above: int, first: int) -> bytes:
        seq = above - 1
        while seq >= max(first, 1) and above - seq <= HEAD_SEARCH_LIMIT:
            try:
                msg = await self.js.get_msg(STREAM, seq=seq, direct=True)
            except nats.js.errors.NotFoundError:
                seq -= 1
                continue
            return link_of(msg.data or b"")
        if seq < max(first, 1):
            return GENESIS
        raise Unavailable("audit.unavailable", "the audit chain head cannot be found")

    async def append(
        self,
        action: str,
        outcome: str,
        *,
        client: str = "",
        role: str = "",
        target: str = "",
        request_id: str = "",
        details: Mapping[str, str] | None = None,
    ) -> Appended:
        """Store one entry, or raise Unavailable("audit.unavailable") having stored none."""
        async with self._lock:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    if self._head is None:
                        self._head = await self.read_head()
                    last_seq, prev = self._head
                    entry = build_entry(
                        writer=self.writer,
                        action=action,
                        outcome=outcome,
                        prev_hash=prev,
                        client=client,
                        role=role,
                        target=target,
                        request_id=request_id,
                        details=details,
                    )
                    ack = await self.js.publish(
                        self.subject,
                        canonical(entry),
                        timeout=self.timeout,
                        stream=STREAM,
                        headers={EXPECTED_LAST_SEQUENCE: str(last_seq)},
                    )
                except nats.js.errors.APIError as exc:
                    self._head = None
                    if exc.err_code == WRONG_LAST_SEQUENCE:
                        # Another writer appended first: chain to its entry instead.
                        await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                        continue
                    raise self._unavailable(action, exc) from None
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    self._head = None
                    raise self._unavailable(action, exc) from None
                self._head = (ack.seq, bytes.fromhex(entry["hash"]))
                return Appended(ack.seq, entry)
            self._head = None
            raise Unavailable(
                "audit.unavailable",
                f"the audit log is too contended: {self.max_attempts} attempts lost the race",
            )

    def _unavailable(self, action: str, exc: BaseException) -> Unavailable:
        log.error(
            "audit append failed",
            extra=fields(action=action, writer=self.writer, error=type(exc).__name__),
        )
        return Unavailable("audit.unavailable", f"the audit log cannot be written: {exc}")


# -- verifying --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    kind: str  # missing | malformed | hash_mismatch | prev_mismatch
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message}


@dataclass
class ChainReport:
    entries: int = 0
    last_seq: int = 0
    head_hash: str = GENESIS.hex()
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "last_seq": self.last_seq,
            "head_hash": self.head_hash,
            "first_problem": self.problems[0].to_dict() if self.problems else None,
            "problems": [p.to_dict() for p in self.problems],
        }


class ChainVerifier:
    """Walks the chain in stream order from sequence 1. Feed every stored message; each
    broken link is reported once, and the walk carries on from the stored entry so that
    one bad entry does not make every later one look bad too."""

    def __init__(self) -> None:
        self.report = ChainReport()
        self._expected_seq = 1
        self._prev = GENESIS

    def feed(self, seq: int, raw: bytes) -> None:
        report = self.report
        gap = seq > self._expected_seq
        if seq < self._expected_seq:
            report.problems.append(
                ChainProblem(seq, "out_of_order", f"entry {seq} arrived after {seq}")
            )
            return
        if gap:
            first, last = self._expected_seq, seq - 1
            span = f"entry {first}" if first == last else f"entries {first}..{last}"
            report.problems.append(
                ChainProblem(first, "missing", f"{span} missing from the stream (deleted)")
            )
        report.entries += 1
        report.last_seq = seq
        self._expected_seq = seq + 1
        try:
            entry = parse_entry(raw)
        except ValueError as exc:
            report.problems.append(ChainProblem(seq, "malformed", f"entry {seq}: {exc}"))
            self._prev = link_of(raw)
            report.head_hash = self._prev.hex()
            return
        computed = entry_hash(entry)
        if computed != entry["hash"]:
            report.problems.append(
                ChainProblem(
                    seq,
                    "hash_mismatch",
                    f"entry {seq} does not match its hash: its contents were altered",
                )
            )
        elif entry["prev_hash"] != self._prev.hex() and not gap:
            report.problems.append(
                ChainProblem(
                    seq,
                    "prev_mismatch",
                    f"entry {seq} does not link to entry {seq - 1}: "
                    "entries were reordered or inserted, or the one before was rewritten",
                )
            )
        self._prev = bytes.fromhex(entry["hash"])
        report.head_hash = entry["hash"]

    def finish(self, last_seq: int) -> ChainReport:
        """`last_seq` is the stream's: entries deleted from the end show up here."""
        if last_seq >= self._expected_seq:
            first = self._expected_seq
            span = f"entry {first}" if first == last_seq else f"entries {first}..{last_seq}"
            self.report.problems.append(
                ChainProblem(first, "missing", f"{span} missing from the end of the stream")
            )
        return self.report


def verify_chain(records: list[tuple[int, bytes]], last_seq: int) -> ChainReport:
    verifier = ChainVerifier()
    for seq, raw in records:
        verifier.feed(seq, raw)
    return verifier.finish(last_seq)
