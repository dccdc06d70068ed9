"""What the administrator's kmsctl and the broker must agree on for unlock secrets: the
volume name rule and the AAD a secret's KMS ciphertext is bound to (device and volume,
so a ciphertext copied into another device's record does not decrypt)."""

from __future__ import annotations

import re

VOLUME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
AAD_PREFIX = b"edgekms-unlock-v1\0"


def secret_aad(device: str, volume: str) -> bytes:
    return AAD_PREFIX + device.encode() + b"\0" + volume.encode()
