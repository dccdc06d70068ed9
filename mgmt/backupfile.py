"""The encrypted backup file format (`kmsctl backup` / `kmsctl restore`), version 1.

A backup holds every secret of a stack (token objects, PINs, bus passwords, sealing keys),
so it is encrypted and authenticated end to end, and it may be gigabytes, so it is written
and read as a stream of chunks instead of one AES-GCM message held in memory:

    magic    8 bytes   b"EKMSBAK\\n"
    version  2 bytes   big-endian; readers refuse a version newer than theirs
    hlen     4 bytes   big-endian length of the header
    header   hlen      JSON: KDF and its parameters, salt, chunk size, nonce prefix,
                       key check value, creation time
    chunks   ...       each: 4-byte length, then AES-256-GCM ciphertext with its tag

Each chunk's nonce is a random 7-byte prefix (in the header), a 4-byte chunk counter and
a 1-byte "last chunk" flag (the STREAM construction), and every chunk's associated data
is the SHA-256 of magic, version, hlen and header. So a chunk cannot be altered, moved,
dropped or taken from another backup; a file cut short lacks its last-flagged chunk
(`backup.truncated`), and anything after that chunk is refused (`backup.corrupt`). The
header itself is covered by every chunk's tag, and the check value below by the KDF.

Keys: a passphrase goes through scrypt (N=2^15, r=8, p=1: ~32 MiB and a fraction of a
second, each guess costs the same), or the operator gives a 32-byte key of their own
(`--key-file`; KDF "raw"). Either master secret goes through HKDF-SHA256 with the
header's salt into the file's AES key and a 32-byte check value stored in the header,
so a wrong passphrase is told apart from a damaged file before anything is decrypted or
written (`backup.wrong_key`). Every file has a fresh salt, so a reused key file never
reuses an AES key.

Only this module knows the layout; mgmt.backup decides what goes into the stream.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import json
import os
import struct
from dataclasses import dataclass
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edgekms.errors import FailedPrecondition, InvalidArgument, PermissionDenied

MAGIC = b"EKMSBAK\n"
FORMAT_VERSION = 1
CHUNK_SIZE = 1024 * 1024
# A header is a few hundred bytes; anything large is not ours (and is not read into memory).
MAX_HEADER = 64 * 1024
TAG_SIZE = 16
KEY_SIZE = 32
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
# Bounds on what a header may ask of the reader's memory and time.
SCRYPT_N_MAX = 2**20
CHUNK_SIZE_MAX = 64 * 1024 * 1024
_PREFIX = struct.Struct(">8sHI")


@dataclass(frozen=True)
class Secret:
    """What the operator chose: a passphrase (scrypt) or a 32-byte key (raw)."""

    passphrase: bytes | None = None
    key: bytes | None = None

    def __post_init__(self) -> None:
        if self.key is not None:
            if len(self.key) != KEY_SIZE:
                raise InvalidArgument(
                    "backup.key_invalid", f"a backup key is {KEY_SIZE} bytes, got {len(self.key)}"
                )
        elif not self.passphrase:
            # Refused before anything is read or written: an empty passphrase is no secret.
            raise InvalidArgument("backup.passphrase_empty", "the backup passphrase is empty")

    @property
    def kdf_name(self) -> str:
        return "raw" if self.key is not None else "scrypt"


def parse_key_file(data: bytes) -> bytes:
    """A key file's 32 bytes: raw, or 64 hex digits, or base64 (one trailing newline ok)."""
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    try:
        if len(text) == 2 * KEY_SIZE:
            return bytes.fromhex(text.decode("ascii"))
        decoded = base64.b64decode(text, validate=True)
    except (ValueError, UnicodeDecodeError):
        decoded = b""
    if len(decoded) != KEY_SIZE:
        raise InvalidArgument(
            "backup.key_invalid",
            f"a backup key file holds {KEY_SIZE} bytes: raw, 64 hex digits or base64"
            " (e.g. `head -c 32 /dev/urandom > backup.key`)",
        )
    return decoded


def _master(secret: Secret, kdf: dict[str, Any], salt: bytes) -> bytes:
    if secret.key is not None:
        if kdf.get("name") != "raw":
            raise PermissionDenied(
                "backup.wrong_key",
                "this backup was made with a passphrase, not a key file",
            )
        return secret.key
    if kdf.get("name") != "scrypt":
        raise PermissionDenied(
            "backup.wrong_key", "this backup was made with a key file, not a passphrase"
        )
    assert secret.passphrase is not None
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    return Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(secret.passphrase)


