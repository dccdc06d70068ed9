"""The audit log's one shared definition: entry encoding, hash chain, append, verify.

Shared because the broker and the CA service append to the same chain, and kmsctl
verifies it; all three must agree byte for byte on what is hashed.

Storage. Each writer has a JetStream stream of its own, KMS_AUDIT_<WRITER> (file storage),
capturing only its subject `kms.audit.<writer>`, with its own limits (bytes and
messages; nats-server runs with `sync_interval: always`, so an acknowledged append is on
disk). A stream per writer, not one shared stream, because JetStream bounds a stream's
bytes, not a subject's: in one stream a flooding writer (say the CA's bus identity)
filled the shared size and every other writer, the broker's Sign path included, failed
with audit.full. Now a flood fills the flooder's stream only.

Migration. Data dirs from before kept every writer in the one stream KMS_AUDIT (the
legacy stream). The supervisor's setup closes it (its subjects moved to
LEGACY_SUBJECT, which nobody may publish on), keeping every entry; each writer's first
entry in its own stream links to its last entry in the legacy stream, so `verify`
walks the legacy stream first, then each writer's, and the chains run on unbroken.

Encoding. The stored bytes are the canonical JSON of the entry: keys sorted, no
whitespace, UTF-8, strings only (no floats). Canonical JSON rather than deterministic
protobuf because protobuf's "deterministic" serialization is explicitly not canonical
(it may differ between library versions and languages, and unknown fields survive
re-encoding), while sorted-key JSON can be recomputed by any auditor with any JSON
library, `jq -cS` included. The stream sequence number is NOT part of the entry: it is
assigned by the server after the hash is fixed; a missing number shows as a gap.

Group commit. One message may hold several entries: a lone entry is stored as its own
canonical JSON (as it always was), several as the canonical JSON of {"batch": [entry,
...]}, in chain order. A batch is packaging only: every entry inside still carries its
predecessor's hash and hashes exactly as a lone entry would, so an auditor walks entries,
not messages. The envelope is a one-key object rather than a bare JSON array so that a
message is always an object, and a single parse tells the two kinds apart. While one
publish is in flight, a writer's further appends queue; on the acknowledgement it chains
everything queued (up to MAX_BATCH_ENTRIES / MAX_BATCH_BYTES) and publishes it as ONE
message, so one fsync serves the whole batch and the batch is stored all or nothing.

Chain. hash = SHA-256(prev_hash || canonical(entry without "hash")), prev_hash being the
previous entry's hash (32 zero bytes for the first). Both travel hex-encoded in the
entry (formats "1" and "2"; format "3" below). One chain per writer (format "2" and on):
each writer publishes only on its own subject kms.audit.<writer> (the bus permissions
allow it no other), chains each entry to the last one on that subject, and publishes
with Nats-Expected-Last-Subject-Sequence = that entry's sequence; on "wrong last
sequence" (a replica of the same writer got there first) it re-reads its head and
retries, a bounded number of times. The server's check is atomic, so no chain forks, and
another writer's traffic, a flood included, never makes a writer lose a race. Entries of
format "1" (one global chain, from before) still verify: each links to the entry stored
before it, whoever wrote it.

Compact entries (format "3", what writers store now; issue 21, "Cheaper records"). The
same record in fewer bytes: one-letter field names, the actor flattened, and the two
links as unpadded base64url (43 characters, not 64 hex):

    {"a": action, "c": actor client, "d": details, "h": hash, "i": request_id,
     "n": target, "o": outcome, "p": prev_hash, "r": actor role, "t": time, "v": "3",
     "w": writer}

hash = SHA-256(prev_hash || canonical(entry without "h" and "p")): the link is outside the
body it seals, and still the first thing hashed, so the chain is exactly as strong (every
entry commits to its predecessor's 32 bytes). That lets a batch message store the link
once: in a batch every item after the first leaves "p" out, because it can only be the
"h" of the item before it (split_message puts it back before anything reads the item).
A lone entry and a batch's first item always carry "p", so an entry after a gap, or at
the start of a pruned window, can still be checked on its own. Readers expand a compact
entry into the long form above (check_entry), so every consumer (the verifier, TailAudit,
`kmsctl audit tail`, the fleet's hub) sees one shape whatever the version, and links are
the same 32 bytes in every format: a chain runs on from "2" into "3" unbroken. Entries
of formats "1" and "2" still verify as they always did (tests/audit/test_compact.py).
The per-message header stays: it is the compare-and-set that keeps replicas of one
writer from forking its chain, and JetStream stores it with every message. Its shorter
stream-wide form (Nats-Expected-Last-Sequence, 8 bytes less) is not the same check and
is not used: the head is read with a direct get, which on a cluster any replica may
answer from a copy a few entries behind. Checked against the subject's sequence, such a
stale head fails the compare-and-set and is read again; checked against the stream's
last sequence (read from the leader) it could pass with a link to an older entry, a fork
(seen once in tests/cluster/test_partition.py with writers on all three nodes). After a
deleted tail, too, the stream's last sequence is past its subject's last message
(tests/audit/test_writer.py, test_deleted_last_entry_is_named_and_writing_goes_on).

Authentication. The stored subject is set by nats-server from the publishing
connection's grant, so an entry's `writer` must be the subject's last token; the
verifier reports any other as `writer_mismatch`. A forged entry claiming writer=broker
can only come from the broker's own bus identity.

Limits. A writer's stream refuses, rather than discards, what is beyond its limits: a
total size (`max_bytes`), a size per message, and a count of messages. Beyond them an
append fails with ResourceExhausted("audit.full") and, like any failed append, the
operation is refused; other writers' streams are untouched.

Fail closed. An append that cannot be stored raises Unavailable("audit.unavailable") (or
ResourceExhausted("audit.full")); the broker then refuses the operation it was recording.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from edgekms.errors import InvalidArgument, ResourceExhausted, Unavailable
from edgekms.logs import fields
from edgekms.subjects import AUDIT_PREFIX, AUDIT_STREAM

log = logging.getLogger(__name__)

# The one shared stream of older versions, kept (closed) for its entries.
LEGACY_STREAM = AUDIT_STREAM
STREAM = LEGACY_STREAM  # the name older callers import
# Where the legacy stream's subjects point once closed: outside kms.audit.>, granted to
# nobody, so nothing is ever stored in it again and no writer stream overlaps it.
LEGACY_SUBJECT = "kms.audit-legacy.closed"
STREAM_PREFIX = f"{AUDIT_STREAM}_"
SUBJECT_PREFIX = AUDIT_PREFIX
GENESIS = bytes(32)
# "1": one global chain (entries written before per-writer chains); "2": a chain per writer;
# "3": a chain per writer, compact entries (see "Compact entries" above). Writers store "3".
FORMAT_VERSION = "3"
COMPACT_VERSION = "3"
LONG_VERSION = "2"
GLOBAL_CHAIN_VERSION = "1"
# JetStream's error code for a failed Nats-Expected-Last-(Subject-)Sequence check.
WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
# JetStream's "maximum messages per subject exceeded" / "maximum bytes exceeded".
STREAM_FULL = 10077
# JetStream's "insufficient storage resources available": a new stream's max_bytes is
# more than the store can reserve (its max_file_store, else 75% of the free space).
NO_ROOM = 10047
# Each writer stream's limits (docs/security.md, "Audit log", "Limits"): all it may
# hold, one message (a batch is at most MAX_BATCH_BYTES), and its count of messages.
# The broker records every decision; the others record far fewer events.
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_BROKER_MAX_BYTES = 2 * 1024**3
MAX_MESSAGE_BYTES = 96 * 1024
DEFAULT_WRITER_QUOTA = 20_000_000
# kmsctl status warns when a writer's stream is this full (bytes or messages).
WARN_FRACTION = 0.8
# Status calls a stream full with less than this left: one entry no longer fits for sure.
FULL_MARGIN = 4096
# verify keeps the first problems it finds in full, and counts the rest.
MAX_LISTED_PROBLEMS = 20
# Group-commit caps: a batch message stays far below the bus's max payload
# (mgmt/natsauth.BUS_MAX_PAYLOAD, over 1 MiB), and 128 entries cover any realistic
# number of requests in flight at once.
MAX_BATCH_ENTRIES = 128
MAX_BATCH_BYTES = 64 * 1024
BATCH_KEY = "batch"

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


def writer_stream(writer: str) -> str:
    """The stream holding one writer's chain: KMS_AUDIT_<WRITER> (a stream name may not
    hold '.', and writers are plain tokens such as broker, ca, crypto-hsm0)."""
    if not writer or any(c in writer for c in ".*> /\\") or not writer.isprintable():
        raise ValueError(f"{writer!r} is not an audit writer name")
    return f"{STREAM_PREFIX}{writer.upper()}"


def default_max_bytes(writer: str) -> int:
    return DEFAULT_BROKER_MAX_BYTES if writer == "broker" else DEFAULT_MAX_BYTES


def subject_writer(subject: str) -> str | None:
    """The writer a stored subject names (kms.audit.<writer>), or None."""
    prefix = SUBJECT_PREFIX + "."
    if not subject.startswith(prefix) or "." in subject[len(prefix) :]:
        return None
    return subject[len(prefix) :] or None


def stream_config(
    writer: str = "broker",
    max_bytes: int | None = None,
    writer_quota: int = DEFAULT_WRITER_QUOTA,
    replicas: int = 1,
) -> api.StreamConfig:
    """One writer's stream. Append-only: nothing expires, nothing is discarded, and nobody
    can delete one entry or roll entries up (deny_delete, no rollup headers, no
    per-message TTL: settings that cannot be undone on a stream, which is the point).
    Purge is allowed by the stream, and granted on the bus to the archiver alone
    (edgekms.retention: only through a sequence it archived and signed a checkpoint
    for; a purge from the front is the one removal the chain and a checkpoint can
    vouch for). Full is refused (audit.full), never made room for by dropping entries.
    Streams made before retention keep deny_purge (nats-server cannot cancel it): they
    are never pruned. `replicas`: copies on a JetStream cluster (docs/cluster.md);
    nats-server's `sync_interval: always` makes each copy fsync before the append is
    acknowledged."""
    return api.StreamConfig(
        name=writer_stream(writer),
        subjects=[audit_subject(writer)],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW,
        max_msgs=writer_quota,
        max_bytes=default_max_bytes(writer) if max_bytes is None else max_bytes,
        max_msg_size=MAX_MESSAGE_BYTES,
        max_age=0,
        num_replicas=replicas,
        allow_direct=True,
        deny_delete=True,
        deny_purge=False,
        allow_rollup_hdrs=False,
        allow_msg_ttl=False,
    )


# The least a writer's stream may be given: room for a few of the largest messages.
MIN_STREAM_BYTES = 4 * MAX_MESSAGE_BYTES
_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """`SIZE` in B, KiB, MiB or GiB (`96MiB`) as bytes; ValueError if it is not one.
    Shared by `--audit-limit` and the services' `audit_max_bytes` so both read alike."""
    number = text.rstrip("BbIiKkMmGg")
    unit = text[len(number) :].upper()
    if unit not in _UNITS or not number.isdigit():
        raise ValueError(text)
    return int(number) * _UNITS[unit]


