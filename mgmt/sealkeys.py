"""The record-sealing keys of a stack (edgekms.sealed): one Ed25519 key per writer
identity, made by `kmsctl up` on first start and kept after.

Each private key is a 0600 file under <data-dir>/secrets/seal/ that only its own
service's config names; every config carries all the public keys, so each reader can
verify every writer and no reader can sign as another. The supervisor makes the keys and
holds the ceremony's (it runs the ceremony itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgekms.logs import fields
from edgekms.sealed import (
    WRITERS,
    RecordSeal,
    load_public_key,
    load_signing_key,
    new_signing_key_pem,
    public_key_hex,
    seal_fields_toml,
)

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
