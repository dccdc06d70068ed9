"""Registry records signed by their rightful writer, and checked on every read.

Bucket permissions (mgmt/natsauth.py) say who may *publish* on a key's subject; they
cannot stop a process holding one of those identities from writing a record it does not
own (the broker's identity may write all of kms_keys, ca/root included), nor someone
with the JetStream files on disk from editing bytes. So every value in kms_keys,
kms_clients and kms_ca is an edgekms.v1.SealedRecord: the payload, the writer identity
("broker", "ca", "ceremony") and an Ed25519 signature over bucket, key, writer, origin
and payload. Each writer holds only its own private key (a 0600 file named by its own
config, made by `kmsctl up`); every reader holds all the writers' public keys, so it can
verify but never forge. The signature covers the bucket and the key, so a genuine record
copied under another key (or into another bucket) fails too.

Replay. A signature alone cannot tell a writer's current record from its own older one
written back under the same key (an older, looser policy of a user key). So a record
(format 2) also signs a `counter`: at least one above the highest this writer has seen
for the key, and at least the writer's clock in microseconds, so it grows across deletes
and restarts. Every reader keeps the highest counter it has seen per record with the
revision it was stored at (CounterBook), and refuses a record stored at a LATER revision
with a LOWER counter: "record.replayed". (A record at an earlier revision with a lower
counter is just an old one delivered late, as followers may.) A writer's book is kept in
a file of its own (seal_counter_file, 0600, beside its key), so a replay made while it
was down is caught when it starts and reads the bucket again. Format-1 records (no
counter, from before) still open, as counter 0: any format-2 record of the key outranks
them.

Which writer may seal which key is fixed here (`owner_of`): the CA's records and its keys
ca/root and ca/intermediate are the CA's, the internal CA's key edgekms/internal-ca the
ceremony's, everything else in kms_keys and kms_clients the broker's. The broker may also
*amend* the state, policy and labels of a CA- or ceremony-owned key record (`kmsctl key
disable ca/root`), but only by carrying the owner's own sealed record as `origin`, whose
key material (provider, key type, key id, public key) the amendment must keep: a
broker-signed ca/root with another public key is refused like an unsigned one.

A record that fails any check raises TamperedRecord (FAILED_PRECONDITION, reasons
"record.*") and logs event=record_tampered: the record is not used, and the operation
that needed it fails closed. Verification happens where a record is read from the bucket
(the broker's followers cache what they verified), never per request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from nats.js.kv import KeyValue

from edgekms.errors import FailedPrecondition
from edgekms.logs import fields
from edgekms.subjects import CA_BUCKET, CLIENTS_BUCKET, KEY_REGISTRY_BUCKET
from edgekms.v1 import common_pb2, sealed_pb2

log = logging.getLogger(__name__)

SEAL_VERSION = 2
LEGACY_SEAL_VERSION = 1  # no counter: records sealed before replay protection
_DOMAINS = {LEGACY_SEAL_VERSION: b"edgekms.sealed.v1", SEAL_VERSION: b"edgekms.sealed.v2"}

WRITER_BROKER = "broker"
WRITER_CA = "ca"
WRITER_CEREMONY = "ceremony"
WRITERS = (WRITER_BROKER, WRITER_CA, WRITER_CEREMONY)

# Keys of kms_keys written by their owner outside the broker (mgmt.natsauth grants the
# same keys to the same identities).
CA_OWNED_KEYS = ("ca/root", "ca/intermediate", "ca/spiffe", "ca/spiffe-jwt")
# A rotation's intermediates are recorded as ca/intermediate-<generation> (ca_service.hierarchy),
# a SPIFFE rotation's keys as ca/spiffe-<generation>, ca/spiffe-jwt-<generation>.
CA_OWNED_KEY_RE = re.compile(
    r"^ca/(?:root|intermediate(?:-[0-9]{1,9})?|spiffe(?:-[0-9]{1,9})?|spiffe-jwt(?:-[0-9]{1,9})?)$"
)
CEREMONY_OWNED_KEYS = ("edgekms/internal-ca",)
SEALED_BUCKETS = (KEY_REGISTRY_BUCKET, CLIENTS_BUCKET, CA_BUCKET)
# How many verified envelopes a process remembers (RecordSeal._envelope): records read
# again and again are few (the CA's own key records); a bulk read just cycles through.
VERIFIED_MEMO = 64
# What an amendment of another owner's key record must leave as the owner sealed it.
IDENTITY_FIELDS = ("name", "provider", "key_type", "key_id", "public_key_der")


class TamperedRecord(FailedPrecondition):
    """A record whose seal is missing, wrong, or made by a writer who does not own it."""


def owner_of(bucket: str, key: str) -> str:
    """The one writer whose seal makes a record of `key` in `bucket` its own."""
    if bucket == KEY_REGISTRY_BUCKET:
        if CA_OWNED_KEY_RE.match(key):
            return WRITER_CA
        if key in CEREMONY_OWNED_KEYS:
            return WRITER_CEREMONY
        return WRITER_BROKER
    if bucket == CLIENTS_BUCKET:
        return WRITER_BROKER
    # kms_ca and the CA's own buckets (tests give it other names).
    return WRITER_CA


def may_amend(bucket: str, key: str, writer: str) -> bool:
    """Whether `writer` may change a record it does not own (keeping its key material)."""
    return (
        bucket == KEY_REGISTRY_BUCKET
        and writer == WRITER_BROKER
        and owner_of(bucket, key) != WRITER_BROKER
    )


def _message(
    bucket: str,
    key: str,
    writer: str,
    origin: bytes,
    payload: bytes,
    version: int = SEAL_VERSION,
    counter: int = 0,
) -> bytes:
    # Length-prefixed, so no two different tuples give the same bytes.
    parts = [_DOMAINS[version], bucket.encode(), key.encode(), writer.encode(), origin, payload]
    if version >= SEAL_VERSION:
        parts.append(counter.to_bytes(8, "big"))
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class CounterBook:
    """The highest counter seen per record (bucket and key) and the revision it was
    stored at; in memory, and with a path also in an append-only file (0600) that a
    restart reads back, so a replay made while this process was down is caught.

    The file is lines `bucket<TAB>key<TAB>counter<TAB>revision`; the last line of a key
    wins, a torn last line (a crash mid-write) is skipped, and the file is rewritten
    compactly at load when it holds far more lines than records."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._held: dict[str, tuple[int, int]] = {}
        self._file: Any = None
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        lines = 0
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    lines += 1
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
                        continue
                    self._held[f"{parts[0]}/{parts[1]}"] = (int(parts[2]), int(parts[3]))
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        if lines > 2 * len(self._held) + 1024:
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for name, (counter, revision) in self._held.items():
                    bucket, _, key = name.partition("/")
                    f.write(f"{bucket}\t{key}\t{counter}\t{revision}\n")
            os.replace(tmp, path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def held(self, bucket: str, key: str) -> tuple[int, int]:
        """(counter, revision) of the highest record seen; (0, 0) for none."""
        return self._held.get(f"{bucket}/{key}", (0, 0))

    def check(self, bucket: str, key: str, counter: int, revision: int | None) -> None:
        """TamperedRecord("record.replayed") for a record stored after the one held but
        carrying a lower counter: a writer's older record written back."""
        held_counter, held_revision = self.held(bucket, key)
        if revision is not None and revision > held_revision and counter < held_counter:
            raise TamperedRecord(
                "record.replayed",
                f"record {bucket}/{key} at revision {revision} is older (counter {counter}) "
                f"than one seen before (counter {held_counter}, revision {held_revision}): "
                "a genuine older record written back",
                {
                    "bucket": bucket,
                    "key": key,
                    "counter": str(counter),
                    "held_counter": str(held_counter),
                },
            )

    def observe(self, bucket: str, key: str, counter: int, revision: int | None) -> None:
        """Remember a record read or written (revision None: not known, kept as 0)."""
        name = f"{bucket}/{key}"
        held = self._held.get(name, (0, 0))
        new = (counter, revision or 0)
        if new <= held:
            return
        self._held[name] = new
        if self._file is not None:
            self._file.write(f"{bucket}\t{key}\t{new[0]}\t{new[1]}\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(text: str) -> Ed25519PublicKey:
    """A writer's public key as configs carry it: 64 hex digits (the raw Ed25519 key)."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """A writer's private key file (PEM PKCS#8, 0600, made by `kmsctl up`)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        problem = getattr(exc, "strerror", None) or type(exc).__name__
        raise FailedPrecondition(
            "seal.key_unreadable", f"cannot read the record sealing key {path}: {problem}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FailedPrecondition("seal.key_unreadable", f"{path} is not an Ed25519 key")
    return key


def new_signing_key_pem() -> tuple[bytes, str]:
    """A fresh writer key: (PEM for its 0600 file, public key hex for every config)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, public_key_hex(key.public_key())


class RecordSeal:
    """One process's view of sealing: its own writer key (if it writes) and every
    writer's public key (to verify what it reads)."""

    def __init__(
        self,
        writer: str | None,
        signing_key: Ed25519PrivateKey | None,
        public_keys: Mapping[str, Ed25519PublicKey],
        counters: CounterBook | None = None,
    ) -> None:
        if (writer is None) != (signing_key is None):
            raise ValueError("a writer needs its signing key, and a key its writer")
        self.writer = writer
        self._signing_key = signing_key
        self._public_keys = dict(public_keys)
        self.counters = counters if counters is not None else CounterBook()
        self._issued: dict[str, int] = {}
        # Envelopes whose signature checked out, by (bucket, key, exact stored bytes): the
        # same bytes verify the same way against the same public keys, so a record read
        # on every request (the CA's ca/intermediate before each issuance) costs one
        # Ed25519 verification, not one per read. Bounded; the counter and writer checks
        # still run on every read.
        self._verified: dict[tuple[str, str, bytes], sealed_pb2.SealedRecord] = {}

    def next_counter(self, bucket: str, key: str) -> int:
        """Above every counter seen or handed out for the record, and at least the clock
        (µs). Handed-out counters are kept apart from the book: a record sealed but never
        stored (a lost compare-and-set) must not make the stored one look replayed."""
        held, _ = self.counters.held(bucket, key)
        name = f"{bucket}/{key}"
        counter = max(held + 1, self._issued.get(name, 0) + 1, time.time_ns() // 1000)
        self._issued[name] = counter
        return counter

    def seal(
        self, bucket: str, key: str, payload: bytes, origin: bytes = b"", counter: int | None = None
    ) -> bytes:
        """The value to store for `payload` under `key`, signed as this process, with
        `counter` (default: next_counter)."""
        if self._signing_key is None or self.writer is None:
            raise FailedPrecondition("seal.no_writer_key", "this process may not write records")
        if counter is None:
            counter = self.next_counter(bucket, key)
        message = _message(bucket, key, self.writer, origin, payload, SEAL_VERSION, counter)
        return sealed_pb2.SealedRecord(
            version=SEAL_VERSION,
            writer=self.writer,
            payload=payload,
            signature=self._signing_key.sign(message),
            origin=origin,
            counter=counter,
        ).SerializeToString()

    def _envelope(self, bucket: str, key: str, value: bytes) -> sealed_pb2.SealedRecord:
        """The parsed and signature-checked envelope; the writer is not yet judged."""
        memo = (bucket, key, bytes(value))
        known = self._verified.get(memo)
        if known is not None:
            return known
        envelope = self._verify(bucket, key, value)
        if len(self._verified) >= VERIFIED_MEMO:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[memo] = envelope
        return envelope

    def _verify(self, bucket: str, key: str, value: bytes) -> sealed_pb2.SealedRecord:
        envelope = sealed_pb2.SealedRecord()
        try:
            envelope.ParseFromString(value)
        except DecodeError:
            envelope.Clear()
        if envelope.version not in _DOMAINS or not envelope.signature:
            raise TamperedRecord(
                "record.unsealed",
                f"record {bucket}/{key} carries no seal",
                {"bucket": bucket, "key": key},
            )
        public_key = self._public_keys.get(envelope.writer)
        if public_key is None:
            raise TamperedRecord(
                "record.writer_unknown",
                f"record {bucket}/{key} claims an unknown writer",
                {"bucket": bucket, "key": key, "writer": envelope.writer[:40]},
            )
        if envelope.version == LEGACY_SEAL_VERSION and envelope.counter:
            raise TamperedRecord(
                "record.seal_invalid",
                f"record {bucket}/{key}: a counter on a format-1 seal",
                {"bucket": bucket, "key": key, "writer": envelope.writer},
            )
        message = _message(
            bucket,
            key,
            envelope.writer,
            envelope.origin,
            envelope.payload,
            envelope.version,
            envelope.counter,
        )
        try:
            public_key.verify(envelope.signature, message)
        except InvalidSignature:
            raise TamperedRecord(
                "record.seal_invalid",
                f"the seal of record {bucket}/{key} does not match its content",
                {"bucket": bucket, "key": key, "writer": envelope.writer},
            ) from None
        return envelope

    def open(self, bucket: str, key: str, value: bytes, revision: int | None = None) -> bytes:
        """The payload of a stored value, if its seal holds, its writer may write it and,
        stored at `revision`, it is not older than a record of the key seen before;
        TamperedRecord otherwise (logged as event=record_tampered)."""
        try:
            return self._open(bucket, key, value, revision)
        except TamperedRecord as err:
            log.error(
                "record refused: tampered",
                extra=fields(event="record_tampered", reason=err.reason, **err.details),
            )
            raise

    def _open(self, bucket: str, key: str, value: bytes, revision: int | None) -> bytes:
        envelope = self._envelope(bucket, key, value)
        payload = self._judge(bucket, key, envelope)
        self.counters.check(bucket, key, envelope.counter, revision)
        self.counters.observe(bucket, key, envelope.counter, revision)
        return payload

    def _judge(self, bucket: str, key: str, envelope: sealed_pb2.SealedRecord) -> bytes:
        owner = owner_of(bucket, key)
        details = {"bucket": bucket, "key": key, "writer": envelope.writer, "owner": owner}
        if envelope.writer == owner:
            if envelope.origin:
                raise TamperedRecord(
                    "record.origin_mismatch", f"record {bucket}/{key}: stray origin", details
                )
            return envelope.payload
        if not may_amend(bucket, key, envelope.writer) or not envelope.origin:
            raise TamperedRecord(
                "record.writer_not_owner",
                f"record {bucket}/{key} is sealed by {envelope.writer!r}; only {owner!r} "
                "may write it",
                details,
            )
        origin = self._envelope(bucket, key, envelope.origin)
        if origin.writer != owner or origin.origin:
            raise TamperedRecord(
                "record.writer_not_owner",
                f"record {bucket}/{key} amends a record its owner {owner!r} did not seal",
                details,
            )
        amended, original = common_pb2.KeyRecord(), common_pb2.KeyRecord()
        try:
            amended.ParseFromString(envelope.payload)
            original.ParseFromString(origin.payload)
        except DecodeError:
            raise TamperedRecord(
                "record.origin_mismatch", f"record {bucket}/{key} is not a key record", details
            ) from None
        if any(getattr(amended, f) != getattr(original, f) for f in IDENTITY_FIELDS):
            raise TamperedRecord(
                "record.origin_mismatch",
                f"record {bucket}/{key} changes key material its owner {owner!r} sealed",
                details,
            )
        return envelope.payload

    def origin_for(self, bucket: str, key: str, current: bytes) -> bytes:
        """What an amendment of `current` (the stored value) must carry as its origin:
        the owner's own sealed record, whoever amended it last."""
        if self.writer is None or owner_of(bucket, key) == self.writer:
            return b""
        envelope = sealed_pb2.SealedRecord()
        try:
            envelope.ParseFromString(current)
        except DecodeError:
            return b""
        return bytes(envelope.origin) if envelope.origin else current


class SealedKV:
    """A JetStream KeyValue whose values are sealed on write and opened on read, with the
    methods (and errors) of nats-py's KeyValue that EdgeKMS uses; deletes pass through
    (a delete marker carries no value to trust, and only removes)."""

    def __init__(self, kv: KeyValue, bucket: str, seal: RecordSeal) -> None:
        self.raw = kv
        self.bucket = bucket
        self.seal = seal

    def open_entry(self, entry: KeyValue.Entry) -> KeyValue.Entry:
        """The entry with its payload in place of the sealed value; TamperedRecord if it
        fails. Removal markers (no value) come back as they are."""
        if not entry.value:
            return entry
        payload = self.seal.open(self.bucket, entry.key, entry.value, entry.revision)
        return dataclasses.replace(entry, value=payload)

    async def get(self, key: str, revision: int | None = None) -> KeyValue.Entry:
        return self.open_entry(await self.raw.get(key, revision))

    async def create(self, key: str, value: bytes) -> int:
        counter = self.seal.next_counter(self.bucket, key)
        sealed_value = self.seal.seal(self.bucket, key, value, counter=counter)
        return self._written(key, counter, await self.raw.create(key, sealed_value))

    async def put(self, key: str, value: bytes) -> int:
        counter, sealed_value = await self._sealed(key, value)
        return self._written(key, counter, await self.raw.put(key, sealed_value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        counter, sealed_value = await self._sealed(key, value)
        return self._written(key, counter, await self.raw.update(key, sealed_value, last=last))

    def _written(self, key: str, counter: int, revision: int) -> int:
        """Only a stored record raises the book: one refused (a lost compare-and-set)
        must not make the record that stayed look like a replay."""
        self.seal.counters.observe(self.bucket, key, counter, int(revision))
        return int(revision)

    async def delete(self, key: str, last: int | None = None) -> bool:
        return bool(await self.raw.delete(key, last=last))

    async def _sealed(self, key: str, value: bytes) -> tuple[int, bytes]:
        origin = b""
        if self.seal.writer is not None and may_amend(self.bucket, key, self.seal.writer):
            # An amendment keeps the owner's own seal; a compare-and-set update fails
            # anyway if the record changed after this read.
            current = await self.raw.get(key)
            if current.value:
                self.seal.open(self.bucket, key, current.value, current.revision)
                origin = self.seal.origin_for(self.bucket, key, current.value)
        counter = self.seal.next_counter(self.bucket, key)
        return counter, self.seal.seal(self.bucket, key, value, origin, counter)


def sealed(kv: Any, bucket: str, seal: RecordSeal | None) -> Any:
    """`kv` sealed with `seal`; `kv` itself when the process runs without sealing (an
    unauthenticated development bus, unit tests): `kmsctl up` always seals."""
    return kv if seal is None else SealedKV(kv, bucket, seal)


def parse_seal_fields(
    table: dict[str, Any], base: Path | None = None
) -> tuple[RecordSeal | None, list[str]]:
    """Read seal_writer / seal_key_file / seal_public_keys from a service config table.

    Returns the seal (None when the config names none: no sealing) and a list of problems
    ("field: what is wrong") for the caller to raise as its own config error.
    """
    problems: list[str] = []
    names = ("seal_writer", "seal_key_file", "seal_public_keys", "seal_counter_file")
    if not any(name in table for name in names):
        return None, problems
    writer = table.get("seal_writer")
    key_file = table.get("seal_key_file")
    if (writer is None) != (key_file is None):
        problems.append("seal_writer/seal_key_file: give both or neither")
    if writer is not None and writer not in WRITERS:
        problems.append(f"seal_writer: must be one of {', '.join(WRITERS)}")
    if key_file is not None and (not isinstance(key_file, str) or not key_file):
        problems.append("seal_key_file: must be a non-empty string")
    raw_keys = table.get("seal_public_keys")
    public_keys: dict[str, Ed25519PublicKey] = {}
    if not isinstance(raw_keys, dict) or not raw_keys:
        problems.append("seal_public_keys: must be a table of writer = public key (hex)")
        raw_keys = {}
    for name, text in raw_keys.items():
        if name not in WRITERS:
            problems.append(f"seal_public_keys.{name}: not a writer ({', '.join(WRITERS)})")
            continue
        try:
            public_keys[name] = load_public_key(str(text))
        except ValueError:
            problems.append(f"seal_public_keys.{name}: must be 64 hexadecimal digits")
    if problems:
        return None, problems
    counter_file = table.get("seal_counter_file")
    if counter_file is not None and (not isinstance(counter_file, str) or not counter_file):
        return None, ["seal_counter_file: must be a non-empty string"]
    signing_key = None
    if isinstance(key_file, str):
        path = Path(key_file).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        try:
            signing_key = load_signing_key(path)
        except FailedPrecondition as err:
            return None, [f"seal_key_file: {err.message}"]
        if writer in public_keys and public_key_hex(signing_key.public_key()) != public_key_hex(
            public_keys[str(writer)]
        ):
            return None, ["seal_key_file: does not match seal_public_keys." + str(writer)]
    counters = None
    if isinstance(counter_file, str):
        path = Path(counter_file).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        try:
            counters = CounterBook(path)
        except OSError as exc:
            return None, [f"seal_counter_file: {exc.strerror or type(exc).__name__}"]
    return RecordSeal(writer, signing_key, public_keys, counters), problems


def counter_file_for(key_file: Path) -> Path:
    """Where a writer keeps its CounterBook: beside its sealing key, as private."""
    return key_file.with_name(key_file.stem + ".counters")


def seal_fields_toml(
    writer: str | None, key_file: Path | None, public_keys: Mapping[str, str]
) -> str:
    """The config lines that give a service its sealing key, its counter book and every
    writer's public key."""
    lines = []
    if writer is not None and key_file is not None:
        lines.append(f'seal_writer = "{writer}"\n')
        lines.append(f'seal_key_file = "{key_file}"\n')
        lines.append(f'seal_counter_file = "{counter_file_for(key_file)}"\n')
    table = ", ".join(f'{name} = "{value}"' for name, value in sorted(public_keys.items()))
    lines.append(f"seal_public_keys = {{ {table} }}\n")
    return "".join(lines)
