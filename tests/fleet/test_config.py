"""Rendering a hub's and a device's nats-server config (mgmt.natsserver), and the refusals.

What is rendered is also handed to the real nats-server's config check (`-t`), so a
config the binary would refuse fails here, not on a device in the field.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edgekms.errors import InvalidArgument
from edgekms.fleet import check_device, device_domain, fleet_stream, fleet_stream_config
from mgmt.fleet import device_identity
from mgmt.natsauth import render_authorization
from mgmt.natsserver import (
    HubLeafListen,
    LeafRemote,
    NatsServerConfig,
    find_binary,
)


def check_with_binary(config: NatsServerConfig, tmp_path: Path) -> None:
    path = tmp_path / "nats.conf"
    path.write_text(config.render())
    done = subprocess.run(
        [find_binary(), "-c", str(path), "-t"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def hub(tmp_path: Path, authorization: str | None) -> NatsServerConfig:
    return NatsServerConfig(
        store_dir=tmp_path / "js",
        domain="hub",
        authorization=authorization,
        leaf_listen=HubLeafListen(port=7422, host="0.0.0.0"),
    )


def device(tmp_path: Path, remote: LeafRemote, domain: str | None = "dev-a") -> NatsServerConfig:
    return NatsServerConfig(store_dir=tmp_path / "js", domain=domain, leaf_remote=remote)


def test_hub_config_renders_and_the_binary_takes_it(tmp_path: Path) -> None:
    authorization = render_authorization([device_identity("a")], {"leaf-a": "pw-a"})
    config = hub(tmp_path, authorization)
    text = config.render()
    assert 'domain: "hub"' in text and "leafnodes: {" in text and "port: 7422" in text
    check_with_binary(config, tmp_path)


def test_device_config_renders_plain_and_tls_uplinks(tmp_path: Path) -> None:
    remote = LeafRemote("hub.lan:7422", "leaf-a", "p@ss/word")
    text = device(tmp_path, remote).render()
    # The password is quoted into the URL, never left to break it.
    assert "nats-leaf://leaf-a:p%40ss%2Fword@hub.lan:7422" in text
    assert 'domain: "dev-a"' in text
    check_with_binary(device(tmp_path, remote), tmp_path)
    ca = tmp_path / "hub-ca.crt"
    ca.write_text("")
    tls = device(tmp_path, LeafRemote("hub.lan:7422", "leaf-a", "pw", tls_ca=ca))
    assert "tls://leaf-a:pw@hub.lan:7422" in tls.render() and str(ca) in tls.render()


def test_a_leaf_listener_without_authorization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        hub(tmp_path, None).render()
    assert err.value.reason == "fleet.leaf_listener_open"


@pytest.mark.parametrize(
    ("remote", "domain", "reason"),
    [
        (LeafRemote("hub:7422", "leaf-a", ""), "dev-a", "fleet.uplink_credentials_missing"),
        (LeafRemote("hub:7422", "", "pw"), "dev-a", "fleet.uplink_credentials_missing"),
        (LeafRemote("nats://hub:7422", "leaf-a", "pw"), "dev-a", "fleet.uplink_invalid"),
        (LeafRemote("hub:7422", "leaf-a", "pw"), None, "fleet.domain_missing"),
        (LeafRemote("hub:7422", "leaf-a", "pw"), "dev.a", "fleet.domain_invalid"),
    ],
    ids=["no-password", "no-user", "url-not-host-port", "no-domain", "domain-with-dot"],
)
def test_a_bad_uplink_is_refused(
    tmp_path: Path, remote: LeafRemote, domain: str | None, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        device(tmp_path, remote, domain).render()
    assert err.value.reason == reason


def test_a_server_is_a_hub_or_a_device_not_both(tmp_path: Path) -> None:
    both = NatsServerConfig(
        store_dir=tmp_path,
        domain="x",
        authorization="authorization: {}",
        leaf_listen=HubLeafListen(7422),
        leaf_remote=LeafRemote("hub:7422", "u", "p"),
    )
    with pytest.raises(InvalidArgument) as err:
        both.render()
    assert err.value.reason == "fleet.hub_and_device"


@pytest.mark.parametrize("bad", ["", "A", "a.b", "a*", "a>", "-a", "a" * 33, "a b", "ä"])
def test_a_bad_device_id_is_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_device(bad)
    assert err.value.reason == "fleet.device_invalid"
    with pytest.raises(InvalidArgument):
        fleet_stream(bad)


def test_names_and_the_hub_stream() -> None:
    assert device_domain("a1") == "dev-a1"
    config = fleet_stream_config("a1", ["crypto-tpm0", "broker", "broker"])
    assert config.name == "KMS_FLEET_A1"
    assert not config.subjects  # nothing publishes into the hub's copy
    sources = config.sources or []
    assert [s.name for s in sources] == ["KMS_AUDIT_BROKER", "KMS_AUDIT_CRYPTO-TPM0"]
    assert all(s.external and s.external.api == "$JS.dev-a1.API" for s in sources)
    assert config.deny_delete and config.deny_purge
    with pytest.raises(InvalidArgument) as err:
        fleet_stream_config("a1", [])
    assert err.value.reason == "fleet.writers_missing"


def test_the_brokers_grant_reads_the_named_devices_copies_only() -> None:
    from mgmt.natsauth import broker_identity, stack_identities

    plain = broker_identity(["hsm0"]).permissions.publish
    assert not [s for s in plain if "KMS_FLEET_" in s]
    granted = broker_identity(["hsm0"], ["a"]).permissions.publish
    fleet = {s for s in granted if "KMS_FLEET_" in s}
    assert "$JS.API.STREAM.INFO.KMS_FLEET_A" in fleet
    assert all("KMS_FLEET_A" in s for s in fleet)
    assert not [s for s in granted if "STREAM.DELETE" in s or "STREAM.PURGE.KMS_FLEET" in s]
    broker = stack_identities(["hsm0"], fleet_devices=["a", "b"])[0]
    assert "$JS.API.DIRECT.GET.KMS_FLEET_B" in broker.permissions.publish
