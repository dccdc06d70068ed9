"""The agent's state file: for each item, when it is next due and how its last try
ended. The agent writes it (atomically) after every pass and reads it at start, so a
restart does not fetch everything again and `kmsctl agent status` can say, without
asking the agent, what is due when and what is failing.

    {"version": 1, "pid": 812, "updated": "2026-12-02T14:03:11Z",
     "items": {"nginx": {"kind": "cert", "next_due": "...", "work_due": "...",
                         "failures": 0, "last_ok": "...", "last_error": null,
                         "serial": "...", "not_after": "...", "reload_pending": false}}}

Times are RFC 3339 UTC strings. A file that does not parse is ignored (every item is
then due at once), never trusted half.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.config import FileOwner
from agent.files import read_if_regular, write_atomically

VERSION = 1


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return (
            datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=datetime.UTC)
            .timestamp()
        )
    except ValueError:
        return None


@dataclass
class ItemState:
    kind: str
    # When the next pass over the item is due (work or a retry), and when its work is
    # (a certificate's renewal point, a CRL's refresh).
    next_due: float = 0.0
    work_due: float = 0.0
    failures: int = 0
    last_ok: float | None = None
    last_change: float | None = None
    last_error: dict[str, str] | None = None
    reload_pending: bool = False
    # Certificates: the serial and end of the one in the files.
    serial: str = ""
    not_after: float | None = None
    # CRL files: numbers and the earliest nextUpdate of the CRLs in the file.
    crl_numbers: list[int] = field(default_factory=list)
    next_update: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("next_due", "work_due", "last_ok", "last_change", "not_after", "next_update"):
            out[name] = iso(out[name])
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ItemState:
        state = cls(kind=str(raw.get("kind", "")))
        for name in ("next_due", "work_due"):
            setattr(state, name, _epoch(raw.get(name)) or 0.0)
        for name in ("last_ok", "last_change", "not_after", "next_update"):
            setattr(state, name, _epoch(raw.get(name)))
        failures = raw.get("failures")
        state.failures = failures if isinstance(failures, int) and failures >= 0 else 0
        error = raw.get("last_error")
        if isinstance(error, dict):
            state.last_error = {str(k): str(v) for k, v in error.items()}
        state.reload_pending = raw.get("reload_pending") is True
        state.serial = str(raw.get("serial", ""))
        numbers = raw.get("crl_numbers")
        if isinstance(numbers, list):
            state.crl_numbers = [n for n in numbers if isinstance(n, int)]
        return state


def load_state(path: Path) -> dict[str, ItemState]:
    data = read_if_regular(path)
    if not data:
        return {}
    try:
        raw = json.loads(data)
        items = raw["items"] if raw.get("version") == VERSION else {}
        return {str(k): ItemState.from_json(v) for k, v in items.items() if isinstance(v, dict)}
    except (ValueError, AttributeError, KeyError, TypeError):
        return {}


def save_state(path: Path, items: dict[str, ItemState], now: float) -> None:
    document = {
        "version": VERSION,
        "pid": os.getpid(),
        "updated": iso(now),
        "items": {name: state.to_json() for name, state in sorted(items.items())},
    }
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    write_atomically(path, data, 0o644, FileOwner())


def read_status(path: Path) -> dict[str, Any] | None:
    """The state file as written (for `kmsctl agent status`), None if absent/unusable."""
    data = read_if_regular(path)
    if not data:
        return None
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) and raw.get("version") == VERSION else None
