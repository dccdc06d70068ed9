"""Structured logs for every EdgeKMS process: one JSON object a line on stderr, or, for a
person at a console, one readable line (`--log-format text`).

Call `setup_logging("broker")` once at start; then log with
`log.info("sign", extra={"fields": {"key": name, "client": who}})` and the fields land
as top-level JSON keys. Secrets are never passed in: there is no field for them.

One field set: a message written the older way, logfmt inside the text
(`"event=ca_issued serial=%s"`), is split by the formatter into its message and fields,
so that every line carries `msg` plus top-level fields whichever way it was logged. The
split is made on the format string, before the arguments go in, so that an argument with
spaces in it (`service=%s` given "the CA service") stays one field's value.
asyncio's "returning true from eof_received() has no effect when using ssl" (printed for
every TLS connection the peer closes) says nothing to an operator and is dropped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_LOGFMT_KEY = re.compile(r"^[a-z_][a-z0-9_.]*$")
# A %-conversion in a logfmt value of a format string (`serial=%s`, `ms=%.1f`, `%s:%d`).
_CONVERSION = re.compile(r"%%|%[-#0 +]*\d*(?:\.\d+)?[sdrifxXeEgGoua]")
_ASYNCIO_NOISE = "returning true from eof_received() has no effect when using ssl"
FORMATS = ("text", "json")


def split_logfmt(message: str) -> tuple[str, dict[str, str]] | None:
    """("msg", fields) of a logfmt message ("event=x a=1 b=2" or "name a=1 b=2"), or
    None when it is prose (any token that is not key=value after the first)."""
    tokens = message.split(" ")
    if len(tokens) < 2 and not message.startswith("event="):
        return None
    head, rest = tokens[0], tokens[1:]
    if head.startswith("event="):
        head = head.removeprefix("event=")
    elif "=" in head or not _LOGFMT_KEY.match(head):
        return None
    found: dict[str, str] = {}
    for token in rest:
        key, sep, value = token.partition("=")
        if not sep or not _LOGFMT_KEY.match(key) or key in found:
            return None
        found[key] = value
    return head, found


def _fill(value: str, args: list[object]) -> str | None:
    """`value` with its conversions done, each taking the next of `args` (`%s:%d` takes
    two), or None when a `%` is not a conversion or the arguments run out."""
    out: list[str] = []
    at = 0
    for match in _CONVERSION.finditer(value):
        literal = value[at : match.start()]
        if "%" in literal:
            return None
        out.append(literal)
        spec = match.group()
        if spec == "%%":
            out.append("%")
        else:
            if not args:
                return None
            try:
                out.append(spec % (args.pop(0),))
            except (TypeError, ValueError):
                return None
        at = match.end()
    rest = value[at:]
    if "%" in rest:
        return None
    out.append(rest)
    return "".join(out)


def _split_words_then_fields(template: str) -> tuple[str, dict[str, str]] | None:
    """("words", fields) of "some words key=value key=value", or None."""
    tokens = template.split(" ")
    first = next((i for i, token in enumerate(tokens) if "=" in token), None)
    if not first or any("%" in token or not token for token in tokens[:first]):
        return None
    found: dict[str, str] = {}
    for token in tokens[first:]:
        key, sep, value = token.partition("=")
        if not sep or not _LOGFMT_KEY.match(key) or key in found:
            return None
        found[key] = value
    return " ".join(tokens[:first]), found


def split_logfmt_template(
    template: str, args: tuple[object, ...]
) -> tuple[str, dict[str, str]] | None:
    """split_logfmt on a format string and its arguments: each `key=%s` becomes one field
    whatever its argument holds (spaces, `=`), or None when the template is not logfmt
    with its conversions in its values and exactly one argument per conversion. The
    message may be words ("tpm connect failed tcti=%s rc=0x%x": "tpm connect failed"
    with fields tcti and rc), as long as every token after the first `key=` is one."""
    template_split = split_logfmt(template) or _split_words_then_fields(template)
    if template_split is None:
        return None
    head, values = template_split
    remaining = list(args)
    message = _fill(head, remaining)
    if message is None:
        return None
    found: dict[str, str] = {}
    for key, value in values.items():
        filled = _fill(value, remaining)
        if filled is None:
            return None
        found[key] = filled
    return (message, found) if not remaining else None


def _message_and_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    extra: dict[str, Any] = {}
    split = None
    if isinstance(record.msg, str) and isinstance(record.args, tuple) and record.args:
        split = split_logfmt_template(record.msg, record.args)
    if split is not None:
        message, extra = split[0], dict(split[1])
    else:
        message = record.getMessage()
        split = split_logfmt(message)
        if split is not None:
            message, extra = split[0], dict(split[1])
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        extra.update(fields)
    return message, extra


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
        }
        message, extra = _message_and_fields(record)
        entry["msg"] = message
        entry.update({k: v for k, v in extra.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line a record for people: time, level, service, message, then key=value."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        message, extra = _message_and_fields(record)
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        line = f"{when} {record.levelname.lower():<7} {self.service}: {message}"
        if pairs:
            line += f"  {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def _not_asyncio_noise(record: logging.LogRecord) -> bool:
    return not (record.name == "asyncio" and record.getMessage() == _ASYNCIO_NOISE)


def quiet_asyncio_tls_noise() -> None:
    """Drop asyncio's eof_received line for a process that logs without setup_logging
    (a kmsctl command on the bus: Python's last-resort handler printed it on the
    console as the command ended)."""
    logging.getLogger("asyncio").addFilter(_not_asyncio_noise)


def setup_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Log to stderr at `level`, as JSON lines (`fmt` "json", for files and collectors)
    or readable lines ("text", for a console)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter(service) if fmt == "text" else JSONFormatter(service))
    handler.addFilter(_not_asyncio_noise)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at error level; keep it to warnings.
    logging.getLogger("nats").setLevel(logging.WARNING)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a structured log call: log.info("msg", extra=fields(key=...))."""
    return {"fields": values}
