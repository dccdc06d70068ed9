"""Events in a service's log as tests wait for and assert on them.

Services write one JSON object per line (edgekms.logs). An event is an entry's `msg`,
its details are the entry's other fields: a message written the older way,
`"event=service_started provider=hsm0"`, reaches the file as `msg` "service_started"
with a field `provider`. Matching on parsed entries, not on substrings, keeps a test
from passing vacuously when the line's shape changes (a `not in` of text that is never
written any more proves nothing).
"""

from __future__ import annotations

import json
from typing import Any


def entries(text: str) -> list[dict[str, Any]]:
    """Every JSON object line of `text`; other lines (a traceback, click's usage error)
    are skipped."""
    found: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


def count_event(text: str, event: str, **fields: object) -> int:
    """How many entries of `text` are `event` with these fields (compared as text)."""
    return sum(
        1
        for entry in entries(text)
        if entry.get("msg") == event
        and all(str(entry.get(name)) == str(value) for name, value in fields.items())
    )


def has_event(text: str, event: str, **fields: object) -> bool:
    return count_event(text, event, **fields) > 0
