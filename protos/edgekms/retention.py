"""Audit retention: archive segments, signed checkpoints, and the proof across both.

Shared because the broker's archiver writes archives and checkpoints and kmsctl proves
them; both must agree byte for byte on what is signed.

Why. Nothing leaves a writer's stream on its own (edgekms.audit: discard "new", no
expiry), so without retention a busy stream fills and every operation it records is
refused. The archiver keeps each stream to a bounded window (a fraction of its
max_bytes, and an age): before the oldest messages leave, it

1. writes them, untouched, to a gzip-compressed JSON Lines segment in the archive dir
   (`<dir>/<STREAM>/<first>-<last>.jsonl.gz`, one line per stored message: its
   sequence, subject and bytes), through a temporary file, fsynced, then renamed;
2. writes a CHECKPOINT beside it (`<first>-<last>.checkpoint.json`): the writer's chain
   head at the segment's last sequence, the segment's SHA-256, the time, signed in the
   token with the internal CA's key (ECDSA P-256 over SHA-256 of a domain tag and the
   checkpoint's canonical JSON), likewise atomically;
3. only then purges the stream up to that sequence (JetStream purge with a `seq` upper
   bound). The last message always stays: the writer chains its next entry to it.

A crash between the steps leaves either nothing new (a temporary file, removed on the
next round), or a checkpoint whose messages are still in the stream (the next round
purges what it covers, nothing else). Purging is bounded by a checkpoint: the archiver
never purges past the newest checkpoint it wrote.

Proof. The window alone: its first message follows the newest checkpoint, whose hash
is the link the first entry must carry (`kmsctl audit verify`). The archives and the
window: every segment in order from sequence 1, each checked against its signed
checkpoint (the file's SHA-256, the chain head at its end), then the window
(`kmsctl audit verify --archive DIR`). Problems are typed (CHECKPOINT_PROBLEMS) and
reported like the chain's own (edgekms.audit.ChainProblem).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import gzip
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms.audit import STREAM_PREFIX, ChainVerifier, canonical, writer_stream
from edgekms.errors import InvalidArgument, ResourceExhausted, Unavailable

# What a checkpoint signature covers, so that no other signature of the internal CA's
# key (a certificate, a CRL) can pass for one.
DOMAIN = b"edgekms-audit-checkpoint-v1\x00"
CHECKPOINT_VERSION = "1"
SEGMENT_SUFFIX = ".jsonl.gz"
CHECKPOINT_SUFFIX = ".checkpoint.json"
TMP_SUFFIX = ".tmp"
# A segment holds at most this many bytes of stored messages (before compression).
DEFAULT_SEGMENT_BYTES = 1024 * 1024
# The window: this fraction of a stream's max_bytes stays in the stream; archiving
# starts beyond it, so the other half is room for the archiver to fall behind in.
DEFAULT_WINDOW_FRACTION = 0.5
# The window's age: older messages are archived even if the window has room (7 days).
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_INTERVAL_S = 30.0
# Problem kinds the archive and checkpoint checks add to edgekms.audit's.
CHECKPOINT_PROBLEMS = (
    "checkpoint_missing",  # the window starts after sequence 1 and no checkpoint says why
    "checkpoint_invalid",  # not a checkpoint, a bad signature, or an unknown key
    "checkpoint_mismatch",  # the chain at the checkpoint's sequence has another head
    "archive_tampered",  # a segment whose bytes are not the ones its checkpoint signed
    "segment_missing",  # sequences neither in a segment nor in the window
)
_HEX64 = frozenset("0123456789abcdef")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Signer = Callable[[bytes], Awaitable[bytes]]


class CheckpointError(ValueError):
    """A checkpoint that does not hold: `kind` is one of CHECKPOINT_PROBLEMS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RetentionPolicy:
    """How much of a stream stays in it: `window_fraction` of its max_bytes and
    messages, no message older than `max_age_s` (0: no age bound)."""

    window_fraction: float = DEFAULT_WINDOW_FRACTION
    max_age_s: float = DEFAULT_MAX_AGE_S
    # Once past its window a stream is archived down to this share of the window, so
    # that a busy writer makes a segment every few rounds, not a tiny one every round.
    low_water: float = 0.75
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    interval_s: float = DEFAULT_INTERVAL_S


