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


def test_a_crypto_wildcard_limit_reaches_every_provider_not_named(tmp_path: Path) -> None:
    """`--audit-limit crypto-*=SIZE` (the board's units: they cannot name a cluster's
    other nodes) sizes each crypto service's stream that has no limit of its own."""
    from mgmt.cli.stack import _audit_limits, expand_crypto_limit

    limits = _audit_limits(("crypto-*=8MiB", "crypto-tpm0=16MiB/5", "broker=96MiB"))
    assert limits["crypto-*"][0] == 8 * 1024**2
    expanded = expand_crypto_limit(limits, ["hsm0", "tpm0", "hsm-nas2"])
    assert expanded == {
        "broker": limits["broker"],
        "crypto-hsm0": limits["crypto-*"],
        "crypto-tpm0": (16 * 1024**2, 5),
        "crypto-hsm-nas2": limits["crypto-*"],
    }
    ctx = up.make_context("up", ["--data-dir", str(tmp_path), "--tpm", "swtpm"])
    stack = UpOptions(**ctx.params).stack_options(limits, None)
    assert set(stack.audit_limits) == {"broker", "crypto-hsm0", "crypto-tpm0"}
    assert stack.pkcs11 is None and stack.token_label == "edgekms"
