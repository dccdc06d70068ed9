"""Structured logs for every EdgeKMS process: one JSON object a line on stderr.

Call `setup_logging("broker")` once at start; then log with
`log.info("sign", extra={"fields": {"key": name, "client": who}})` and the fields land
as top-level JSON keys. Secrets are never passed in: there is no field for them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at error level; keep it to warnings.
    logging.getLogger("nats").setLevel(logging.WARNING)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a structured log call: log.info("msg", extra=fields(key=...))."""
    return {"fields": values}