def key_id(public_key_der: bytes) -> str:
    """The hex SHA-256 of a SubjectPublicKeyInfo: which key signed a checkpoint."""
    return hashlib.sha256(public_key_der).hexdigest()


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


@dataclass(frozen=True)
class Checkpoint:
    """The chain head of one writer's stream at `last_seq`, after a segment was archived."""

    stream: str
    writer: str
    first_seq: int  # the segment's first and last stream sequence
    last_seq: int
    hash: str  # the writer's chain link after last_seq (edgekms.audit.link_of)
    messages: int
    time: str
    segment: str  # the segment's file name, beside the checkpoint
    sha256: str  # of the segment file's bytes
    key: str  # key_id of the signing key
    signature: str = ""  # hex DER ECDSA signature over DOMAIN + body()
    v: str = CHECKPOINT_VERSION

    def body(self) -> bytes:
        """What is signed: the canonical JSON of every field but the signature."""
        data = asdict(self)
        del data["signature"]
        return canonical(data)

    def digest(self) -> bytes:
        return hashlib.sha256(DOMAIN + self.body()).digest()

    def to_json(self) -> bytes:
        return canonical(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Checkpoint:
        """The checkpoint in `raw`, or CheckpointError("checkpoint_invalid") saying why."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError("checkpoint_invalid", f"not JSON: {exc}") from None
        names = {f for f in cls.__dataclass_fields__}
        if not isinstance(data, dict) or set(data) != names:
            raise CheckpointError("checkpoint_invalid", "not a checkpoint's fields")
        ints = ("first_seq", "last_seq", "messages")
        for name in names:
            value = data[name]
            want = int if name in ints else str
            if isinstance(value, bool) or not isinstance(value, want):
                raise CheckpointError("checkpoint_invalid", f"{name} is not a {want.__name__}")
        if data["v"] != CHECKPOINT_VERSION:
            raise CheckpointError("checkpoint_invalid", f"unknown checkpoint version {data['v']}")
        if not all(_hex64(data[n]) for n in ("hash", "sha256", "key")):
            raise CheckpointError("checkpoint_invalid", "hash, sha256 and key must be hex SHA-256")
        if not 1 <= data["first_seq"] <= data["last_seq"]:
            raise CheckpointError("checkpoint_invalid", "its sequences are not a range")
        try:
            if writer_stream(data["writer"]) != data["stream"]:
                raise ValueError(data["stream"])
        except ValueError:
            raise CheckpointError(
                "checkpoint_invalid", "its stream is not its writer's stream"
            ) from None
        if data["segment"] != segment_name(data["first_seq"], data["last_seq"]):
            raise CheckpointError("checkpoint_invalid", "its segment name is not its range's")
        return cls(**data)

    def verify(self, trusted: dict[str, ec.EllipticCurvePublicKey]) -> None:
        """CheckpointError("checkpoint_invalid") unless signed by one of `trusted`
        (key_id -> public key)."""
        public = trusted.get(self.key)
        if public is None:
            raise CheckpointError(
                "checkpoint_invalid",
                f"checkpoint {self.stream} {self.last_seq} is signed by a key that is not "
                "the internal CA's (not in the client's CA file)",
            )
        try:
            public.verify(
                bytes.fromhex(self.signature), DOMAIN + self.body(), ec.ECDSA(hashes.SHA256())
            )
        except (InvalidSignature, ValueError):
            raise CheckpointError(
                "checkpoint_invalid",
                f"checkpoint {self.stream} {self.last_seq}: the signature does not verify",
            ) from None


def trusted_keys(ca_pem: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The EC keys of a PEM CA bundle (the client's ca.crt holds the internal CA), by
    key_id: the keys a checkpoint may be signed with."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for cert in x509.load_pem_x509_certificates(ca_pem):
        public = cert.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            keys[key_id(der)] = public
    return keys


def segment_name(first: int, last: int) -> str:
    """Zero-padded so that names sort as sequences do."""
    return f"{first:020d}-{last:020d}{SEGMENT_SUFFIX}"


def checkpoint_name(first: int, last: int) -> str:
    return f"{first:020d}-{last:020d}{CHECKPOINT_SUFFIX}"


def encode_line(seq: int, subject: str, raw: bytes) -> bytes:
    """One stored message as a segment line: canonical JSON, its bytes as text when they
    are UTF-8 (audit entries are), else base64, so every line is exactly one message."""
    try:
        text: dict[str, Any] = {"seq": seq, "subject": subject, "raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        text = {"seq": seq, "subject": subject, "b64": base64.b64encode(raw).decode()}
    return canonical(text) + b"\n"


def decode_segment(data: bytes) -> list[tuple[int, bytes, str]]:
    """A segment file's messages (seq, raw, subject), or ValueError if it is not one."""
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"not a gzip segment: {exc}") from None
    out: list[tuple[int, bytes, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            item = json.loads(line)
            seq, subject = item["seq"], item["subject"]
            raw = item["raw"].encode() if "raw" in item else base64.b64decode(item["b64"])
            if not isinstance(seq, int) or not isinstance(subject, str):
                raise TypeError(seq)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {number} is not a stored message: {exc}") from None
        out.append((seq, raw, subject))
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all: a temporary file beside it, fsynced, renamed,
    the directory fsynced. A full file system is ResourceExhausted("audit.archive_no_space")
    and any other failure Unavailable("audit.archive_failed"); either way the temporary
    file is removed and `path` is untouched."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in NO_SPACE:
            raise ResourceExhausted(
                "audit.archive_no_space",
                f"no room to write the audit archive {path.name} in {path.parent}: "
                "free space there or ship archives away (docs/security.md)",
                {"path": str(path.parent)},
            ) from None
        raise Unavailable(
            "audit.archive_failed", f"cannot write the audit archive {path}: {exc.strerror}"
        ) from None


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stream_dir(archive_dir: Path, stream: str) -> Path:
    return archive_dir / stream


def checkpoint_files(archive_dir: Path, stream: str) -> list[Path]:
    """A stream's checkpoint files, oldest first (names sort as sequences do)."""
    folder = stream_dir(archive_dir, stream)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(CHECKPOINT_SUFFIX))


def newest_checkpoint(archive_dir: Path, stream: str) -> bytes:
    """The newest checkpoint file's bytes, or b"" (TailAudit hands it out as it is)."""
    files = checkpoint_files(archive_dir, stream)
    if not files:
        return b""
    try:
        return files[-1].read_bytes()
    except OSError:
        return b""


@dataclass(frozen=True)
class ArchivedSegment:
    """One segment as the archive holds it: its checkpoint (parsed and verified) and its
    messages, or the problem that stops it from counting."""

    checkpoint: Checkpoint | None
    messages: list[tuple[int, bytes, str]]
    problem: CheckpointError | None = None
    path: str = ""


def read_archive(
    archive_dir: Path, stream: str, trusted: dict[str, ec.EllipticCurvePublicKey]
) -> Iterator[ArchivedSegment]:
    """A stream's segments in order, each checked against its signed checkpoint: the
    signature, the segment file's SHA-256 and its sequence range. A segment whose
    checkpoint or bytes fail is yielded with its problem and no messages; a segment file
    without a checkpoint counts for nothing (it was never signed)."""
    for path in checkpoint_files(archive_dir, stream):
        try:
            checkpoint = Checkpoint.from_json(path.read_bytes())
            checkpoint.verify(trusted)
            if checkpoint.stream != stream:
                raise CheckpointError(
                    "checkpoint_invalid", f"{path.name} is a checkpoint of {checkpoint.stream}"
                )
        except CheckpointError as exc:
            yield ArchivedSegment(None, [], exc, str(path))
            continue
        except OSError as exc:
            yield ArchivedSegment(
                None, [], CheckpointError("checkpoint_invalid", f"{path}: {exc}"), str(path)
            )
            continue
        segment = path.parent / checkpoint.segment
        try:
            data = segment.read_bytes()
        except OSError:
            yield ArchivedSegment(
                checkpoint,
                [],
                CheckpointError(
                    "segment_missing", f"{segment.name}: the segment its checkpoint signed is gone"
                ),
                str(segment),
            )
            continue
        if hashlib.sha256(data).hexdigest() != checkpoint.sha256:
            yield ArchivedSegment(
                checkpoint,
                [],
                CheckpointError(
                    "archive_tampered",
                    f"{segment.name}: its bytes are not the ones its checkpoint signed",
                ),
                str(segment),
            )
            continue
        try:
            messages = decode_segment(data)
        except ValueError as exc:  # signed, yet unreadable: written wrong, not tampered
            yield ArchivedSegment(
                checkpoint,
                [],
                CheckpointError("archive_tampered", f"{segment.name}: {exc}"),
                str(segment),
            )
            continue
        seqs = [m[0] for m in messages]
        if seqs != list(range(checkpoint.first_seq, checkpoint.last_seq + 1)):
            yield ArchivedSegment(
                checkpoint,
                [],
                CheckpointError(
                    "archive_tampered",
                    f"{segment.name}: its messages are not sequences "
                    f"{checkpoint.first_seq}..{checkpoint.last_seq}",
                ),
                str(segment),
            )
            continue
        yield ArchivedSegment(checkpoint, messages, None, str(segment))


def stream_chain(stream: str) -> str:
    """The writer whose chain a writer's stream holds (KMS_AUDIT_CRYPTO-HSM0: crypto-hsm0)."""
    return stream[len(STREAM_PREFIX) :].lower() if stream.startswith(STREAM_PREFIX) else ""


class StreamProof:
    """Proves streams that retention has pruned, around edgekms.audit.ChainVerifier: per
    stream, `begin` (its state and the broker's newest checkpoint), `feed` each message
    of the window, `end`. With `archive_dir`, the stream's archived segments are walked
    first, each against its signed checkpoint, so the chain is proven from sequence 1;
    without, the window is proven from the newest checkpoint (the link its first entry
    must carry). `trusted`: the keys a checkpoint may be signed with (trusted_keys)."""

    def __init__(
        self,
        verifier: ChainVerifier,
        trusted: dict[str, ec.EllipticCurvePublicKey],
        archive_dir: Path | None = None,
    ) -> None:
        self.verifier = verifier
        self.trusted = trusted
        self.archive_dir = archive_dir
        self.segments = 0  # archived segments proven
        self.checkpoints: dict[str, int] = {}  # stream -> last sequence a checkpoint covers
        self._skip_through = 0
        self._pending: Checkpoint | None = None
        self._chain = ""

    def begin(
        self, stream: str, first_seq: int, last_seq: int, messages: int, newest: bytes
    ) -> None:
        v = self.verifier
        v.begin_stream(stream)
        self._chain = chain = stream_chain(stream)
        self._pending = None
        archived = 0
        if self.archive_dir is not None:
            for segment in read_archive(self.archive_dir, stream, self.trusted):
                cp = segment.checkpoint
                if segment.problem is not None:
                    v.add_problem(
                        cp.last_seq if cp else 0, segment.problem.kind, str(segment.problem)
                    )
                    continue
                assert cp is not None
                if cp.first_seq < v.next_seq:
                    v.add_problem(
                        cp.first_seq,
                        "archive_tampered",
                        f"{cp.segment} overlaps the segment before it",
                    )
                    continue
                for seq, raw, subject in segment.messages:
                    v.feed(seq, raw, subject)
                self._check_head(cp)
                archived = cp.last_seq
                self.segments += 1
                self.checkpoints[stream] = cp.last_seq
        self._skip_through = archived
        start = first_seq if messages else last_seq + 1
        expected = v.next_seq
        if start <= expected:
            return  # nothing purged beyond what was walked (the rest overlaps: skipped)
        if archived or (self.archive_dir is not None and start > 1):
            v.add_problem(
                expected,
                "segment_missing",
                f"entries {expected}..{start - 1} of {stream} are neither in the archive "
                "nor in the stream",
            )
        checkpoint = self._newest(stream, newest, start)
        if checkpoint is None:
            v.resume(start - 1, chain, None, "")
            return
        self.checkpoints[stream] = max(self.checkpoints.get(stream, 0), checkpoint.last_seq)
        if checkpoint.last_seq == start - 1:
            v.resume(
                start - 1,
                chain,
                bytes.fromhex(checkpoint.hash),
                f"checkpoint {stream} {checkpoint.last_seq}",
            )
        elif checkpoint.last_seq < start - 1:
            v.add_problem(
                checkpoint.last_seq + 1,
                "missing",
                f"entries {checkpoint.last_seq + 1}..{start - 1} left {stream} past its "
                "newest checkpoint",
            )
            v.resume(start - 1, chain, None, "")
        else:  # checkpointed, not yet purged: the chain must pass through its hash
            v.resume(start - 1, chain, None, "")
            self._pending = checkpoint

    def _newest(self, stream: str, raw: bytes, start: int) -> Checkpoint | None:
        v = self.verifier
        if not raw:
            if self.archive_dir is None:
                v.add_problem(
                    start - 1,
                    "checkpoint_missing",
                    f"entries 1..{start - 1} left {stream} and no checkpoint vouches for them",
                )
            return None
        try:
            checkpoint = Checkpoint.from_json(raw)
            checkpoint.verify(self.trusted)
            if checkpoint.stream != stream:
                raise CheckpointError("checkpoint_invalid", f"a checkpoint of {checkpoint.stream}")
        except CheckpointError as exc:
            v.add_problem(start - 1, exc.kind, f"newest checkpoint of {stream}: {exc}")
            return None
        return checkpoint

    def _check_head(self, cp: Checkpoint) -> None:
        if self.verifier.head(self._chain) != cp.hash:
            self.verifier.add_problem(
                cp.last_seq,
                "checkpoint_mismatch",
                f"the chain of {cp.stream} at {cp.last_seq} is not the head its checkpoint signed",
            )

    def feed(self, seq: int, raw: bytes, subject: str) -> None:
        if seq <= self._skip_through:
            return  # archived and proven already; the purge had not run yet
        self.verifier.feed(seq, raw, subject)
        if self._pending is not None and seq == self._pending.last_seq:
            self._check_head(self._pending)
            self._pending = None

    def end(self, last_seq: int) -> None:
        if self._pending is not None:
            self.verifier.add_problem(
                self._pending.last_seq,
                "checkpoint_mismatch",
                f"the newest checkpoint of {self._pending.stream} is past the stream's end",
            )
            self._pending = None
        self.verifier.end_stream(last_seq)


def parse_window_fraction(value: Any) -> float:
    """The window's share of a stream's limit: more than 0, at most 0.8 (from 80 % a
    stream shows WARN, so the window must end below it), or InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 0.8:
        raise InvalidArgument(
            "audit.retention_invalid",
            f"the audit window must be a fraction above 0 and at most 0.8, not {value!r}",
        )
    return float(value)


__all__ = [
    "CHECKPOINT_PROBLEMS",
    "DOMAIN",
    "ArchivedSegment",
    "Checkpoint",
    "CheckpointError",
    "RetentionPolicy",
    "Signer",
    "StreamProof",
    "checkpoint_files",
    "checkpoint_name",
    "decode_segment",
    "encode_line",
    "key_id",
    "newest_checkpoint",
    "read_archive",
    "segment_name",
    "trusted_keys",
    "write_atomic",
]
