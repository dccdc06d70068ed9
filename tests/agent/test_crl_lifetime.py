"""The CA's CRL lifetime (ca.toml crl_lifetime, `kmsctl up --ca-crl-lifetime`): pure
parsing here; the CA signing CRLs of that lifetime is proven by tests/agent/test_agent_e2e.py,
whose OpenVPN accepts the agent's CRL after the first one's nextUpdate has passed."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from ca_service.config import CAConfigError, load_serve_config
from ca_service.crl import CRL_VALIDITY
from edgekms.durations import parse_crl_lifetime
from edgekms.errors import InvalidArgument


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "ca.toml"
    path.write_text(f'nats_url = "nats://127.0.0.1:1"\n{extra}')
    return path


def test_default_is_seven_days(tmp_path: Path) -> None:
    assert load_serve_config(_config(tmp_path, "")).crl_validity == CRL_VALIDITY
    assert datetime.timedelta(days=7) == CRL_VALIDITY


def test_minutes_are_accepted(tmp_path: Path) -> None:
    config = load_serve_config(_config(tmp_path, 'crl_lifetime = "2m"\n'))
    assert config.crl_validity == datetime.timedelta(minutes=2)


@pytest.mark.parametrize("value", ['"30s"', '"0m"', '"31d"', '"soon"', "5"])
def test_bad_lifetimes_are_refused_naming_the_field(tmp_path: Path, value: str) -> None:
    with pytest.raises(CAConfigError, match="crl_lifetime"):
        load_serve_config(_config(tmp_path, f"crl_lifetime = {value}\n"))


def test_parse_crl_lifetime_is_typed() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_crl_lifetime("45d")
    assert caught.value.reason == "config.crl_lifetime_invalid"
    assert parse_crl_lifetime("1m") == datetime.timedelta(minutes=1)
    assert parse_crl_lifetime("30d") == datetime.timedelta(days=30)
