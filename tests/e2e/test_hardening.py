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

from tests.e2e.conftest import KmsStack, start_stack, stop_stack

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
