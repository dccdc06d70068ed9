"""The log formats (pure logic): logfmt written inside a message becomes fields, the
text format reads as a line, asyncio's TLS noise is dropped."""

from __future__ import annotations

import json
import logging

from edgekms.logs import (
    JSONFormatter,
    TextFormatter,
    _not_asyncio_noise,
    fields,
    split_logfmt,
    split_logfmt_template,
)


def _record(msg: str, *args: object, name: str = "t", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_logfmt_messages_split_into_message_and_fields() -> None:
    assert split_logfmt("event=ca_issued serial=01 profile=vpn") == (
        "ca_issued",
        {"serial": "01", "profile": "vpn"},
    )
    assert split_logfmt("config.unknown_fields path=/x fields=a,b") == (
        "config.unknown_fields",
        {"path": "/x", "fields": "a,b"},
    )
    for prose in ("started", "took over the data dir", "a=b", "x y=1 y=2", "x 1=2"):
        assert split_logfmt(prose) is None, prose


def test_json_lines_carry_one_field_set() -> None:
    line = JSONFormatter("ca").format(_record("event=ca_issued serial=%s n=%d", "0A", 3))
    entry = json.loads(line)
    assert (entry["msg"], entry["serial"], entry["n"], entry["service"]) == (
        "ca_issued",
        "0A",
        "3",
        "ca",
    )
    structured = JSONFormatter("broker").format(_record("request", **fields(method="Sign", ms=1.5)))
    assert json.loads(structured)["ms"] == 1.5
    # A field never overwrites the line's own keys.
    clash = json.loads(JSONFormatter("b").format(_record("x", **fields(level="evil"))))
    assert clash["level"] == "info"


def test_an_argument_with_spaces_stays_one_fields_value() -> None:
    """The split is made on the format string: the bus error a service logs (its name
    and nats-py's text have spaces, `=` and quotes) came out whole in `msg`, logfmt and
    all (tests/e2e/test_logs.py caught it in a CA log)."""
    error = 'Error: nats: permissions violation for publish to "_inbox.x=y"'
    record = _record("event=bus_error service=%s error=%r", "the CA service", error)
    entry = json.loads(JSONFormatter("ca").format(record))
    # `service` is the line's own key (a field never overwrites it): the process's name.
    assert (entry["msg"], entry["service"], entry["error"]) == ("bus_error", "ca", repr(error))
    spaced = _record("event=bus_error part=%s error=%r", "the CA service", error)
    assert json.loads(JSONFormatter("ca").format(spaced))["part"] == "the CA service"
    text = TextFormatter("ca").format(spaced)
    assert 'ca: bus_error  part="the CA service" error=' in text
    assert "event=" not in text
    assert split_logfmt_template("event=x ms=%.1f n=%d", (1.25, 7)) == (
        "x",
        {"ms": "1.2", "n": "7"},
    )
    # Not one conversion per value, or arguments left over or missing: not split this way.
    assert split_logfmt_template("event=serving http=%s:%d pct=%d%%", ("::1", 80, 5)) == (
        "serving",
        {"http": "::1:80", "pct": "5%"},
    )
    # Words, then fields: the words are the message.
    assert split_logfmt_template("tpm connect failed tcti=%s rc=0x%x", ("swtpm:x", 0x98E)) == (
        "tpm connect failed",
        {"tcti": "swtpm:x", "rc": "0x98e"},
    )
    for template, args in (
        ("event=x pct=50%", ()),
        ("tpm failed op=%s and then some", ("sign",)),
        ("a %s word key=%s", ("x", "y")),
        ("event=x pct=%d%", (50,)),
        ("event=x a=%s", ("1", "2")),
        ("event=x a=%s b=%s", ("1",)),
        ("took over %s", ("it",)),
    ):
        assert split_logfmt_template(template, args) is None, template
    # Prose with arguments is left as it is.
    prose = json.loads(JSONFormatter("b").format(_record("took over the data dir of pid %d", 7)))
    assert prose["msg"] == "took over the data dir of pid 7"


def test_text_lines_for_people() -> None:
    line = TextFormatter("kmsctl-up").format(
        _record("started", **fields(part="nats", url="tls://127.0.0.1:4222"))
    )
    assert line.endswith("info    kmsctl-up: started  part=nats url=tls://127.0.0.1:4222")
    spaced = TextFormatter("x").format(_record("m", **fields(why="two words")))
    assert spaced.endswith('why="two words"')


def test_asyncio_tls_noise_is_dropped_and_nothing_else() -> None:
    noise = "returning true from eof_received() has no effect when using ssl"
    assert not _not_asyncio_noise(_record(noise, name="asyncio"))
    assert _not_asyncio_noise(_record("Task was destroyed but it is pending!", name="asyncio"))
    assert _not_asyncio_noise(_record(noise, name="broker"))
