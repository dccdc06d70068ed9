"""`kmsctl up` declares each option once: its click parameters and UpOptions agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mgmt.cli.stack import UpOptions, up


def test_every_up_option_is_a_field_and_every_field_an_option() -> None:
    """A new option with no field (or a field with no option) would fail only when
    `kmsctl up` runs; this catches it without starting anything."""
    params = {p.name for p in up.params}
    fields = {f.name for f in dataclasses.fields(UpOptions)}
    assert params == fields


def test_stack_options_carry_what_up_was_given(tmp_path: Path) -> None:
    """The defaults click would give, passed through to the supervisor's options."""
    ctx = up.make_context("up", ["--data-dir", str(tmp_path), "--log-level", "WARNING"])
    options = UpOptions(**ctx.params)
    stack = options.stack_options({"broker": (1024, 10)}, 64 * 1024**2)
    assert stack.data_dir == tmp_path
    assert stack.nats_port == 4222
    assert stack.broker_listen == "127.0.0.1:8443"
    assert stack.log_level == "warning"
    assert stack.audit_limits == {"broker": (1024, 10)}
    assert stack.start_timeout == 30.0
    assert stack.max_file_store == 64 * 1024**2
    assert stack.audit_window == options.audit_window
    with_frozen = dataclasses.replace(options, nats_port=5000)
    assert with_frozen.stack_options({}, None).nats_port == 5000
