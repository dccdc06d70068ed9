"""The backup file format (mgmt.backupfile) as pure logic, in memory: a round trip in
many chunks, and every way a file can be wrong refused with its own typed error before
a byte of plaintext comes out. The real stack's backup and restore: test_backup_stack."""

from __future__ import annotations

import io
import json
import os
import struct

import pytest

from edgekms import errors
from mgmt.backupfile import (
    FORMAT_VERSION,
    MAGIC,
    BackupReader,
    BackupWriter,
    Secret,
    parse_key_file,
)

PASS = Secret(passphrase=b"correct horse battery staple")


def _backup(plain: bytes, secret: Secret = PASS, chunk_size: int = 1000) -> bytes:
    out = io.BytesIO()
    writer = BackupWriter(out, secret, chunk_size=chunk_size)
    for i in range(0, len(plain), 777):  # writes that straddle chunk boundaries
        writer.write(plain[i : i + 777])
    writer.close()
    return out.getvalue()


def _restore(blob: bytes, secret: Secret = PASS) -> bytes:
    reader = BackupReader(io.BytesIO(blob), secret)
    data = io.BufferedReader(reader).read()
    reader.finish()
    return data


def _header_end(blob: bytes | bytearray) -> int:
    (length,) = struct.unpack(">I", blob[10:14])
    return 14 + int(length)


def test_round_trip_in_many_chunks_with_a_passphrase_and_with_a_key() -> None:
    plain = os.urandom(10_500)
    blob = _backup(plain)
    assert blob.startswith(MAGIC)
    assert plain[:64] not in blob
    assert _restore(blob) == plain
    key = Secret(key=os.urandom(32))
    assert _restore(_backup(plain, key), key) == plain
    # An empty payload is one (last) chunk and still round-trips.
    assert _restore(_backup(b"")) == b""


def test_the_same_key_gives_a_different_file_each_time() -> None:
    key = Secret(key=bytes(32))
    first, second = _backup(b"same", key), _backup(b"same", key)
    assert first[_header_end(first) :] != second[_header_end(second) :]


def test_a_wrong_passphrase_is_told_apart_from_damage() -> None:
    blob = _backup(b"secret state")
    with pytest.raises(errors.PermissionDenied) as caught:
        BackupReader(io.BytesIO(blob), Secret(passphrase=b"wrong"))
    assert caught.value.reason == "backup.wrong_key"
    with pytest.raises(errors.PermissionDenied) as caught:
        BackupReader(io.BytesIO(blob), Secret(key=bytes(32)))
    assert caught.value.reason == "backup.wrong_key"


def test_an_empty_passphrase_or_a_short_key_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        Secret(passphrase=b"")
    assert caught.value.reason == "backup.passphrase_empty"
    with pytest.raises(errors.InvalidArgument) as caught:
        Secret(key=b"short")
    assert caught.value.reason == "backup.key_invalid"


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("flip_in_a_middle_chunk", "backup.corrupt"),
        ("flip_in_the_header", "backup.corrupt"),
        ("drop_the_last_chunk", "backup.truncated"),
        ("cut_inside_a_chunk", "backup.truncated"),
        ("swap_two_chunks", "backup.corrupt"),
        ("append_bytes", "backup.corrupt"),
    ],
)
def test_a_damaged_file_is_refused(where: str, reason: str) -> None:
    blob = bytearray(_backup(os.urandom(5500)))
    start = _header_end(blob)
    chunks = []
    pos = start
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        chunks.append(bytes(blob[pos : pos + 4 + length]))
        pos += 4 + length
    assert len(chunks) == 6
    if where == "flip_in_a_middle_chunk":
        blob[start + len(chunks[0]) + 100] ^= 1
    elif where == "flip_in_the_header":
        # The creation time: no key depends on it, every chunk's tag does.
        blob[blob.index(b'"created": "') + 13] ^= 1
    elif where == "drop_the_last_chunk":
        del blob[len(blob) - len(chunks[-1]) :]
    elif where == "cut_inside_a_chunk":
        del blob[len(blob) - 10 :]
    elif where == "swap_two_chunks":
        blob[start:] = chunks[1] + chunks[0] + b"".join(chunks[2:])
    else:
        blob += b"\0" * 16
    with pytest.raises(errors.KMSError) as caught:
        _restore(bytes(blob))
    assert caught.value.reason == reason


def test_a_newer_format_version_is_refused_by_name() -> None:
    blob = bytearray(_backup(b"x"))
    blob[8:10] = struct.pack(">H", FORMAT_VERSION + 1)
    with pytest.raises(errors.FailedPrecondition) as caught:
        BackupReader(io.BytesIO(bytes(blob)), PASS)
    assert caught.value.reason == "backup.version_unsupported"
    assert caught.value.details["version"] == str(FORMAT_VERSION + 1)


@pytest.mark.parametrize(
    "blob",
    [b"", b"PK\x03\x04 a zip file", MAGIC + b"\x00\x01\xff\xff\xff\xff"],
    ids=["empty", "other_format", "huge_header"],
)
def test_what_is_not_a_backup_is_refused_before_any_kdf(blob: bytes) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        BackupReader(io.BytesIO(blob), PASS)
    assert caught.value.reason in ("backup.not_a_backup", "backup.corrupt")


def test_a_header_asking_for_an_absurd_kdf_cost_is_refused() -> None:
    """A planted file must not make the reader spend gigabytes on scrypt."""
    blob = _backup(b"x")
    end = _header_end(blob)
    header = json.loads(blob[14:end])
    header["kdf"]["n"] = 2**30
    body = json.dumps(header).encode()
    forged = blob[:10] + struct.pack(">I", len(body)) + body + blob[end:]
    with pytest.raises(errors.InvalidArgument) as caught:
        BackupReader(io.BytesIO(forged), PASS)
    assert caught.value.reason == "backup.corrupt"


def test_key_files_raw_hex_and_base64() -> None:
    import base64

    key = os.urandom(32)
    assert parse_key_file(key) == key
    assert parse_key_file(key.hex().encode() + b"\n") == key
    assert parse_key_file(base64.b64encode(key) + b"\n") == key
    with pytest.raises(errors.InvalidArgument) as caught:
        parse_key_file(b"not a key\n")
    assert caught.value.reason == "backup.key_invalid"
