"""Certificate lifetimes written the way people say them: "30m", "12h", "90d", "4w".

One parser for the CLI's `--ttl`, the TOML profiles' `max_ttl`/`default_ttl` and the
CA's own checks, so "1h" means the same everywhere. Lifetimes shorter than MIN_TTL are
refused: a leaf is backdated a little for clocks that lag, and below a few minutes the
certificate would be gone before a renewing agent could even install it.
"""

from __future__ import annotations

import datetime
import re

from edgekms.errors import InvalidArgument

MIN_TTL = datetime.timedelta(minutes=5)
# Ten years: what a profile may allow at most (as max_validity_days always did).
MAX_TTL = datetime.timedelta(days=3650)
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^(\d{1,7})([mhdw])$")


def parse_ttl(text: str, reason: str = "cert.ttl_invalid") -> datetime.timedelta:
    """ "30m", "12h", "90d" or "4w" (one number, one unit) within MIN_TTL..MAX_TTL."""
    match = _DURATION_RE.match(text.strip().lower())
    if not match:
        raise InvalidArgument(
            reason,
            f"{text!r} is not a lifetime like 30m, 12h, 90d or 4w",
            {"value": text},
        )
    ttl = datetime.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    check_ttl(ttl, reason)
    return ttl


def check_ttl(ttl: datetime.timedelta, reason: str = "cert.ttl_invalid") -> None:
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidArgument(
            reason,
            f"a lifetime of {format_ttl(ttl)} is outside {format_ttl(MIN_TTL)}.."
            f"{format_ttl(MAX_TTL)}",
            {"min_seconds": str(int(MIN_TTL.total_seconds()))},
        )


def format_ttl(ttl: datetime.timedelta) -> str:
    """The shortest exact spelling: 90d, 36h, 30m (or seconds when nothing else fits)."""
    seconds = int(ttl.total_seconds())
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def backdate_for(ttl: datetime.timedelta, backdate: datetime.timedelta) -> datetime.timedelta:
    """How far before now a certificate of this lifetime starts: the usual margin for
    lagging clocks, but never more than a sixth of a short lifetime."""
    return min(backdate, ttl / 6)
