"""The permission tables and credential plumbing as pure logic (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError as BrokerConfigError
from broker.config import load_config as load_broker_config
from crypto_service.config import ConfigError, parse_config
from edgekms.errors import FailedPrecondition, InvalidArgument
from mgmt.natsauth import (
    INBOX_ROOT,
    BusCredentials,
    Permissions,
    inbox_prefix,
    parse_bus_fields,
    render_authorization,
    stack_identities,
)


def test_each_identity_hears_only_its_own_inbox() -> None:
    for identity in stack_identities(["hsm0", "tpm0"]):
        inboxes = [s for s in identity.permissions.subscribe if s.startswith(INBOX_ROOT)]
        assert inboxes in ([], [f"{inbox_prefix(identity.user)}.>"]), identity.user
        assert ">" not in identity.permissions.subscribe
        assert not any(s.startswith("_INBOX") for s in identity.permissions.publish)


def test_only_responders_may_reply_and_crypto_publishes_nothing() -> None:
    by_user = {i.user: i.permissions for i in stack_identities(["hsm0"])}
    assert by_user["crypto-hsm0"].allow_responses
    assert by_user["ca"].allow_responses
    assert not by_user["broker"].allow_responses
    assert by_user["crypto-hsm0"].publish[0] == "kms.audit.crypto-hsm0"
    assert not any(s.startswith("kms.crypto") for s in by_user["crypto-hsm0"].publish)
    assert Permissions().render()["publish"] == {"deny": [">"]}
    assert Permissions().render()["subscribe"] == {"deny": [">"]}


def test_ca_reaches_only_the_provider_it_is_given() -> None:
    ca = next(i for i in stack_identities(["hsm0", "tpm0"], "tpm0") if i.user == "ca")
    crypto = [s for s in ca.permissions.publish if s.startswith("kms.crypto.")]
    assert crypto and all(s.startswith("kms.crypto.tpm0.") for s in crypto)


@pytest.mark.parametrize(
    ("providers", "reason"),
    [
        ([], "bus.no_providers"),
        (["hsm0", "hsm0"], "bus.provider_duplicate"),
        (["HSM 0"], "bus.provider_invalid"),
        (["a.b"], "bus.provider_invalid"),
    ],
)
def test_bad_providers_are_invalid(providers: list[str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        stack_identities(providers)
    assert info.value.reason == reason


def test_render_needs_every_password() -> None:
    identities = stack_identities(["hsm0"])
    with pytest.raises(InvalidArgument) as info:
        render_authorization(identities, {"broker": "pw"})
    assert info.value.reason == "bus.password_missing"


def test_credentials_fail_typed(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        BusCredentials("broker").connect_options()
    assert info.value.reason == "bus.credentials_incomplete"
    with pytest.raises(FailedPrecondition) as info:
        BusCredentials("broker", tmp_path / "missing").connect_options()
    assert info.value.reason == "bus.credentials_unreadable"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(FailedPrecondition) as info:
        BusCredentials("broker", tmp_path / "empty").connect_options()
    assert info.value.reason == "bus.credentials_empty"
    (tmp_path / "pw").write_text("s3cret\n")
    options = BusCredentials("broker", tmp_path / "pw").connect_options()
    assert options == {"user": "broker", "password": "s3cret", "inbox_prefix": "_INBOX.broker"}


def test_bus_fields_are_both_or_neither(tmp_path: Path) -> None:
    creds, problems = parse_bus_fields({"nats_user": "broker"}, tmp_path)
    assert problems == ["nats_user/nats_password_file: give both or neither"]
    creds, problems = parse_bus_fields({"nats_user": "Bad User", "nats_password_file": "p"})
    assert problems and problems[0].startswith("nats_user:")
    creds, problems = parse_bus_fields(
        {"nats_user": "broker", "nats_password_file": "p", "nats_ca": "/abs/ca.crt"}, tmp_path
    )
    assert problems == []
    assert creds == BusCredentials("broker", tmp_path / "p", Path("/abs/ca.crt"))


BASE = {
    "provider_id": "hsm0",
    "nats_url": "tls://127.0.0.1:4222",
    "pkcs11": {"module": "/m.so", "token_label": "t", "pin_file": "/p"},
}


def test_crypto_config_reads_its_bus_identity(tmp_path: Path) -> None:
    config = parse_config(
        {**BASE, "nats_user": "crypto-hsm0", "nats_password_file": "/s/pw", "nats_ca": "/ca"},
        tmp_path / "crypto.toml",
    )
    assert config.bus == BusCredentials("crypto-hsm0", Path("/s/pw"), Path("/ca"))
    assert parse_config(BASE).bus == BusCredentials()
    with pytest.raises(ConfigError, match="nats_password_file"):
        parse_config({**BASE, "nats_user": "crypto-hsm0"})


def test_broker_config_reads_its_bus_identity(tmp_path: Path) -> None:
    body = (
        'listen = "127.0.0.1:0"\nnats_url = "tls://127.0.0.1:4222"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0"]\n'
        'nats_user = "broker"\nnats_password_file = "secrets/broker.password"\n'
        'nats_ca = "bus-ca.crt"\n'
        '[tls]\ncert = "b.crt"\nkey = "b.key"\nclient_ca = "ca.crt"\n'
    )
    (tmp_path / "broker.toml").write_text(body)
    config = load_broker_config(tmp_path / "broker.toml")
    assert config.bus == BusCredentials(
        "broker", tmp_path / "secrets/broker.password", tmp_path / "bus-ca.crt"
    )
    (tmp_path / "bad.toml").write_text(body.replace('nats_user = "broker"\n', ""))
    with pytest.raises(BrokerConfigError, match="nats_user/nats_password_file"):
        load_broker_config(tmp_path / "bad.toml")


def test_no_service_may_change_a_stream_and_setup_is_the_supervisors_alone() -> None:
    """Issue 11, item 3: stream update, purge and delete, and message delete, are nobody's
    but the supervisor's during setup (create and update only). Issue 21: the one
    exception is the broker's archiver, which may purge each writer's audit stream (it
    reads every one whole) and nothing else: not the closed legacy stream, no bucket."""
    writers = ("BROKER", "CA", "CRYPTO-HSM0", "CRYPTO-TPM0")
    for setup in (False, True):
        for identity in stack_identities(["hsm0", "tpm0"], setup=setup, ceremony=setup):
            purges = [s for s in identity.permissions.publish if "STREAM.PURGE." in s]
            if identity.user == "broker":
                assert purges == [f"$JS.API.STREAM.PURGE.KMS_AUDIT_{w}" for w in writers]
            else:
                assert purges == [], identity.user
            for subject in identity.permissions.publish:
                for verb in ("STREAM.DELETE.", "STREAM.MSG.DELETE."):
                    assert verb not in subject, subject
                if ".STREAM.UPDATE." in subject:
                    assert setup and identity.user == "kmsctl", (identity.user, subject)


def test_registry_writes_are_limited_to_the_keys_a_writer_owns() -> None:
    by_user = {i.user: i.permissions.publish for i in stack_identities(["hsm0"])}
    assert [s for s in by_user["ca"] if s.startswith("$KV.kms_keys.")] == [
        "$KV.kms_keys.ca/root",
        "$KV.kms_keys.ca/intermediate",
        *(f"$KV.kms_keys.ca/intermediate-{n}" for n in range(2, 100)),
        # The SPIFFE trust domain's keys (ca_service/spiffe.py).
        "$KV.kms_keys.ca/spiffe",
        *(f"$KV.kms_keys.ca/spiffe-{n}" for n in range(2, 100)),
        "$KV.kms_keys.ca/spiffe-jwt",
        *(f"$KV.kms_keys.ca/spiffe-jwt-{n}" for n in range(2, 100)),
    ]
    assert not [s for s in by_user["kmsctl"] if s.startswith("$KV.")]
    ceremony = {i.user: i.permissions.publish for i in stack_identities(["hsm0"], ceremony=True)}
    assert [s for s in ceremony["kmsctl"] if s.startswith("$KV.")] == [
        "$KV.kms_keys.edgekms/internal-ca"
    ]
    assert "$KV.kms_keys.>" in by_user["broker"]


def test_each_audit_writer_publishes_on_its_own_subject_only() -> None:
    for identity in stack_identities(["hsm0", "tpm0"]):
        audit = [s for s in identity.permissions.publish if s.startswith("kms.audit")]
        expected = {"kmsctl": []}.get(identity.user, [f"kms.audit.{identity.user}"])
        assert audit == expected, identity.user