def parse_limit(text: str) -> tuple[str, int, int]:
    """`WRITER=SIZE[/MESSAGES]` (SIZE in B, KiB, MiB or GiB: `ca=256MiB/1000000`) as
    (writer, max_bytes, max_msgs), or InvalidArgument("audit.limit_invalid")."""
    writer, sep, rest = text.partition("=")
    size, _, count = rest.partition("/")
    try:
        writer_stream(writer)
        if not sep:
            raise ValueError(text)
        max_bytes = parse_size(size)
        max_msgs = int(count) if count else DEFAULT_WRITER_QUOTA
    except ValueError:
        raise InvalidArgument(
            "audit.limit_invalid",
            f"{text!r}: want WRITER=SIZE[/MESSAGES], e.g. ca=256MiB or broker=2GiB/20000000",
        ) from None
    if max_bytes < MIN_STREAM_BYTES or max_msgs < 1:
        raise InvalidArgument(
            "audit.limit_invalid",
            f"{text!r}: a writer's stream needs at least {MIN_STREAM_BYTES} bytes and 1 message",
        )
    return writer, max_bytes, max_msgs


@dataclass(frozen=True)
class StreamLimit:
    """A deployment's limits for one writer's stream, from its service's config
    (`audit_max_bytes`, `audit_max_msgs`). Where no `kmsctl up` makes the streams (the
    board), the service creates its own with these, so they can be sized to the store."""

    max_bytes: int
    max_msgs: int = DEFAULT_WRITER_QUOTA


AUDIT_FIELDS = ("audit_max_bytes", "audit_max_msgs")


def parse_limit_fields(raw: Mapping[str, Any]) -> tuple[StreamLimit | None, list[str]]:
    """The `audit_max_bytes = "96MiB"` and optional `audit_max_msgs = 100000` of a
    service's TOML: (None, []) when absent (the defaults apply), else (limit, []), or
    (None, problems) naming the field. `audit_max_msgs` alone is refused: a count with
    the default size would still reserve the default's bytes, which is what the field
    is there to avoid."""
    if "audit_max_bytes" not in raw:
        if "audit_max_msgs" in raw:
            return None, ["audit_max_msgs: needs audit_max_bytes beside it"]
        return None, []
    size = raw["audit_max_bytes"]
    try:
        if not isinstance(size, str):
            raise ValueError(size)
        max_bytes = parse_size(size)
    except ValueError:
        return None, [
            f'audit_max_bytes: want a size such as "96MiB" (B, KiB, MiB, GiB), not {size!r}'
        ]
    if max_bytes < MIN_STREAM_BYTES:
        return None, [
            f"audit_max_bytes: {size!r} is below the least a stream needs, {MIN_STREAM_BYTES} bytes"
        ]
    count = raw.get("audit_max_msgs", DEFAULT_WRITER_QUOTA)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return None, [
            f"audit_max_msgs: want a whole number of messages of at least 1, not {count!r}"
        ]
    return StreamLimit(max_bytes, count), []


# deny_purge is not among them: a stream made before retention keeps it (nats-server
# refuses to cancel it, err 10052), and a newer one is made without it, for the archiver.
_HARDENED = (
    "deny_delete",
    "allow_rollup_hdrs",
    "discard",
    "max_msgs",
    "max_bytes",
    "max_msg_size",
)


