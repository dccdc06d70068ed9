"""The record-sealing keys of a stack (edgekms.sealed): one Ed25519 key per writer
identity, made by `kmsctl up` on first start and kept after.

Each private key is a 0600 file under <data-dir>/secrets/seal/ that only its own
service's config names; every config carries all the public keys, so each reader can
verify every writer and no reader can sign as another. The supervisor makes the keys and
holds the ceremony's (it runs the ceremony itself).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors

from edgekms import kvread, natsrpc
from edgekms.logs import fields
from edgekms.sealed import (
    WRITERS,
    RecordSeal,
    TamperedRecord,
    load_public_key,
    load_signing_key,
    new_signing_key_pem,
    owner_of,
    public_key_hex,
    seal_fields_toml,
)
from edgekms.subjects import CA_BUCKET, CLIENTS_BUCKET, KEY_REGISTRY_BUCKET

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealKeys:
    """Where each writer's private key is, and every writer's public key (hex)."""

    key_files: dict[str, Path]
    public_keys: dict[str, str]

    def toml(self, writer: str | None) -> str:
        """The seal_* config lines for `writer` (None: a reader only)."""
        return seal_fields_toml(
            writer, self.key_files[writer] if writer else None, self.public_keys
        )

    def seal(self, writer: str) -> RecordSeal:
        """The seal a writer in this process uses (the ceremony's, in `kmsctl up`)."""
        return RecordSeal(
            writer,
            load_signing_key(self.key_files[writer]),
            {name: load_public_key(text) for name, text in self.public_keys.items()},
        )


def local_seal(secrets_dir: Path, writer: str | None) -> RecordSeal | None:
    """The seal of `writer` (None: a verifier only) from the keys `kmsctl up` made under
    secrets_dir, for management commands run beside it (`kmsctl init`); None when it made
    none (an unsealed development bus)."""
    files = {w: seal_key_path(secrets_dir, w) for w in WRITERS}
    if not all(path.exists() for path in files.values()):
        return None
    keys = {w: load_signing_key(path) for w, path in files.items()}
    public = {w: key.public_key() for w, key in keys.items()}
    return RecordSeal(writer, keys[writer] if writer else None, public)


def seal_key_path(secrets_dir: Path, writer: str) -> Path:
    return secrets_dir / "seal" / f"{writer}.key"


def ensure_seal_keys(secrets_dir: Path) -> SealKeys:
    """Every writer's key, made if missing (0600, kept across restarts)."""
    from mgmt.pki import write_private

    files: dict[str, Path] = {}
    public: dict[str, str] = {}
    for writer in WRITERS:
        path = seal_key_path(secrets_dir, writer)
        if not path.exists():
            pem, _ = new_signing_key_pem()
            write_private(path, pem)
            log.info("record sealing key created", extra=fields(writer=writer))
        files[writer] = path
        public[writer] = public_key_hex(load_signing_key(path).public_key())
    return SealKeys(files, public)


RESEALED_MARKER = ".resealed"


async def reseal_legacy(
    url: str,
    bus_options: dict[str, dict[str, Any]],
    keys: SealKeys,
    marker: Path,
    buckets: tuple[tuple[str, str], ...] = (
        (KEY_REGISTRY_BUCKET, "broker"),
        (CLIENTS_BUCKET, "broker"),
        (CA_BUCKET, "ca"),
    ),
) -> int:
    """Seal, once, the records a stack wrote before it sealed records: each with its
    rightful owner's key (edgekms.sealed.owner_of), written compare-and-set through the
    bus identity that may write the bucket (`bus_options`: user -> connect options).

    Runs while `marker` is absent, i.e. at the first start that has sealing keys, before
    any service; the marker is written once every bucket is done, and from then on an
    unsealed record is refused like any other tampered one. Records with a seal are left
    as they are (a bad one stays refused). Returns how many records were sealed.
    """
    if await asyncio.to_thread(marker.exists):
        return 0
    sealed_count = 0
    for bucket, user in buckets:
        nc = await natsrpc.connect(
            url, name="kmsctl-reseal", connect_timeout=5, **bus_options[user]
        )
        try:
            js = nc.jetstream(timeout=10)
            try:
                kv = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                continue
            entries, _ = await kvread.snapshot(js, bucket)
            for entry in entries:
                if not entry.value or kvread.is_removal(entry):
                    continue
                owner = keys.seal(owner_of(bucket, entry.key))
                try:
                    owner.open(bucket, entry.key, entry.value)
                    continue
                except TamperedRecord as err:
                    if err.reason != "record.unsealed":
                        continue
                value = owner.seal(bucket, entry.key, entry.value)
                await kv.update(entry.key, value, last=entry.revision)
                sealed_count += 1
        finally:
            await nc.close()
    from mgmt.pki import write_private

    await asyncio.to_thread(write_private, marker, f"{sealed_count}\n".encode())
    log.warning("records written before sealing were sealed", extra=fields(count=sealed_count))
    return sealed_count