def _expand(master: bytes, salt: bytes, what: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=b"edgekms-backup-v1 " + what
    ).derive(master)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class BackupWriter(io.RawIOBase):
    """A write-only stream that encrypts what it is given into `out`, chunk by chunk.
    close() writes the last-flagged chunk; a writer never closed leaves a file that
    readers refuse as truncated."""

    def __init__(self, out: IO[bytes], secret: Secret, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__()
        self._out = out
        salt = os.urandom(16)
        self._prefix = os.urandom(7)
        kdf: dict[str, Any] = {"name": secret.kdf_name}
        if secret.kdf_name == "scrypt":
            kdf.update(n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
        master = _master(secret, kdf, salt)
        header = {
            "kdf": kdf,
            "salt": _b64(salt),
            "cipher": "aes-256-gcm",
            "chunk_size": chunk_size,
            "nonce_prefix": _b64(self._prefix),
            "check": _b64(_expand(master, salt, b"check")),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        body = json.dumps(header, sort_keys=True).encode()
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body))
        self._aad = hashlib.sha256(prefix + body).digest()
        self._aead = AESGCM(_expand(master, salt, b"encrypt"))
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._counter = 0
        self.written = 0  # plaintext bytes taken so far (progress)
        out.write(prefix + body)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        # A full chunk is sealed only once more data follows, so close() always has a
        # last chunk to flag; large writes are sealed straight from the caller's buffer.
        view = memoryview(data).cast("B")
        taken = len(view)
        self.written += taken
        size = self._chunk_size
        while view:
            if len(self._buffer) == size:
                self._emit(self._buffer, last=False)
                self._buffer = bytearray()
            if not self._buffer and len(view) > size:
                self._emit(view[:size], last=False)
                view = view[size:]
                continue
            room = size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
        return taken

    def _emit(self, plain: bytes | bytearray | memoryview, last: bool) -> None:
        if self._counter >= 2**32 - 1:
            raise InvalidArgument("backup.too_large", "a backup holds at most 2^32 chunks")
        sealed = self._aead.encrypt(_nonce(self._prefix, self._counter, last), plain, self._aad)
        self._out.write(struct.pack(">I", len(sealed)) + sealed)
        self._counter += 1

    def close(self) -> None:
        if not self.closed:
            self._emit(bytes(self._buffer), last=True)
            self._buffer.clear()
        super().close()


@dataclass(frozen=True)
class Header:
    version: int
    fields: dict[str, Any]
    aad: bytes


def read_header(src: IO[bytes]) -> Header:
    """Parse and bound-check the header; typed errors for a file that is not a backup,
    one from a newer EdgeKMS, or one whose header is damaged."""
    prefix = src.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(MAGIC):
        raise InvalidArgument("backup.not_a_backup", "not an EdgeKMS backup file (bad magic)")
    _, version, length = _PREFIX.unpack(prefix)
    if version > FORMAT_VERSION:
        raise FailedPrecondition(
            "backup.version_unsupported",
            f"this backup has format version {version}; this kmsctl reads up to"
            f" {FORMAT_VERSION}: restore it with a newer EdgeKMS",
            {"version": str(version), "supported": str(FORMAT_VERSION)},
        )
    if version < 1 or length > MAX_HEADER:
        raise InvalidArgument("backup.corrupt", "the backup's header is damaged")
    body = src.read(length)
    try:
        fields = json.loads(body)
        kdf = fields["kdf"]
        ok = (
            isinstance(fields, dict)
            and fields.get("cipher") == "aes-256-gcm"
            and 0 < int(fields["chunk_size"]) <= CHUNK_SIZE_MAX
            and len(base64.b64decode(fields["nonce_prefix"])) == 7
            and len(base64.b64decode(fields["salt"])) >= 16
            and len(base64.b64decode(fields["check"])) == KEY_SIZE
            and kdf.get("name") in ("raw", "scrypt")
            and (
                kdf["name"] == "raw"
                or (
                    1 < int(kdf["n"]) <= SCRYPT_N_MAX
                    and 0 < int(kdf["r"]) <= 32
                    and 0 < int(kdf["p"]) <= 16
                )
            )
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if len(body) < length or not ok:
        raise InvalidArgument("backup.corrupt", "the backup's header is damaged")
    return Header(version, fields, hashlib.sha256(prefix + body).digest())


class BackupReader(io.RawIOBase):
    """A read-only stream of the plaintext of a backup, each chunk checked before any of
    its bytes are returned. After the consumer is done, `finish()` reads on to the end
    and proves the file was whole."""

    def __init__(self, src: IO[bytes], secret: Secret) -> None:
        super().__init__()
        self._src = src
        self.header = read_header(src)
        fields = self.header.fields
        salt = base64.b64decode(fields["salt"])
        master = _master(secret, fields["kdf"], salt)
        if not hmac.compare_digest(
            _expand(master, salt, b"check"), base64.b64decode(fields["check"])
        ):
            raise PermissionDenied(
                "backup.wrong_key",
                "wrong passphrase or key for this backup (nothing was restored)",
            )
        self._aead = AESGCM(_expand(master, salt, b"encrypt"))
        self._prefix = base64.b64decode(fields["nonce_prefix"])
        self._max_sealed = int(fields["chunk_size"]) + TAG_SIZE
        self._counter = 0
        self._done = False
        self._pending = b""
        self._offset = 0
        self.read_bytes = 0  # plaintext bytes returned so far (progress)

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        head = self._src.read(4)
        if len(head) < 4:
            raise InvalidArgument(
                "backup.truncated", "the backup file ends early: it was cut short"
            )
        (length,) = struct.unpack(">I", head)
        if not TAG_SIZE <= length <= self._max_sealed:
            raise InvalidArgument("backup.corrupt", "the backup is damaged (bad chunk length)")
        sealed = self._src.read(length)
        if len(sealed) < length:
            raise InvalidArgument(
                "backup.truncated", "the backup file ends early: it was cut short"
            )
        for last in (False, True):
            try:
                plain = self._aead.decrypt(
                    _nonce(self._prefix, self._counter, last), sealed, self.header.aad
                )
            except InvalidTag:
                continue
            self._counter += 1
            self._done = last
            return plain
        raise InvalidArgument(
            "backup.corrupt",
            f"the backup is damaged or was altered (chunk {self._counter} fails its"
            " authentication tag)",
            {"chunk": str(self._counter)},
        )

    def readinto(self, buffer: Any) -> int:
        while self._offset >= len(self._pending) and not self._done:
            self._pending, self._offset = self._next_chunk(), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        self.read_bytes += n
        return n

    def finish(self) -> None:
        """Read to the last chunk and the end of the file: the consumer may stop early
        (tar's end marker) and a truncation or appended bytes must still be caught."""
        while not self._done:
            self._next_chunk()
        if self._src.read(1):
            raise InvalidArgument("backup.corrupt", "the backup has data after its last chunk")
