"""`kmsctl up` itself: state survives a restart, the ceremony runs once, a wrong PIN
stops the stack with a clear message instead of a crash loop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mgmt.client import KMSClient
from mgmt.natsserver import free_port, free_port_pair
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack


def _files(directory: Path) -> dict[str, bytes]:
    """Certificates and keys under `directory` (config.toml is left out: each start
    points it at that start's broker address)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and p.name != "config.toml"
    }


def _keys(client: KMSClient) -> list[tuple[str, str, int, bytes]]:
    return [
        (k.name, k.provider, k.state, client.get_public_key(k.name).der) for k in client.list_keys()
    ]


def test_restart_keeps_keys_and_certificates_and_wrong_pin_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = start_stack(data_dir)
    try:
        with stack.client() as client:
            client.create_key("persist/p256", "ec-p256")
            first_sig = client.sign("persist/p256", b"first life")
        ca_before = (data_dir / "pki" / "internal-ca.crt").read_bytes()
        status = subprocess.run(
            [str(BIN / "kmsctl"), "status", "-o", "json"], env=stack.env(), capture_output=True
        )
        assert status.returncode == 0, status.stderr
    finally:
        assert stop_stack(stack) == 0

    stack = start_stack(data_dir)
    try:
        assert (data_dir / "pki" / "internal-ca.crt").read_bytes() == ca_before
        with stack.client() as client:
            assert client.verify("persist/p256", b"first life", first_sig)
            client.sign("persist/p256", b"second life")
            keys_before = _keys(client)
    finally:
        assert stop_stack(stack) == 0
    certificates_before = {"pki": _files(data_dir / "pki"), "client": _files(data_dir / "client")}
    assert "persist/p256" in [name for name, *_ in keys_before]

    pin_file = data_dir / "secrets" / "hsm0.pin"
    right_pin = pin_file.read_bytes()
    pin_file.write_text("not-the-pin\n")
    result = subprocess.run(
        [
            str(BIN / "kmsctl"),
            "up",
            "--data-dir",
            str(data_dir),
            "--nats-port",
            str(free_port()),
            "--broker-listen",
            f"127.0.0.1:{free_port_pair()}",
            "--ca-http",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 8
    assert "crypto-hsm0 failed to start (token refused" in result.stderr
    assert "not-the-pin" not in result.stdout + result.stderr

    # The refusal destroyed nothing: with the right PIN back, the same certificates on
    # disk, the same keys in the registry, and the old key still signs as before.
    pin_file.write_bytes(right_pin)
    assert {
        "pki": _files(data_dir / "pki"),
        "client": _files(data_dir / "client"),
    } == certificates_before
    stack = start_stack(data_dir)
    try:
        assert {
            "pki": _files(data_dir / "pki"),
            "client": _files(data_dir / "client"),
        } == certificates_before
        with stack.client() as client:
            assert client.whoami().role == "admin"
            assert _keys(client) == keys_before
            assert client.verify("persist/p256", b"first life", first_sig)
            third = client.sign("persist/p256", b"third life")
            assert client.verify("persist/p256", b"third life", third)
    finally:
        assert stop_stack(stack) == 0


def test_init_uses_bus_credentials_and_is_refused_without(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    """`kmsctl init` against the stack's running TLS bus: without credentials the bus
    refuses it; with the supervisor's kmsctl identity it is refused too, since that
    identity lost the internal CA's key with the ceremony (issue 11, item 1: it could
    otherwise mint admin certificates at will). Neither writes a client config."""
    secrets = kms_stack.data_dir / "secrets" / "nats"
    common = [str(BIN / "kmsctl"), "init", "--nats-url", kms_stack.nats_url, "-o", "json"]
    refused = subprocess.run(
        [*common, "--data-dir", str(tmp_path / "anon")], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert not (tmp_path / "anon" / "client" / "config.toml").exists()
    # The supervisor holds the ceremony's record-sealing key too (mgmt.sealkeys).
    shutil.copytree(
        kms_stack.data_dir / "secrets" / "seal", tmp_path / "second" / "secrets" / "seal"
    )
    minted = subprocess.run(
        [
            *common,
            "--data-dir",
            str(tmp_path / "second"),
            "--nats-user",
            "kmsctl",
            "--nats-password-file",
            str(secrets / "kmsctl.password"),
            "--nats-ca",
            str(kms_stack.data_dir / "nats" / "tls" / "bus-ca.crt"),
            "--broker-address",
            kms_stack.broker,
            # Past the refusal to issue an admin for an existing CA (tests/e2e/test_data_dir.py).
            "--new-admin",
        ],
        capture_output=True,
        text=True,
    )
    assert minted.returncode != 0, minted.stdout
    assert 'permissions violation for publish to "kms.crypto.hsm0.internal.sign"' in (
        minted.stderr.lower()
    )
    assert not (tmp_path / "second" / "client" / "config.toml").exists()
