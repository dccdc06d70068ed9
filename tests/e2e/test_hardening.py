"""Issue 11's hardening against a real `kmsctl up` stack of this module's own (the CA is
initialised here, which the session stack must not see): output files that are devices,
certificates bound to their restrictions, and the low-severity refusals. Every command
runs as a real `kmsctl` process, as an operator's script would."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from edgekms import errors
from edgekms.v1 import clients_pb2
from mgmt.client import KMSClient
from tests.e2e.conftest import KmsStack, Parts, start_stack, stop_stack
from tests.e2e.test_broker import issue_client_cert

pytestmark = pytest.mark.timeout(900)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    started = start_stack(tmp_path_factory.mktemp("hardstack") / "data")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


def kmsctl(
    stack: KmsStack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMSCTL, *args],
        env=env or stack.env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def ok(stack: KmsStack, *args: str) -> str:
    done = kmsctl(stack, *args)
    assert done.returncode == 0, f"kmsctl {' '.join(args)}: {done.stderr}"
    return done.stdout


# --- output files ---------------------------------------------------------------------


def make_null(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def assert_null(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), f"{path} was replaced"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_null_device_survives_every_command_that_writes_a_file(
    stack: KmsStack, tmp_path: Path
) -> None:
    """`--out /dev/null` used to replace the device with a regular file (rename over it)."""
    dev = make_null(tmp_path / "null")
    dev2 = make_null(tmp_path / "null2")
    message = tmp_path / "msg"
    message.write_bytes(b"to be discarded")
    (tmp_path / "pw.txt").write_text("a long enough passphrase\n")

    ok(stack, "key", "create", "dev/sig", "--type", "ec-p256")
    ok(stack, "key", "sign", "dev/sig", "--in", str(message), "--out", str(dev))
    ok(stack, "key", "pubkey", "dev/sig", "--out", str(dev))

    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    make_null(ca_dir / "root.crt")
    ok(stack, "ca", "init", "--name", "Device CA", "--out-dir", str(ca_dir))
    ok(stack, "ca", "certs", "--out-dir", str(ca_dir))
    assert_null(ca_dir / "root.crt")
    assert (ca_dir / "chain.pem").is_file()

    issued = json.loads(
        ok(
            stack, "cert", "issue", "--profile", "https-server", "--generate",
            "--cn", "dev.home.arpa", "--san", "dns:dev.home.arpa",
            "--out", str(dev), "--key-out", str(dev2), "-o", "json",
        )
    )  # fmt: skip
    ok(
        stack, "cert", "issue", "--profile", "vpn-client", "--generate", "--cn", "phone",
        "--format", "pkcs12", "--password-file", str(tmp_path / "pw.txt"), "--out", str(dev),
    )  # fmt: skip
    ok(stack, "cert", "show", issued["serial"], "--out", str(dev))
    ok(stack, "cert", "renew", issued["serial"], "--out", str(dev))
    ok(stack, "ca", "crl", "--out", str(dev))
    ok(stack, "ca", "crl", "--out", str(dev), "--pem")

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    make_null(client_dir / "ca.crt")
    make_null(client_dir / "config.toml")
    ok(stack, "client", "add", "devnull", "--role", "signer", "--out-dir", str(client_dir))
    assert_null(client_dir / "ca.crt")
    assert_null(client_dir / "config.toml")
    assert (client_dir / "devnull.key").is_file()

    assert_null(dev)
    assert_null(dev2)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_out_through_a_symlink_to_a_file_is_refused_and_writes_nothing(
    stack: KmsStack, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "sig"
    link.symlink_to(victim)
    message = tmp_path / "msg"
    message.write_bytes(b"x")
    ok(stack, "key", "create", "dev/link", "--type", "ec-p256")
    done = kmsctl(stack, "key", "sign", "dev/link", "--in", str(message), "--out", str(link))
    assert done.returncode == 3, done.stderr
    assert "kmsctl: output.symlink:" in done.stderr
    assert victim.read_bytes() == b"precious"
    assert link.is_symlink()


# --- certificates, names and restrictions ---------------------------------------------


def admin_client(stack: KmsStack, out: Path, name: str, role: str, *extra: str) -> KMSClient:
    ok(stack, "client", "add", name, "--role", role, "--out-dir", str(out / name), *extra)
    return KMSClient.from_config(out / name / "config.toml", timeout=10)


def test_a_namesake_can_neither_restrict_nor_replace_the_first_admin(
    stack: KmsStack, tmp_path: Path
) -> None:
    """`client add admin --role signer --keys 'zzz/*'` used to narrow the bootstrap admin
    to zzz/* (patterns were looked up by name); now the name is taken."""
    with stack.client() as admin:
        me = admin.whoami()
        listed = {c.name: c for c in admin.list_clients()}
    first = listed["admin"]  # recorded at its first request
    assert (first.role, first.serial, first.created_by) == ("admin", me.serial, "(first use)")
    done = kmsctl(
        stack, "client", "add", "admin", "--role", "signer", "--keys", "zzz/*",
        "--out-dir", str(tmp_path / "impostor"),
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert "kmsctl: client.exists:" in done.stderr
    assert not (tmp_path / "impostor" / "admin.crt").exists()
    with stack.client() as admin:
        admin.create_key("outside/zzz", "ec-p256")  # not limited to zzz/*
        assert "outside/zzz" in {k.name for k in admin.list_keys()}
        assert admin.whoami().role == "admin"


def test_patterns_belong_to_the_certificate_and_a_second_certificate_is_refused(
    stack: KmsStack, tmp_path: Path
) -> None:
    with stack.client() as admin:
        admin.create_key("a/one", "ec-p256")
        admin.create_key("b/one", "ec-p256")
    old = admin_client(stack, tmp_path / "1", "carol", "signer", "--keys", "a/*")
    with old:
        assert old.sign("a/one", b"m")
    ok(stack, "client", "revoke", "carol")
    new = admin_client(stack, tmp_path / "2", "carol", "signer", "--keys", "b/*")
    with new:
        assert new.sign("b/one", b"m")
        with pytest.raises(errors.PermissionDenied) as outside:
            new.sign("a/one", b"m")  # the old certificate's pattern is not the new one's
        assert outside.value.reason == "authz.key_pattern"
    reopened = KMSClient.from_config(tmp_path / "1" / "carol" / "config.toml", timeout=10)
    with reopened, pytest.raises(errors.Unauthenticated) as revoked:
        reopened.sign("a/one", b"m")
    assert revoked.value.reason == "auth.revoked"

    # A certificate from the internal CA that `client add` did not make, naming a live
    # client: refused rather than sharing carol's name, policies and audit trail.
    cert, key = issue_client_cert(stack, "carol", "admin")
    ca = (stack.data_dir / "client" / "ca.crt").read_bytes()
    with KMSClient(
        stack.broker, ca_cert=ca, cert=cert, key=key, server_name="edgekms-broker"
    ) as twin:
        with pytest.raises(errors.Unauthenticated) as conflict:
            twin.list_keys()
        assert conflict.value.reason == "auth.name_conflict"


def test_a_certificate_never_used_is_revocable_by_serial(stack: KmsStack) -> None:
    cert_pem, key = issue_client_cert(stack, "minted", "admin")
    serial = format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")
    revoked = json.loads(ok(stack, "client", "revoke", "--serial", serial.upper(), "-o", "json"))
    assert (revoked["serial"], revoked["status"]) == (serial, "revoked")
    ca = (stack.data_dir / "client" / "ca.crt").read_bytes()
    with KMSClient(
        stack.broker, ca_cert=ca, cert=cert_pem, key=key, server_name="edgekms-broker"
    ) as minted:
        with pytest.raises(errors.Unauthenticated) as refused:
            minted.list_keys()
        assert refused.value.reason == "auth.revoked"
    bad = kmsctl(stack, "client", "revoke", "--serial", "not-hex")
    assert bad.returncode == 3 and "kmsctl: client.serial_invalid:" in bad.stderr


def test_a_throttled_caller_is_audited_with_its_certificates_actor(
    stack: KmsStack, tmp_path: Path
) -> None:
    """A throttled (or revoked) caller used to be audited with an empty actor: the
    refusal came before the certificate was read."""
    eve = admin_client(stack, tmp_path, "eve", "signer")
    with eve:
        for _ in range(10):  # a signer may not create keys: ten refusals...
            with pytest.raises(errors.PermissionDenied):
                eve.create_key("eve/key", "ec-p256")
        with pytest.raises(errors.ResourceExhausted) as throttled:  # ...then throttled
            eve.whoami()
        assert throttled.value.reason == "auth.throttled"
    lines = ok(stack, "audit", "tail", "-o", "json").splitlines()
    entries = [json.loads(line)["entry"] for line in lines]
    mine = [e for e in entries if e and e["outcome"] == "auth.throttled"]
    assert mine
    assert mine[-1]["actor"] == {"client": "eve", "role": "signer"}


def test_z_the_first_admin_is_revocable(stack: KmsStack, tmp_path: Path) -> None:
    """Last in this module: it revokes the stack's own admin certificate."""
    second = admin_client(stack, tmp_path, "admin2", "admin")
    with second:
        revoked = second.revoke_client("admin")
        assert revoked.status == clients_pb2.CLIENT_STATUS_REVOKED
    with stack.client() as first, pytest.raises(errors.Unauthenticated) as refused:
        first.list_keys()
    assert refused.value.reason == "auth.revoked"
    config = str(tmp_path / "admin2" / "config.toml")
    lines = ok(stack, "audit", "tail", "-o", "json", "--config", config).splitlines()
    entries = [json.loads(line)["entry"] for line in lines]
    refused_entries = [
        e for e in entries if e and e["action"] == "ListKeys" and e["outcome"] == "auth.revoked"
    ]
    # The refused caller is audited under the name and role its certificate carries.
    assert refused_entries
    assert refused_entries[-1]["actor"] == {"client": "admin", "role": "admin"}


def test_a_lost_admin_config_gets_a_new_admin_that_can_revoke_the_old(parts: Parts) -> None:
    """Re-running the ceremony for an existing CA (client config lost) makes an admin of
    a new name: the lost certificate keeps its name until that admin revokes it."""
    with parts.client() as old:
        assert old.whoami().client == "admin"
    old_config = parts.client_config.read_text()
    parts.client_config.unlink()
    parts.ceremony()
    with parts.client() as new:
        me = new.whoami()
        assert me.client.startswith("admin-") and me.role == "admin"
        new.revoke_client("admin")
    recovered = parts.root / "old-client"
    recovered.mkdir()
    for name in ("admin.crt", "admin.key", "ca.crt"):
        (recovered / name).write_bytes((parts.client_config.parent / name).read_bytes())
    (recovered / "config.toml").write_text(old_config)
    with (
        KMSClient.from_config(recovered / "config.toml", timeout=10) as lost,
        pytest.raises(errors.Unauthenticated) as refused,
    ):
        lost.whoami()
    assert refused.value.reason == "auth.revoked"
