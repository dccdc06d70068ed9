"""A service's own audit stream limits from its TOML (`audit_max_bytes`, `audit_max_msgs`):
read with the size parser `--audit-limit` uses, and refused by each service's config
loader, naming the field, when they are not a size, too small or a count without a size.
Pure parsing: the live half is tests/deploy/test_board_store.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError as BrokerConfigError
from broker.config import load_config as load_broker
from ca_service.config import CAConfigError, load_serve_config
from crypto_service.config import ConfigError as CryptoConfigError
from crypto_service.config import load_config as load_crypto
from edgekms.audit import (
    DEFAULT_WRITER_QUOTA,
    MIN_STREAM_BYTES,
    StreamLimit,
    parse_limit_fields,
    parse_size,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_sizes_read_as_the_audit_limit_flag_reads_them() -> None:
    assert parse_size("96MiB") == 96 * 1024**2
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("4096") == parse_size("4096B") == 4096
    for bad in ("", "MiB", "1.5MiB", "-1MiB", "12XB", "1 MiB", "1TiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_limit_fields() -> None:
    assert parse_limit_fields({}) == (None, [])
    assert parse_limit_fields({"audit_max_bytes": "96MiB"}) == (
        StreamLimit(96 * 1024**2, DEFAULT_WRITER_QUOTA),
        [],
    )
    assert parse_limit_fields({"audit_max_bytes": "8MiB", "audit_max_msgs": 1000}) == (
        StreamLimit(8 * 1024**2, 1000),
        [],
    )


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "not_a_size": ({"audit_max_bytes": "96 megs"}, "audit_max_bytes"),
    "a_number": ({"audit_max_bytes": 100663296}, "audit_max_bytes"),
    "too_small": ({"audit_max_bytes": f"{MIN_STREAM_BYTES - 1}B"}, "audit_max_bytes"),
    "zero_messages": ({"audit_max_bytes": "8MiB", "audit_max_msgs": 0}, "audit_max_msgs"),
    "messages_as_text": ({"audit_max_bytes": "8MiB", "audit_max_msgs": "10"}, "audit_max_msgs"),
    "messages_as_bool": ({"audit_max_bytes": "8MiB", "audit_max_msgs": True}, "audit_max_msgs"),
    "count_without_size": ({"audit_max_msgs": 1000}, "audit_max_msgs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_limit_fields_name_the_field(case: str) -> None:
    fields, name = BAD[case]
    limit, problems = parse_limit_fields(fields)
    assert limit is None
    assert len(problems) == 1 and problems[0].startswith(f"{name}: "), problems


LOADERS: dict[str, tuple[Callable[[Path], Any], type[Exception]]] = {
    "broker.toml": (load_broker, BrokerConfigError),
    "ca.toml": (load_serve_config, CAConfigError),
    "crypto-hsm0.toml": (load_crypto, CryptoConfigError),
}


def _board_config_with(tmp_path: Path, name: str, value: str) -> Path:
    """The board's own config with its audit_max_bytes line changed."""
    text = (DEPLOY / name).read_text()
    changed = re.sub(r"^audit_max_bytes = .*$", f"audit_max_bytes = {value}", text, flags=re.M)
    assert changed != text, f"{name} sets no audit_max_bytes"
    path = tmp_path / name
    path.write_text(changed)
    return path


@pytest.mark.parametrize("name", list(LOADERS))
def test_every_service_config_refuses_a_bad_audit_limit(tmp_path: Path, name: str) -> None:
    load, error = LOADERS[name]
    with pytest.raises(error) as refused:
        load(_board_config_with(tmp_path, name, '"lots"'))
    assert "audit_max_bytes" in str(refused.value) and name in str(refused.value)
    with pytest.raises(error, match="audit_max_bytes"):
        load(_board_config_with(tmp_path, name, '"1KiB"'))
    loaded = load(_board_config_with(tmp_path, name, '"12MiB"'))
    assert loaded.audit_limit == StreamLimit(12 * 1024**2, DEFAULT_WRITER_QUOTA)
