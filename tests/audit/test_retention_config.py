"""The retention settings as a deployment gives them: broker.toml's audit_archive_dir,
audit_window, audit_max_age and audit_archive_interval, each refused by name when bad;
`kmsctl up --max-file-store` and `--audit-window` refused as usage errors before
anything is made; and what `kmsctl up` writes into broker.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from edgekms.retention import DEFAULT_MAX_AGE_S, RetentionPolicy

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _broker_toml(tmp_path: Path, extra: str) -> Path:
    """The board's broker.toml with `extra` in place of its own archive dir."""
    text = (DEPLOY / "broker.toml").read_text()
    text = "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("audit_archive_dir")
    )
    head, sep, tls = text.partition("[tls]")
    path = tmp_path / "broker.toml"
    path.write_text(head + extra + "\n" + sep + tls)
    return path


def test_the_retention_fields_load_and_default(tmp_path: Path) -> None:
    board = load_config(DEPLOY / "broker.toml")
    assert board.audit_archive_dir == Path("/var/lib/edgekms/audit-archive")
    plain = load_config(_broker_toml(tmp_path, ""))
    assert plain.audit_archive_dir is None  # no dir: this broker does not archive
    assert plain.retention == RetentionPolicy()
    assert plain.retention.max_age_s == DEFAULT_MAX_AGE_S


def test_retention_fields_read_relative_to_the_config(tmp_path: Path) -> None:
    config = load_config(
        _broker_toml(
            tmp_path,
            'audit_archive_dir = "archive"\naudit_window = 0.25\naudit_max_age = 0\n'
            "audit_archive_interval = 2.5",
        )
    )
    assert config.audit_archive_dir == tmp_path / "archive"
    assert config.retention == RetentionPolicy(window_fraction=0.25, max_age_s=0.0, interval_s=2.5)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("audit_window = 0.9", "audit_window"),
        ("audit_window = 0", "audit_window"),
        ('audit_window = "half"', "audit_window"),
        ("audit_max_age = -1", "audit_max_age"),
        ('audit_max_age = "7d"', "audit_max_age"),
        ("audit_archive_interval = 0", "audit_archive_interval"),
        ("audit_archive_dir = 3", "audit_archive_dir"),
    ],
)
def test_a_bad_retention_field_is_refused_by_name(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_broker_toml(tmp_path, line))
    assert field in str(refused.value)


@pytest.mark.parametrize(
    "args",
    [
        ("--max-file-store", "lots"),
        ("--max-file-store", "512KiB"),
        ("--audit-window", "0.9"),
        ("--audit-archive-interval", "0"),
    ],
)
def test_a_bad_store_or_retention_option_is_a_usage_error(
    tmp_path: Path, args: tuple[str, str]
) -> None:
    result = subprocess.run(
        [KMSCTL, "up", "--data-dir", str(tmp_path / "never"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert args[0] in result.stderr
    assert not (tmp_path / "never").exists()
