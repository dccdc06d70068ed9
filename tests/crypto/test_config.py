"""Config parsing (pure logic): good files become dataclasses, bad ones name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto_service.config import (
    ConfigError,
    Pkcs11Config,
    ServiceConfig,
    load_config,
    read_pin,
)

GOOD = """
provider_id = "hsm0"
nats_url = "nats://127.0.0.1:4222"
[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "edgekms"
pin_file = "/tmp/pin"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crypto.toml"
    path.write_text(text)
    return path


def test_good_pkcs11_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert isinstance(config, ServiceConfig)
    assert config.kind == "pkcs11"
    assert config.pkcs11 == Pkcs11Config(
        "/usr/lib/softhsm/libsofthsm2.so", "edgekms", Path("/tmp/pin"), None, 4
    )
    assert config.workers == 4  # defaults to the session count


def test_tpm2_config_keeps_extra_keys(tmp_path: Path) -> None:
    text = (
        'provider_id = "tpm0"\nnats_url = "nats://127.0.0.1:4222"\n[tpm2]\n'
        'tcti = "swtpm:host=127.0.0.1,port=2321"\nstate_dir = "/var/lib/tpm0"\nfuture_option = 5\n'
    )
    config = load_config(_write(tmp_path, text))
    assert config.kind == "tpm2"
    assert config.workers == 1
    assert config.tpm2 is not None
    assert config.tpm2.state_dir == Path("/var/lib/tpm0")
    assert config.tpm2.extra == {"future_option": 5}


def test_tpm2_config_names_the_hierarchy_auth_files(tmp_path: Path) -> None:
    text = (
        'provider_id = "tpm0"\nnats_url = "nats://127.0.0.1:4222"\n[tpm2]\n'
        'tcti = "device:/dev/tpmrm0"\nstate_dir = "/var/lib/tpm0"\n'
        'owner_auth_file = "/s/tpm-owner.auth"\nendorsement_auth_file = "/s/tpm-endorsement.auth"\n'
    )
    config = load_config(_write(tmp_path, text))
    assert config.tpm2 is not None
    assert config.tpm2.owner_auth_file == Path("/s/tpm-owner.auth")
    assert config.tpm2.endorsement_auth_file == Path("/s/tpm-endorsement.auth")
    assert config.tpm2.extra == {}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: t.replace('"hsm0"', '"HSM 0"'), "provider_id"),
        (lambda t: t.replace("nats://", "http://"), "nats_url"),
        (lambda t: t.replace('pin_file = "/tmp/pin"', ""), "pin_file/pin_env"),
        (lambda t: t + 'pin_env = "X"\n', "pin_file/pin_env"),
        (lambda t: t + "sessions = 0\n", "pkcs11.sessions"),
        (lambda t: t + "colour = 1\n", "pkcs11.colour"),
        (lambda t: t.replace("[pkcs11]", "workers = 'many'\n[pkcs11]"), "workers"),
        (lambda t: t + '[tpm2]\ntcti = "x"\nstate_dir = "y"\n', "pkcs11/tpm2"),
        (lambda t: t + "[[", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, change: object, field: str) -> None:
    assert callable(change)
    path = _write(tmp_path, change(GOOD))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_read_pin_strips_one_newline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n\n")
    assert read_pin(Pkcs11Config("m", "t", pin_file=pin_file)) == "1234\n"
    pin_file.write_text("1234\n")
    assert read_pin(Pkcs11Config("m", "t", pin_file=pin_file)) == "1234"
    monkeypatch.setenv("T_PIN", "abcd")
    assert read_pin(Pkcs11Config("m", "t", pin_env="T_PIN")) == "abcd"
    with pytest.raises(ConfigError, match="T_NOPE is not set"):
        read_pin(Pkcs11Config("m", "t", pin_env="T_NOPE"))
    pin_file.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_pin(Pkcs11Config("m", "t", pin_file=pin_file))
