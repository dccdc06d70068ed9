"""Client config parsing: every way the file can be wrong gives a typed error with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekms.errors import FailedPrecondition
from mgmt.clientconfig import load_client_config, parse_broker, parse_client_config

GOOD = """
broker = "127.0.0.1:8443"
server_name = "edgekms-broker"
ca_cert = "ca.crt"
cert = "admin.crt"
key = "admin.key"
"""


def test_relative_paths_resolve_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "client" / "config.toml"
    path.parent.mkdir()
    path.write_text(GOOD)
    config = load_client_config(path)
    assert config.broker == "127.0.0.1:8443"
    assert config.server_name == "edgekms-broker"
    assert config.ca_cert == tmp_path / "client" / "ca.crt"
    assert config.cert == tmp_path / "client" / "admin.crt"
    assert config.key == tmp_path / "client" / "admin.key"


def test_absolute_paths_stay_and_server_name_is_optional(tmp_path: Path) -> None:
    text = f'broker = "kms.lan:1"\nca_cert = "{tmp_path}/ca"\ncert = "c"\nkey = "k"\n'
    config = parse_client_config(text, tmp_path / "x" / "config.toml")
    assert config.ca_cert == tmp_path / "ca"
    assert config.cert == tmp_path / "x" / "c"
    assert config.server_name is None


def test_missing_file_tells_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        load_client_config(tmp_path / "nope.toml")
    assert info.value.reason == "config.missing"
    assert "kmsctl init" in info.value.message


def test_missing_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_client_config('broker = "h:1"\ncert = "c"\n', tmp_path / "c.toml")
    assert info.value.reason == "config.field_missing"
    assert info.value.details["fields"] == "ca_cert,key"


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_client_config("broker = ", tmp_path / "c.toml")
    assert info.value.reason == "config.invalid"


@pytest.mark.parametrize("value", ["1", '""', "[1]"])
def test_fields_must_be_non_empty_strings(tmp_path: Path, value: str) -> None:
    text = f'broker = "h:1"\nca_cert = "a"\ncert = "c"\nkey = {value}\n'
    with pytest.raises(FailedPrecondition) as info:
        parse_client_config(text, tmp_path / "c.toml")
    assert info.value.reason == "config.field_invalid"
    assert info.value.details["field"] == "key"


@pytest.mark.parametrize("value", ["localhost", "h:", ":80", "h:0", "h:70000", "h:x"])
def test_bad_broker_address(value: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_broker(value)
    assert info.value.reason == "config.broker_invalid"


def test_broker_forms() -> None:
    assert parse_broker("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_broker("[::1]:9") == ("::1", 9)


def test_credentials_missing_file_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GOOD)
    (tmp_path / "ca.crt").write_bytes(b"ca")
    (tmp_path / "admin.crt").write_bytes(b"cert")
    config = load_client_config(path)
    with pytest.raises(FailedPrecondition) as info:
        config.read_credentials()
    assert info.value.reason == "config.file_missing"
    assert info.value.details["field"] == "key"
    (tmp_path / "admin.key").write_bytes(b"key")
    assert config.read_credentials() == (b"ca", b"cert", b"key")


def test_more_brokers_follow_the_first_each_once(tmp_path: Path) -> None:
    text = GOOD + 'brokers = ["b.lan:8443", "127.0.0.1:8443", "c.lan:8443"]\n'
    config = parse_client_config(text, tmp_path / "config.toml")
    assert config.brokers == ("127.0.0.1:8443", "b.lan:8443", "c.lan:8443")
    assert parse_client_config(GOOD, tmp_path / "c.toml").brokers == ("127.0.0.1:8443",)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"b.lan:8443"', "config.field_invalid"),  # a string, not a list
        ("[1, 2]", "config.field_invalid"),
        ('["b.lan"]', "config.broker_invalid"),  # no port
        ("[" + ", ".join(f'"h{i}:1"' for i in range(17)) + "]", "config.field_invalid"),
    ],
    ids=["a-string", "not-strings", "no-port", "too-many"],
)
def test_bad_brokers_list_is_refused(tmp_path: Path, value: str, reason: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_client_config(GOOD + f"brokers = {value}\n", tmp_path / "c.toml")
    assert info.value.reason == reason


def test_a_key_in_a_tpm_is_named_with_its_tpm(tmp_path: Path) -> None:
    text = (
        GOOD.replace('"admin.key"', '"device.tss2.pem"')
        + 'key_store = "tpm"\ntpm = "/dev/tpmrm0"\n'
    )
    config = parse_client_config(text, tmp_path / "config.toml")
    assert (config.key_store, config.tpm) == ("tpm", "/dev/tpmrm0")
    assert parse_client_config(GOOD, tmp_path / "config.toml").key_store == "file"


def test_an_unknown_key_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as err:
        parse_client_config(GOOD + 'key_store = "smartcard"\n', tmp_path / "config.toml")
    assert err.value.reason == "config.field_invalid"
    assert err.value.details["field"] == "key_store"
