"""The board's storage budget as the layer ships it: the data partition's size
(yocto-layer/conf/distro/edgekms-os.conf), the JetStream store's cap
(edgekms-setup.service's --max-file-store, rendered into nats.conf) and each audit
writer's stream limit (deploy/*.toml, the configs the recipe installs, read with the
services' own loaders). One reader for the static check and the tmpfs test, so both
judge the same figures; docs/security.md, "Sizing for a board", explains the margins."""

from __future__ import annotations

import configparser
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from broker.config import load_config as load_broker
from ca_service.config import load_serve_config
from crypto_service.config import load_config as load_crypto
from edgekms.audit import StreamLimit, parse_size

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "yocto-layer"
DISTRO = LAYER / "conf" / "distro" / "edgekms-os.conf"
RECIPE = LAYER / "recipes-edgekms" / "edgekms" / "edgekms_0.1.0.bb"
SETUP_UNIT = RECIPE.parent / "files" / "edgekms-setup.service"
CONFIGS = ROOT / "deploy"

MIB = 1024**2
# cryptsetup luksFormat --type luks2's default header (metadata and keyslots area).
LUKS2_HEADER = 16 * MIB
# mkfs.ext4 (e2fsprogs 1.47, as edgekms-datafs runs it) on the 240 MiB left: journal,
# inode tables and group descriptors (about 21 MiB), plus the 5 % kept for root, which
# nats-server (user edgekms-nats) cannot use: measured 33.1 MiB; one seventh is above it.
EXT4_SHARE = 7
# Everything else on the partition: secrets, PKI, the TPM's state, OP-TEE's secure
# storage of hsm0 (tee-supplicant keeps it there).
OTHER_FILES = 32 * MIB
# Inside the store, beside the audit streams: the KV buckets (key registry, clients, CA
# records, idempotency), which reserve nothing and so take what the streams leave.
KV_BUCKETS = 32 * MIB


@dataclass(frozen=True)
class BoardSizing:
    partition: int
    max_file_store: int
    # writer (edgekms.audit) -> the limit its service's config gives its stream; None
    # where the config sets none (the service would ask for the defaults).
    limits: dict[str, StreamLimit | None]

    @property
    def usable(self) -> int:
        """What the file system on the opened partition gives a non-root user."""
        after_luks = self.partition - LUKS2_HEADER
        return after_luks - after_luks // EXT4_SHARE

    @property
    def reserved(self) -> int:
        return sum(limit.max_bytes for limit in self.limits.values() if limit is not None)


def installed_configs() -> list[str]:
    """The service configs the recipe installs into /etc/edgekms (its `for conf in` loop)."""
    match = re.search(r"for conf in ([^;]+); do", RECIPE.read_text())
    assert match, "the recipe no longer installs its configs with a `for conf in` loop"
    return match.group(1).split()


def setup_argv() -> list[str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(SETUP_UNIT.read_text())
    return shlex.split(unit["Service"]["ExecStart"])


def max_file_store() -> int | None:
    argv = setup_argv()
    if "--max-file-store" not in argv:
        return None
    return parse_size(argv[argv.index("--max-file-store") + 1])


def writer_limit(name: str) -> tuple[str, StreamLimit | None]:
    path = CONFIGS / name
    if name == "broker.toml":
        return "broker", load_broker(path).audit_limit
    if name == "ca.toml":
        return "ca", load_serve_config(path).audit_limit
    crypto = load_crypto(path)
    return f"crypto-{crypto.provider_id}", crypto.audit_limit


def board_sizing() -> BoardSizing:
    size = re.search(r'^EDGEKMS_DATAFS_SIZE = "(\d+)"', DISTRO.read_text(), re.M)
    assert size, "EDGEKMS_DATAFS_SIZE (KiB) is gone from the distro config"
    store = max_file_store()
    assert store is not None, "edgekms-setup.service passes no --max-file-store"
    limits = dict(writer_limit(name) for name in installed_configs())
    return BoardSizing(int(size.group(1)) * 1024, store, limits)