async def _close_legacy(js: JetStreamContext) -> bool:
    """Close the shared stream of older versions: its subjects moved off kms.audit.>
    (so writer streams can take them) and hardened; every entry stays."""
    try:
        info = await js.stream_info(LEGACY_STREAM)
    except nats.js.errors.NotFoundError:
        return False
    current = info.config
    changes: dict[str, Any] = {}
    if list(current.subjects or []) != [LEGACY_SUBJECT]:
        changes["subjects"] = [LEGACY_SUBJECT]
    for name, value in (("deny_delete", True), ("deny_purge", True), ("allow_rollup_hdrs", False)):
        if getattr(current, name) != value:
            changes[name] = value
    if not changes:
        return False
    await js.update_stream(dataclasses.replace(current, **changes))
    log.warning(
        "legacy audit stream closed",
        extra=fields(stream=LEGACY_STREAM, changed=",".join(changes), messages=info.state.messages),
    )
    return True


async def harden_stream(
    js: JetStreamContext,
    writers: tuple[str, ...] | list[str] = ("broker",),
    limits: Mapping[str, tuple[int, int]] | None = None,
    replicas: int | None = None,
) -> bool:
    """Close the legacy stream, then make each writer's stream, or bring one an older
    version made to stream_config's rules (`kmsctl up` does this at start with a grant no
    service holds). `limits`: writer -> (max_bytes, max_msgs), the deployment's choice,
    applied to new and existing streams alike; without, a new stream gets the defaults
    and an existing one keeps the limits it has. `replicas` likewise: a new stream gets
    that many copies (None: one), an existing one is scaled to it only if given. True if
    anything changed."""
    changed = await _close_legacy(js)
    limits = limits or {}
    for writer in writers:
        explicit = writer in limits
        max_bytes, quota = limits.get(writer, (default_max_bytes(writer), DEFAULT_WRITER_QUOTA))
        want = stream_config(writer, max_bytes, quota, replicas or 1)
        try:
            info = await js.stream_info(want.name or "")
        except nats.js.errors.NotFoundError:
            await js.add_stream(want)
            log.info("audit stream created", extra=fields(stream=want.name, writer=writer))
            changed = True
            continue
        current = info.config
        changes = {
            name: getattr(want, name)
            for name in _HARDENED
            if getattr(current, name) != getattr(want, name)
            # Limits set before are kept, unless the deployment names new ones.
            and (
                explicit
                or not (name in ("max_bytes", "max_msgs") and (getattr(current, name) or 0) > 0)
            )
        }
        if replicas is not None and (current.num_replicas or 1) != replicas:
            changes["num_replicas"] = replicas
        if changes:
            await js.update_stream(dataclasses.replace(current, **changes))
            log.warning(
                "audit stream hardened",
                extra=fields(stream=want.name, changed=",".join(changes)),
            )
            changed = True
    return changed


@dataclass(frozen=True)
class StreamUsage:
    """How full one audit stream is, for `kmsctl status` and TailAudit's state."""

    stream: str
    writer: str  # "" for the legacy stream
    messages: int
    bytes: int
    max_msgs: int
    max_bytes: int
    first_seq: int
    last_seq: int

    @property
    def fraction(self) -> float:
        """The larger of bytes and messages used, against their limits (0 if none)."""
        parts = [
            used / limit
            for used, limit in ((self.bytes, self.max_bytes), (self.messages, self.max_msgs))
            if limit > 0
        ]
        return max(parts, default=0.0)

    @property
    def full(self) -> bool:
        """No room for another append: its message quota reached, or less than
        FULL_MARGIN bytes left (an entry is a few hundred bytes; a batch more)."""
        if self.max_msgs > 0 and self.messages >= self.max_msgs:
            return True
        return self.max_bytes > 0 and self.bytes + FULL_MARGIN > self.max_bytes

    @classmethod
    def of(cls, info: api.StreamInfo) -> StreamUsage:
        config, state = info.config, info.state
        name = config.name or ""
        subjects = list(config.subjects or [])
        writer = subject_writer(subjects[0]) if len(subjects) == 1 else None
        return cls(
            stream=name,
            writer=writer or "",
            messages=int(state.messages or 0),
            bytes=int(state.bytes or 0),
            max_msgs=int(config.max_msgs or -1),
            max_bytes=int(config.max_bytes or -1),
            first_seq=int(state.first_seq or 0),
            last_seq=int(state.last_seq or 0),
        )


async def audit_streams(js: JetStreamContext) -> list[str]:
    """Every audit stream in reading order: the legacy stream first (if there is one:
    the writers' chains start in it), then the writers' streams by name. Needs
    $JS.API.STREAM.NAMES and STREAM.INFO of the legacy stream."""
    reply = await js._nc.request(  # nats-py has no public names-by-subject
        "$JS.API.STREAM.NAMES",
        json.dumps({"subject": f"{SUBJECT_PREFIX}.>"}).encode(),
        timeout=5.0,
    )
    body = json.loads(reply.data or b"{}")
    if "error" in body:
        raise Unavailable("audit.unavailable", f"audit streams: {body['error']}")
    names = sorted(n for n in (body.get("streams") or []) if n.startswith(STREAM_PREFIX))
    try:
        await js.stream_info(LEGACY_STREAM)
    except nats.js.errors.NotFoundError:
        return names
    return [LEGACY_STREAM, *names]


