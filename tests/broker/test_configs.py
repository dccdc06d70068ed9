"""The broker's and the CA service's config loaders refuse what they would otherwise
ignore or crash on, naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from ca_service.config import CAConfigError, load_serve_config

BROKER = """listen = "127.0.0.1:8443"
nats_url = "nats://127.0.0.1:4222"
default_provider = "hsm0"
providers = ["hsm0"]
{extra}
[tls]
cert = "broker.crt"
key = "broker.key"
client_ca = "ca.crt"
{tls_extra}
"""


def _broker(tmp_path: Path, extra: str = "", tls_extra: str = "") -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(BROKER.format(extra=extra, tls_extra=tls_extra))
    return path


def test_broker_config_loads(tmp_path: Path) -> None:
    config = load_config(_broker(tmp_path, extra="sign_timeout = 2"))
    assert config.sign_timeout == 2.0
    assert config.tls.cert == tmp_path / "broker.crt"
    assert config.ca is False  # status reports a CA only where one is configured
    assert load_config(_broker(tmp_path, extra="ca = true")).ca is True


@pytest.mark.parametrize(
    ("extra", "tls_extra", "message"),
    [
        ("sign_timout = 2", "", "unknown field 'sign_timout'"),
        ("", 'crt = "x"', "unknown field tls.'crt'"),
        ('sign_timeout = "fast"', "", "'sign_timeout' must be a positive number"),
        ("generate_timeout = 0", "", "'generate_timeout' must be a positive number"),
        ('nats_user = "broker"', "", "give both or neither"),
        ('ca = "yes"', "", "'ca' must be true or false"),
    ],
)
def test_broker_config_refuses(tmp_path: Path, extra: str, tls_extra: str, message: str) -> None:
    path = _broker(tmp_path, extra, tls_extra)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(path) in str(refused.value)
    assert message in str(refused.value)


def test_ca_config_refuses_unknown_and_bad_fields(tmp_path: Path) -> None:
    path = tmp_path / "ca.toml"
    path.write_text('nats_url = "nats://127.0.0.1:4222"\nstate_dir = "/var/lib/x"\n')
    with pytest.raises(CAConfigError, match="unknown field 'state_dir'"):
        load_serve_config(path)
    path.write_text('nats_url = "nats://127.0.0.1:4222"\nhttp_listen = "8180"\n')
    with pytest.raises(CAConfigError, match="http_listen must be host:port"):
        load_serve_config(path)
    path.write_text('http_listen = "127.0.0.1:8180"\n')
    with pytest.raises(CAConfigError, match="missing field 'nats_url'"):
        load_serve_config(path)


@pytest.mark.parametrize("shipped", ["deploy", "docker/config"])
def test_shipped_configs_have_no_unknown_fields(shipped: str) -> None:
    root = Path(__file__).resolve().parents[2] / shipped
    load_config(root / "broker.toml")
    load_serve_config(root / "ca.toml")


def test_provider_nodes_load(tmp_path: Path) -> None:
    config = load_config(_broker(tmp_path, extra='provider_nodes = { hsm0 = "nas1" }'))
    assert config.provider_nodes == {"hsm0": "nas1"}
    assert load_config(_broker(tmp_path)).provider_nodes == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('provider_nodes = { tpm9 = "nas1" }', "provider_nodes names 'tpm9', not in providers"),
        ('provider_nodes = { hsm0 = "nas 1" }', "provider_nodes.hsm0 is not a node name"),
        ('provider_nodes = "nas1"', "'provider_nodes' must be a table"),
    ],
    ids=["unknown-provider", "bad-node-name", "not-a-table"],
)
def test_bad_provider_nodes_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    path = _broker(tmp_path, extra)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(path) in str(refused.value)
    assert message in str(refused.value)


def test_the_attest_challenge_lifetime_loads_with_a_default(tmp_path: Path) -> None:
    assert load_config(_broker(tmp_path)).attest_challenge_ttl == 60.0
    loaded = load_config(_broker(tmp_path, extra="attest_challenge_ttl = 15"))
    assert loaded.attest_challenge_ttl == 15.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5", "'attest_challenge_ttl' must be 2 to 600 seconds"),
        ("601", "'attest_challenge_ttl' must be 2 to 600 seconds"),
        ("0", "'attest_challenge_ttl' must be a positive number"),
        ('"1m"', "'attest_challenge_ttl' must be a positive number"),
    ],
    ids=["too-short", "too-long", "zero", "not-a-number"],
)
def test_an_attest_challenge_lifetime_out_of_bounds_is_refused(
    tmp_path: Path, value: str, message: str
) -> None:
    """Under 2 s no real TPM answers in time; over 10 minutes a captured challenge stays
    worth stealing for too long. The broker does not start on either."""
    path = _broker(tmp_path, f"attest_challenge_ttl = {value}")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(path) in str(refused.value) and message in str(refused.value)


@pytest.mark.parametrize("value", ["1", "601", "soon"])
def test_kmsctl_up_refuses_an_attest_challenge_lifetime_out_of_bounds(
    tmp_path: Path, value: str
) -> None:
    """`kmsctl up --attest-challenge-ttl` is checked by click before anything starts."""
    from click.testing import CliRunner

    from mgmt.cli import cli

    done = CliRunner().invoke(
        cli, ["up", "--data-dir", str(tmp_path / "data"), "--attest-challenge-ttl", value]
    )
    assert done.exit_code == 2, done.output
    assert "--attest-challenge-ttl" in done.output
    assert not (tmp_path / "data").exists()