def canonical(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8; strings, dicts and lists only."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The hex hash an entry (in the long form check_entry gives) must carry: over its
    prev_hash bytes and the rest of it; for format "3", over the prev_hash bytes and the
    compact body without either link ("" when the entry has no compact form, which
    matches no hash)."""
    prev = bytes.fromhex(str(entry.get("prev_hash", "")))
    if entry.get("v") == COMPACT_VERSION:
        compact = _compact_body(entry)
        return "" if compact is None else hashlib.sha256(prev + compact).hexdigest()
    body = _entry_body(entry)
    if body is None:
        body = canonical({k: v for k, v in entry.items() if k != "hash"})
    return hashlib.sha256(prev + body).hexdigest()


_ACTOR_FIELDS = frozenset({"client", "role"})


def _entry_body(entry: Mapping[str, Any]) -> bytes | None:
    """canonical() of an entry without its hash, spliced in key order instead of sorted
    by the JSON encoder: every stored entry is hashed again by the broker's periodic
    chain check (broker/metrics.py) and by `kmsctl audit verify`, so this runs once per
    decision. Only for the exact shape the writers make (every field a string, the actor
    and details objects of strings; the string encoder raises TypeError on anything
    else); any other shape (None) goes through canonical(), so the bytes are
    canonical()'s in every case (tests/audit/test_append_many.py)."""
    if entry.keys() != _ENTRY_FIELDS:
        return None
    actor = entry["actor"]
    details = entry["details"]
    if type(actor) is not dict or actor.keys() != _ACTOR_FIELDS or type(details) is not dict:
        return None
    e = _encode_str
    try:
        return "".join(
            (
                '{"action":',
                e(entry["action"]),
                ',"actor":{"client":',
                e(actor["client"]),
                ',"role":',
                e(actor["role"]),
                '},"details":{',
                ",".join([e(k) + ":" + e(v) for k, v in sorted(details.items())]),
                '},"outcome":',
                e(entry["outcome"]),
                ',"prev_hash":',
                e(entry["prev_hash"]),
                ',"request_id":',
                e(entry["request_id"]),
                ',"target":',
                e(entry["target"]),
                ',"time":',
                e(entry["time"]),
                ',"v":',
                e(entry["v"]),
                ',"writer":',
                e(entry["writer"]),
                "}",
            )
        ).encode("utf-8")
    except TypeError:  # a value that is not a string, or keys that do not sort
        return None


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_entry(**fields: Any) -> dict[str, Any]:
    """A sealed entry (with its hash) chained to `prev_hash`; the keywords of
    sealed_entry, which also gives the entry's encoding."""
    return sealed_entry(**fields)[0]


# In an entry's canonical JSON the top-level "hash" sorts right before "outcome"; every
# field after "outcome" is a plain string (a string cannot hold an unescaped quote), so
# the LAST occurrence of this is the top-level field, even if details has such a key.
_OUTCOME_KEY = b',"outcome":'


def sealed_entry(
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
    version: str = FORMAT_VERSION,
) -> tuple[dict[str, Any], bytes]:
    """build_entry's entry (in the long form, whatever `version`) and its stored bytes,
    encoded once: the writer's hot path needs both, and the bytes that were hashed differ
    from the stored ones only by the link fields, which are spliced in instead of
    encoding the entry again. `version` "2" makes the long entries of before (tests of
    old chains use it)."""
    if version == COMPACT_VERSION:
        return _sealed_compact(
            writer=writer,
            action=action,
            outcome=outcome,
            prev_hash=prev_hash,
            client=client,
            role=role,
            target=target,
            request_id=request_id,
            details={str(k): str(v) for k, v in (details or {}).items()},
            time=time or now_rfc3339(),
        )
    entry: dict[str, Any] = {
        "v": version,
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
    body = canonical(entry)
    digest = hashlib.sha256(prev_hash + body).hexdigest()
    entry["hash"] = digest
    at = body.rindex(_OUTCOME_KEY)
    return entry, b"".join((body[:at], b',"hash":"', digest.encode("ascii"), b'"', body[at:]))


_encode_str = json.encoder.encode_basestring  # canonical()'s own string encoder


# -- compact entries (format "3") --------------------------------------------------------

_COMPACT_FIELDS = frozenset({"a", "c", "d", "h", "i", "n", "o", "p", "r", "t", "v", "w"})
LINK_CHARS = 43  # unpadded base64url of 32 bytes
# In a compact entry's canonical JSON every field after "i" (n, o, r, t, v, w), and
# after "r" (t, v, w), is a plain string, which cannot hold an unescaped quote: the
# LAST occurrence of each of these is the top-level key, whatever the details hold.
_ID_KEY = b',"i":'
_ROLE_KEY = b',"r":'
_PREV_KEY = b',"p":"'


def link_text(link: bytes) -> str:
    """A 32-byte link as a compact entry stores it: unpadded base64url."""
    return base64.urlsafe_b64encode(link).rstrip(b"=").decode("ascii")


def parse_link(text: Any) -> bytes:
    """The 32 bytes of a compact link, or ValueError. Only the one spelling link_text
    makes is accepted (no padding, no stray characters, no other trailing bits), so
    that one link has one stored form."""
    if not isinstance(text, str) or len(text) != LINK_CHARS:
        raise ValueError("not a base64url SHA-256")
    try:
        link = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if len(link) != 32 or link_text(link) != text:
        raise ValueError("not a base64url SHA-256")
    return link


def _compact_body(entry: Mapping[str, Any]) -> bytes | None:
    """The hashed bytes of a long-form format-3 entry: its compact form without "h" and
    "p", canonical; None if it has no compact form (not the long shape). Spliced in key
    order for the shape the writers make (every field a string, details of strings),
    as _entry_body does for format 2, since the broker's chain check and `kmsctl audit
    verify` hash every stored entry again; canonical() for any other value, so the
    bytes are canonical()'s either way (tests/audit/test_compact.py)."""
    if entry.keys() != _ENTRY_FIELDS:
        return None
    actor = entry["actor"]
    if not isinstance(actor, dict) or actor.keys() != _ACTOR_FIELDS:
        return None
    details = entry["details"]
    if type(details) is dict:
        e = _encode_str
        try:
            return "".join(
                (
                    '{"a":',
                    e(entry["action"]),
                    ',"c":',
                    e(actor["client"]),
                    ',"d":{',
                    ",".join([e(k) + ":" + e(v) for k, v in sorted(details.items())]),
                    '},"i":',
                    e(entry["request_id"]),
                    ',"n":',
                    e(entry["target"]),
                    ',"o":',
                    e(entry["outcome"]),
                    ',"r":',
                    e(actor["role"]),
                    ',"t":',
                    e(entry["time"]),
                    ',"v":',
                    e(entry["v"]),
                    ',"w":',
                    e(entry["writer"]),
                    "}",
                )
            ).encode("utf-8")
        except TypeError:  # a value that is not a string, or keys that do not sort
            pass
    try:
        return canonical(
            {
                "a": entry["action"],
                "c": actor["client"],
                "d": entry["details"],
                "i": entry["request_id"],
                "n": entry["target"],
                "o": entry["outcome"],
                "r": actor["role"],
                "t": entry["time"],
                "v": entry["v"],
                "w": entry["writer"],
            }
        )
    except (TypeError, ValueError):
        return None


def _splice_links(body: bytes, link: bytes, prev: bytes) -> bytes:
    """A compact body with its "h" and "p" put in their sorted places (see _ID_KEY)."""
    at_i = body.rindex(_ID_KEY)
    at_r = body.rindex(_ROLE_KEY)
    return b"".join(
        (
            body[:at_i],
            b',"h":"',
            link_text(link).encode("ascii"),
            b'"',
            body[at_i:at_r],
            _PREV_KEY,
            link_text(prev).encode("ascii"),
            b'"',
            body[at_r:],
        )
    )


def without_prev(raw: bytes) -> bytes:
    """A compact entry's stored bytes without "p", for a batch item after the first
    (split_message restores it from the item before)."""
    at = raw.rindex(_PREV_KEY)
    end = at + len(_PREV_KEY) + LINK_CHARS + 1
    if raw[end - 1 : end] != b'"':
        raise ValueError("not a compact entry's bytes")
    return raw[:at] + raw[end:]


def _sealed_compact(
    *,
    writer: str,
    action: str,
    outcome: str,
    prev_hash: bytes,
    client: str,
    role: str,
    target: str,
    request_id: str,
    details: dict[str, str],
    time: str,
) -> tuple[dict[str, Any], bytes]:
    body = canonical(
        {
            "a": action,
            "c": client,
            "d": details,
            "i": request_id,
            "n": target,
            "o": outcome,
            "r": role,
            "t": time,
            "v": COMPACT_VERSION,
            "w": writer,
        }
    )
    digest = hashlib.sha256(prev_hash + body).digest()
    entry: dict[str, Any] = {
        "v": COMPACT_VERSION,
        "time": time,
        "writer": writer,
        "actor": {"client": client, "role": role},
        "action": action,
        "target": target,
        "outcome": outcome,
        "request_id": request_id,
        "details": details,
        "prev_hash": prev_hash.hex(),
        "hash": digest.hex(),
    }
    return entry, _splice_links(body, digest, prev_hash)


def stored_form(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What is stored for a long-form entry: itself for formats "1" and "2", the compact
    object for "3" (ValueError if it has no compact form)."""
    if entry.get("v") != COMPACT_VERSION:
        return dict(entry)
    body = _compact_body(entry)
    if body is None:
        raise ValueError("not an entry's long form")
    compact: dict[str, Any] = json.loads(body)
    compact["h"] = link_text(bytes.fromhex(str(entry["hash"])))
    compact["p"] = link_text(bytes.fromhex(str(entry["prev_hash"])))
    return compact


def _expand(item: dict[str, Any]) -> dict[str, Any]:
    """A stored compact entry in the long form, or ValueError saying why it is none."""
    missing = _COMPACT_FIELDS - item.keys()
    if missing:
        raise ValueError(f"missing fields {', '.join(sorted(missing))}")
    extra = item.keys() - _COMPACT_FIELDS
    if extra:
        raise ValueError(f"unknown fields {', '.join(sorted(extra))}")
    links = {}
    for name in ("p", "h"):
        try:
            links[name] = parse_link(item[name]).hex()
        except ValueError:
            raise ValueError(f"{name} is not a base64url SHA-256") from None
    if not isinstance(item["d"], dict):
        raise ValueError("d (details) must be an object")
    return {
        "v": item["v"],
        "time": item["t"],
        "writer": item["w"],
        "actor": {"client": item["c"], "role": item["r"]},
        "action": item["a"],
        "target": item["n"],
        "outcome": item["o"],
        "request_id": item["i"],
        "details": item["d"],
        "prev_hash": links["p"],
        "hash": links["h"],
    }


@dataclass(frozen=True)
class Decision:
    """One entry of AuditWriter.append_many: what differs between the decisions of one
    call (a SignBatch's items); the action, actor and time are the group's."""

    outcome: str
    target: str = ""
    request_id: str = ""
    details: Mapping[str, str] | None = None


class GroupSealer:
    """sealed_entry's bytes for many entries that share writer, action, actor and time,
    without building a dict per entry or sorting its keys again: the canonical JSON is
    spliced from pre-encoded parts in the sorted key order. The bytes and hashes are
    exactly sealed_entry's (tests/audit/test_append_many.py compares them, in both
    formats), so the chain format, `kmsctl audit verify` and the archiver are unchanged;
    what gets cheaper is the broker's CPU per decision (issue 19: ~16 µs per entry down
    to a few)."""

    def __init__(
        self,
        writer: str,
        action: str,
        client: str,
        role: str,
        time: str,
        version: str = FORMAT_VERSION,
    ) -> None:
        self.action = action
        self.compact = version == COMPACT_VERSION
        if self.compact:
            self._head = (
                b'{"a":'
                + _encode_str(action).encode()
                + b',"c":'
                + _encode_str(client).encode()
                + b',"d":'
            )
            self._tail = (
                b',"r":'
                + _encode_str(role).encode()
                + b',"t":'
                + _encode_str(time).encode()
                + b',"v":'
                + _encode_str(version).encode()
                + b',"w":'
                + _encode_str(writer).encode()
                + b"}"
            )
        else:
            self._head = (
                b'{"action":'
                + _encode_str(action).encode()
                + b',"actor":'
                + canonical({"client": client, "role": role})
                + b',"details":'
            )
            self._tail = (
                b',"time":'
                + _encode_str(time).encode()
                + b',"v":'
                + _encode_str(version).encode()
                + b',"writer":'
                + _encode_str(writer).encode()
                + b"}"
            )
        self._details: dict[tuple[tuple[str, str], ...], bytes] = {}

    def _details_of(self, details: Mapping[str, str] | None) -> bytes:
        key = tuple(sorted((str(k), str(v)) for k, v in (details or {}).items()))
        encoded = self._details.get(key)
        if encoded is None:
            encoded = self._details[key] = self._head + canonical(dict(key))
        return encoded

    def seal(
        self, decision: Decision, prev_hash: bytes, with_prev: bool = True
    ) -> tuple[bytes, bytes]:
        """(stored bytes, hash) of `decision` chained to `prev_hash`; a compact entry
        without its "p" when not `with_prev` (a batch item after the first)."""
        head = self._details_of(decision.details)
        if self.compact:
            mid = b"".join(
                (
                    b',"i":',
                    _encode_str(decision.request_id).encode(),
                    b',"n":',
                    _encode_str(decision.target).encode(),
                    b',"o":',
                    _encode_str(decision.outcome).encode(),
                )
            )
            digest = hashlib.sha256(prev_hash + head + mid + self._tail).digest()
            parts = [head, b',"h":"', link_text(digest).encode("ascii"), b'"', mid]
            if with_prev:
                parts += [_PREV_KEY, link_text(prev_hash).encode("ascii"), b'"']
            parts.append(self._tail)
            return b"".join(parts), digest
        rest = b"".join(
            (
                b',"outcome":',
                _encode_str(decision.outcome).encode(),
                b',"prev_hash":"',
                prev_hash.hex().encode(),
                b'","request_id":',
                _encode_str(decision.request_id).encode(),
                b',"target":',
                _encode_str(decision.target).encode(),
                self._tail,
            )
        )
        digest = hashlib.sha256(prev_hash + head + rest).digest()
        return b"".join((head, b',"hash":"', digest.hex().encode(), b'"', rest)), digest


def parse_entry(raw: bytes) -> dict[str, Any]:
    """The entry in `raw`, or ValueError saying why it is not one."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return check_entry(entry)


def check_entry(entry: Any) -> dict[str, Any]:
    """`entry` in the long form if it has a stored entry's shape (itself for formats "1"
    and "2", expanded for a compact "3"), or ValueError saying why not."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if entry.get("v") == COMPACT_VERSION:
        return _expand(entry)
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


def encode_message(entries: list[dict[str, Any]]) -> bytes:
    """The stored bytes for long-form entries published together (see "Group commit"
    and "Compact entries" above)."""
    stored = [stored_form(e) for e in entries]
    if len(stored) == 1:
        return canonical(stored[0])
    for item in stored[1:]:
        if item.get("v") == COMPACT_VERSION:
            del item["p"]
    return canonical({BATCH_KEY: stored})


def join_message(encoded: list[bytes]) -> bytes:
    """encode_message from the entries' canonical JSON (the canonical JSON of the batch
    envelope is exactly its items' canonical JSON joined by commas)."""
    if len(encoded) == 1:
        return encoded[0]
    return b"".join((b'{"' + BATCH_KEY.encode() + b'":[', b",".join(encoded), b"]}"))


def split_message(raw: bytes) -> list[Any] | None:
    """The items of a batch message (each still to be checked with check_entry), or None
    when `raw` is no batch envelope (then it is a lone entry, or garbage)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(value, dict) and value.keys() == {BATCH_KEY}:
        items = value[BATCH_KEY]
        if isinstance(items, list) and items:
            _restore_prev(items)
            return items
    return None


def _restore_prev(items: list[Any]) -> None:
    """Give each compact item after the first that has no "p" the "h" of the item
    before it, which is the only link it can have (see "Compact entries" above)."""
    for before, item in itertools.pairwise(items):
        if (
            isinstance(item, dict)
            and item.get("v") == COMPACT_VERSION
            and "p" not in item
            and isinstance(before, dict)
            and isinstance(before.get("h"), str)
        ):
            item["p"] = before["h"]


def parse_message(raw: bytes) -> list[dict[str, Any]]:
    """Every entry in a stored message, in chain order, or ValueError naming the first
    that is not one (e.g. "#3: missing fields hash")."""
    items = split_message(raw)
    if items is None:
        return [parse_entry(raw)]
    out = []
    for index, item in enumerate(items):
        try:
            out.append(check_entry(item))
        except ValueError as exc:
            raise ValueError(f"#{index}: {exc}") from None
    return out


def _item_link(item: Any) -> bytes:
    try:
        return bytes.fromhex(check_entry(item)["hash"])
    except ValueError:
        return hashlib.sha256(canonical({BATCH_KEY: [item]})).digest()


def link_of(raw: bytes) -> bytes:
    """What the next entry must carry as prev_hash: the (last) entry's own hash field, or,
    for bytes that are no entry at all, their SHA-256 (writer and verifier agree on this,
    so one corrupt message is reported once instead of breaking every link after it).
    A batch whose last item is no entry links by a hash of that item alone."""
    items = split_message(raw)
    if items is not None:
        return _item_link(items[-1])
    try:
        return bytes.fromhex(parse_entry(raw)["hash"])
    except ValueError:
        return hashlib.sha256(raw).digest()


# -- writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Appended:
    """Where an entry was stored: the stream sequence of the message holding it, and its
    position in that message (0 for a lone entry, 0.. for a batch)."""

    seq: int
    entry: dict[str, Any]
    index: int = 0


@dataclass
class _Pending:
    """One caller's entry waiting for a batch; its fields, not yet chained. An entry of
    append_many carries its Decision and its group's sealer instead of `fields`."""

    fields: dict[str, Any]
    done: asyncio.Future[Appended]
    decision: Decision | None = None
    sealer: GroupSealer | None = None

    @property
    def action(self) -> str:
        """For logs about the message holding this entry."""
        if self.sealer is not None:
            return self.sealer.action
        return str(self.fields["action"])


class AuditWriter:
    """Appends to one writer's chain, in its own stream, for one process with group
    commit: one publish in flight at a time, everything that queued meanwhile goes out as
    the next single message. Replicas of one writer race on the server's
    expected-last-subject-sequence check and the loser re-chains its whole batch on the
    new head and retries."""

    def __init__(
        self,
        js: JetStreamContext,
        writer: str,
        *,
        timeout: float = 2.0,
        max_attempts: int = 50,
        max_batch_entries: int = MAX_BATCH_ENTRIES,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        limit: StreamLimit | None = None,
        replicas: int = 1,
        version: str = FORMAT_VERSION,
    ) -> None:
        self.js = js
        self.writer = writer
        # The entry format this writer stores ("3"; "2" only for tests of mixed chains).
        self.version = version
        # The deployment's limits for a stream this writer creates (None: the defaults).
        self.limit = limit
        # Copies of a stream this writer creates (a cluster's choice; one otherwise).
        self.replicas = replicas
        self.subject = audit_subject(writer)
        self.stream = writer_stream(writer)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_batch_entries = max(1, max_batch_entries)
        self.max_batch_bytes = max_batch_bytes
        self._head: tuple[int, bytes] | None = None
        self._queue: list[_Pending] = []
        self._drainer: asyncio.Task[None] | None = None

    async def ensure_stream(self) -> None:
        """Create this writer's stream if missing, with the deployment's limits (the
        service config's `audit_max_bytes`/`audit_max_msgs`) or else the defaults; `kmsctl
        up` makes it first. An existing stream keeps the limits it has, as with
        harden_stream without `--audit-limit`: a service may create its stream but never
        change it (its bus grant holds no STREAM.UPDATE), so a compromised one cannot
        shrink its stream to cut entries off. A difference is logged for the operator."""
        want = (
            stream_config(self.writer, replicas=self.replicas)
            if self.limit is None
            else stream_config(
                self.writer, self.limit.max_bytes, self.limit.max_msgs, replicas=self.replicas
            )
        )
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        else:
            self._note_limits(info.config, want)
            return
        try:
            await self.js.add_stream(want)
        except nats.js.errors.APIError as exc:
            if exc.err_code == NO_ROOM:
                # Nothing was made: the service stops with a reason that names the fix.
                raise ResourceExhausted(
                    "audit.no_room",
                    f"the JetStream store cannot reserve {want.max_bytes} bytes for "
                    f"{self.stream}: give this service's config a smaller audit_max_bytes "
                    "(or kmsctl up --audit-limit), or its store more room",
                    {"stream": self.stream, "max_bytes": str(want.max_bytes)},
                ) from None
            if not isinstance(exc, nats.js.errors.BadRequestError):
                raise
            # Another replica created it between our look and our add.
            try:
                info = await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                raise exc from None
            self._note_limits(info.config, want)
            return
        log.info(
            "audit stream created",
            extra=fields(stream=self.stream, max_bytes=want.max_bytes, max_msgs=want.max_msgs),
        )

    def _note_limits(self, current: api.StreamConfig, want: api.StreamConfig) -> None:
        if self.limit is None:
            return
        if (current.max_bytes, current.max_msgs) != (want.max_bytes, want.max_msgs):
            log.warning(
                "audit stream keeps its limits",
                extra=fields(
                    stream=self.stream,
                    max_bytes=current.max_bytes,
                    max_msgs=current.max_msgs,
                    configured_max_bytes=want.max_bytes,
                    configured_max_msgs=want.max_msgs,
                ),
            )

    async def read_head(self) -> tuple[int, bytes]:
        """(sequence of this writer's last message in its stream, hash to chain to).
        A writer with no message in its stream yet chains to its last entry in the
        legacy stream (a data dir from before per-writer streams), else to GENESIS.
        Only this writer's own subject is read: other writers cannot move this head.
        The sequence goes into the next append's Nats-Expected-Last-Subject-Sequence,
        so a head read from a replica that is behind fails that append and is read
        again, never chained to (see "Compact entries" above)."""
        try:
            msg = await self.js.get_msg(self.stream, subject=self.subject, direct=True)
        except nats.js.errors.NotFoundError:
            await self.js.stream_info(self.stream)  # no stream at all is NotFoundError too
            return 0, await self._legacy_head()
        return int(msg.seq or 0), link_of(msg.data or b"")

    async def _legacy_head(self) -> bytes:
        try:
            info = await self.js.stream_info(LEGACY_STREAM)
            msg = await self.js.get_msg(
                LEGACY_STREAM, subject=self.subject, direct=bool(info.config.allow_direct)
            )
        except nats.js.errors.NotFoundError:
            return GENESIS  # no legacy stream, or nothing of this writer in it
        return link_of(msg.data or b"")

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
        """Store one entry, or raise Unavailable("audit.unavailable") having stored none.
        Returns once the message holding the entry is acknowledged (on disk)."""
        pending = _Pending(
            fields={
                "action": action,
                "outcome": outcome,
                "client": client,
                "role": role,
                "target": target,
                "request_id": request_id,
                "details": dict(details or {}),
                "time": now_rfc3339(),
            },
            done=asyncio.get_running_loop().create_future(),
        )
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            # The drain runs as its own task so that a caller cancelled mid-publish
            # does not abandon the others sharing its batch.
            self._drainer = asyncio.create_task(self._drain())
        # A cancelled caller leaves its entry to be stored or dropped as a whole batch
        # decides; it never splits one.
        return await pending.done

    async def append_many(
        self,
        action: str,
        decisions: Sequence[Decision],
        *,
        client: str = "",
        role: str = "",
    ) -> None:
        """Store one entry per decision, in order, each exactly as `append` would store
        it (same fields, same chain; an auditor sees N entries): for a call that makes
        many decisions at once (a SignBatch's items). Group commit packs them into as few
        messages as the caps allow, and they are sealed without a dict per entry.
        Returns once every message holding them is acknowledged; raises the first
        failure (Unavailable/ResourceExhausted) otherwise, in which case a prefix of the
        entries may be stored (each message is all or nothing) and the caller must treat
        every decision as unrecorded."""
        if not decisions:
            return
        loop = asyncio.get_running_loop()
        sealer = GroupSealer(self.writer, action, client, role, now_rfc3339(), self.version)
        group = [
            _Pending(fields={}, done=loop.create_future(), decision=d, sealer=sealer)
            for d in decisions
        ]
        self._queue.extend(group)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        # Messages go out in queue order, one at a time: once the last entry's is
        # settled, so is every earlier one's.
        try:
            await group[-1].done
        finally:
            failure = next(
                (
                    p.done.exception()
                    for p in group
                    if p.done.done() and not p.done.cancelled() and p.done.exception()
                ),
                None,
            )
            for p in group:
                if p.done.done() and not p.done.cancelled():
                    p.done.exception()  # retrieved: no "never retrieved" warnings
        if failure is not None:
            raise failure

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self._publish(batch)
            except (Unavailable, ResourceExhausted) as exc:
                # The whole message was refused: none of its entries is stored, and each
                # caller gets its own error object (one raised in many tasks would share
                # a traceback).
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(type(exc)(exc.reason, exc.message))
                continue
            except BaseException as exc:  # a bug or cancellation: fail the batch closed
                self._head = None
                err = self._unavailable(batch[0].action, exc)
                for p in batch + self._queue:
                    if not p.done.done():
                        p.done.set_exception(err)
                self._queue.clear()
                raise
            for p, result in zip(batch, results, strict=True):
                if not p.done.done():
                    p.done.set_result(result)

    def _take(self) -> list[_Pending]:
        """Up to max_batch_entries queued appends whose callers still wait."""
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch_entries:
            p = self._queue.pop(0)
            if not p.done.cancelled():
                batch.append(p)
        return batch

    def _chain(
        self, batch: list[_Pending], prev: bytes
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        """Seal the batch's entries in order on `prev`; entries past the byte cap go back
        to the head of the queue (the first one always goes, however big)."""
        entries: list[dict[str, Any]] = []
        encoded: list[bytes] = []
        size = len(BATCH_KEY) + 6
        for i, p in enumerate(batch):
            if p.sealer is not None and p.decision is not None:
                raw, link = p.sealer.seal(p.decision, prev, with_prev=not entries)
                size += len(raw) + 1
                if entries and size > self.max_batch_bytes:
                    self._queue[0:0] = batch[i:]
                    del batch[i:]
                    break
                # append_many's callers need no dict: only the link, for the next entry.
                entries.append({"hash": link.hex()})
                encoded.append(raw)
                prev = link
                continue
            f = p.fields
            entry, raw = sealed_entry(
                writer=self.writer,
                action=f["action"],
                outcome=f["outcome"],
                prev_hash=prev,
                client=f["client"],
                role=f["role"],
                target=f["target"],
                request_id=f["request_id"],
                details=f["details"],
                time=f["time"],
                version=self.version,
            )
            if entries and self.version == COMPACT_VERSION:
                raw = without_prev(raw)  # the item before holds the link (split_message)
            size += len(raw) + 1
            if entries and size > self.max_batch_bytes:
                self._queue[0:0] = batch[i:]
                del batch[i:]
                break
            entries.append(entry)
            encoded.append(raw)
            prev = bytes.fromhex(entry["hash"])
        return entries, encoded

    async def _publish(self, batch: list[_Pending]) -> list[Appended]:
        """Chain `batch` on the head and store it as one message; on a lost race re-chain
        on the new head. Raises Unavailable with nothing stored."""
        action = batch[0].action
        for attempt in range(1, self.max_attempts + 1):
            try:
                if self._head is None:
                    self._head = await self.read_head()
                last_seq, prev = self._head
                entries, encoded = self._chain(batch, prev)
                ack = await self.js.publish(
                    self.subject,
                    join_message(encoded),
                    timeout=self.timeout,
                    stream=self.stream,
                    headers={EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_seq)},
                )
            except nats.js.errors.APIError as exc:
                self._head = None
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    # A replica of this writer appended first: chain to its entry instead.
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                    continue
                if exc.err_code == STREAM_FULL:
                    raise self._full(action, exc, len(batch)) from None
                raise self._unavailable(action, exc, len(batch)) from None
            except (Unavailable, ResourceExhausted):
                self._head = None
                raise
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                self._head = None
                raise self._unavailable(action, exc, len(batch)) from None
            self._head = (ack.seq, bytes.fromhex(entries[-1]["hash"]))
            return [Appended(ack.seq, e, i) for i, e in enumerate(entries)]
        self._head = None
        raise Unavailable(
            "audit.unavailable",
            f"the audit log is too contended: {self.max_attempts} attempts lost the race",
        )

    def _full(self, action: str, exc: BaseException, entries: int) -> ResourceExhausted:
        log.error(
            "audit log full",
            extra=fields(
                action=action,
                writer=self.writer,
                stream=self.stream,
                entries=entries,
                limit=str(exc),
            ),
        )
        return ResourceExhausted(
            "audit.full",
            f"the audit log of {self.writer} is full (archive and rotate it, docs/security.md): "
            f"{getattr(exc, 'description', exc)}",
        )

    def _unavailable(self, action: str, exc: BaseException, entries: int = 1) -> Unavailable:
        log.error(
            "audit append failed",
            extra=fields(
                action=action, writer=self.writer, entries=entries, error=type(exc).__name__
            ),
        )
        return Unavailable("audit.unavailable", f"the audit log cannot be written: {exc}")


# -- verifying --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One broken link. `index` is the entry's position inside a batch message, None for
    a lone entry or for a problem with the message as a whole (missing, malformed)."""

    seq: int
    # missing | malformed | hash_mismatch | prev_mismatch | out_of_order | writer_mismatch
    kind: str
    message: str
    index: int | None = None
    stream: str = ""  # the stream the sequence number belongs to

    @property
    def where(self) -> str:
        """ "12" for message 12, "12 #3" for the entry at index 3 of batch message 12,
        prefixed by the stream when there is one ("KMS_AUDIT_CA 12")."""
        at = str(self.seq) if self.index is None else f"{self.seq} #{self.index}"
        return f"{self.stream} {at}" if self.stream else at

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "seq": self.seq,
            "index": self.index,
            "kind": self.kind,
            "message": self.message,
        }


@dataclass
class ChainReport:
    entries: int = 0  # entries walked, counting each one inside a batch
    messages: int = 0  # stored messages walked
    last_seq: int = 0
    head_hash: str = GENESIS.hex()  # the last entry's hash
    heads: dict[str, str] = field(default_factory=dict)  # writer -> its last entry's hash
    streams: dict[str, int] = field(default_factory=dict)  # stream -> its last sequence
    # The first MAX_LISTED_PROBLEMS problems; problem_count counts them all (a flood of
    # junk is one count, not a line per message).
    problems: list[ChainProblem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: ChainProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "messages": self.messages,
            "last_seq": self.last_seq,
            "head_hash": self.head_hash,
            "heads": dict(sorted(self.heads.items())),
            "streams": dict(self.streams),
            "first_problem": self.problems[0].to_dict() if self.problems else None,
            "problem_count": self.problem_count,
            "problems": [p.to_dict() for p in self.problems],
        }


class ChainVerifier:
    """Walks each audit stream in order from sequence 1 (the legacy stream first, then
    each writer's: `begin_stream` / `end_stream` around each), entry by entry (into
    batches): every sequence present, every entry its own hash, each format-2 entry
    linked to the last entry of its writer, across streams (format 1: to the entry before
    it), and, when the stored subject is given, each entry's writer the one the subject
    names. Each broken link is reported once, and the walk carries on from the stored
    entry so that one bad entry does not make every later one look bad too. Memory: one
    hash per writer. Without begin_stream it walks one unnamed stream (`finish`)."""

    def __init__(self) -> None:
        self.report = ChainReport()
        self._stream = ""
        self._expected_seq = 1
        self._prev = GENESIS  # format 1: the entry stored before
        self._prev_name = ""
        self._writer_prev: dict[str, tuple[bytes, str]] = {}
        # After a gap, the next entry of each writer cannot be held to its predecessor
        # (the missing message may have been that writer's): reported once, as missing.
        self._gap_excused: set[str] | None = None

    def begin_stream(self, stream: str) -> None:
        """Sequences from here on are `stream`'s, starting at 1."""
        self._stream = stream
        self._expected_seq = 1

    def resume_stream(self, stream: str, after_seq: int) -> None:
        """Carry on walking `stream` after `after_seq`, which an earlier pass of this same
        verifier reached (the broker's periodic check reads only what is new)."""
        self._stream = stream
        self._expected_seq = after_seq + 1

    def end_stream(self, last_seq: int) -> None:
        """`last_seq` is the stream's: entries deleted from its end show up here."""
        if last_seq >= self._expected_seq:
            first = self._expected_seq
            span = f"entry {first}" if first == last_seq else f"entries {first}..{last_seq}"
            self._add(first, "missing", f"{span} missing from the end of the stream")
            # The missing entries may be any writer's: each one's next entry is excused.
            self._gap_excused = set()
        if self._stream:
            self.report.streams[self._stream] = last_seq

    def _add(self, seq: int, kind: str, message: str, index: int | None = None) -> None:
        self.report.add(ChainProblem(seq, kind, message, index, self._stream))

    def add_problem(self, seq: int, kind: str, message: str) -> None:
        """A problem found beside the chain (edgekms.retention: a checkpoint, a segment)."""
        self._add(seq, kind, message)

    @property
    def next_seq(self) -> int:
        """The sequence the current stream's next message should have."""
        return self._expected_seq

    def head(self, chain: str) -> str:
        """The hex link `chain`'s next entry must carry, as walked so far ("" if none)."""
        link = self._writer_prev.get(chain)
        return link[0].hex() if link else ""

    def resume(self, seq: int, chain: str, link: bytes | None, name: str) -> None:
        """Go on after `seq` of the current stream, whose earlier messages are not walked
        here (archived and purged): with `chain`'s link at `seq` (a checkpoint's hash), or
        without one (None: the next entry's link cannot be checked, as after a gap)."""
        self._expected_seq = seq + 1
        if link is None:
            self._gap_excused = set()
            return
        self._writer_prev[chain] = (link, name)
        if self._gap_excused is not None:
            self._gap_excused.add(chain)

    def feed(self, seq: int, raw: bytes, subject: str | None = None) -> None:
        report = self.report
        gap = seq > self._expected_seq
        if seq < self._expected_seq:
            self._add(seq, "out_of_order", f"entry {seq} arrived after {seq}")
            return
        if gap:
            first, last = self._expected_seq, seq - 1
            span = f"entry {first}" if first == last else f"entries {first}..{last}"
            self._add(first, "missing", f"{span} missing from the stream (deleted)")
            self._gap_excused = set()
        report.messages += 1
        report.last_seq = seq
        self._expected_seq = seq + 1
        named = subject_writer(subject) if subject is not None else None
        items = split_message(raw)
        if items is None:
            report.entries += 1
            try:
                entry = parse_entry(raw)
            except ValueError as exc:
                self._add(seq, "malformed", f"entry {seq}: {exc}")
                self._advance(link_of(raw), f"entry {seq}", named or "")
                return
            self._check(entry, seq, None, gap, subject, named)
            return
        for index, item in enumerate(items):
            report.entries += 1
            try:
                entry = check_entry(item)
            except ValueError as exc:
                self._add(seq, "malformed", f"entry {seq} #{index}: {exc}", index)
                self._advance(_item_link(item), f"entry {seq} #{index}", named or "")
                continue
            self._check(entry, seq, index, gap and index == 0, subject, named)

    def _check(
        self,
        entry: dict[str, Any],
        seq: int,
        index: int | None,
        gap: bool,
        subject: str | None,
        named: str | None,
    ) -> None:
        name = f"entry {seq}" if index is None else f"entry {seq} #{index}"
        if self._stream:
            name = f"{self._stream} {name}"
        writer = str(entry["writer"])
        chain = named or writer
        if subject is not None and writer != named:
            self._add(
                seq,
                "writer_mismatch",
                f"{name} claims writer {writer!r} but was stored on {subject!r}: "
                "only that subject's own bus identity can publish there",
                index,
            )
        if entry["v"] == GLOBAL_CHAIN_VERSION:
            prev, before = self._prev, self._prev_name
            excused = gap
        else:
            prev, before = self._writer_prev.get(chain, (GENESIS, ""))
            excused = self._gap_excused is not None and chain not in self._gap_excused
            if self._gap_excused is not None:
                self._gap_excused.add(chain)
        if entry_hash(entry) != entry["hash"]:
            self._add(
                seq,
                "hash_mismatch",
                f"{name} does not match its hash: its contents were altered",
                index,
            )
        elif entry["prev_hash"] != prev.hex() and not excused:
            before = before or "the start of the chain"
            self._add(
                seq,
                "prev_mismatch",
                f"{name} does not link to {before}: "
                "entries were reordered or inserted, or the one before was rewritten",
                index,
            )
        self._advance(bytes.fromhex(entry["hash"]), name, chain)

    def _advance(self, link: bytes, name: str, chain: str) -> None:
        self._prev = link
        self._prev_name = name
        self._writer_prev[chain] = (link, name)
        self.report.head_hash = link.hex()
        if chain:
            self.report.heads[chain] = link.hex()

    def finish(self, last_seq: int | None = None) -> ChainReport:
        """The report; `last_seq` ends the current stream first (see end_stream)."""
        if last_seq is not None:
            self.end_stream(last_seq)
        return self.report


def verify_chain(
    records: list[tuple[int, bytes]] | list[tuple[int, bytes, str]], last_seq: int
) -> ChainReport:
    """Records are (seq, raw) or (seq, raw, subject); with subjects, writers are checked."""
    verifier = ChainVerifier()
    for record in records:
        verifier.feed(*record)
    return verifier.finish(last_seq)
