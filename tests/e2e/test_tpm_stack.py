"""`kmsctl up --tpm swtpm`: a TPM crypto service beside hsm0, reached through the broker."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgekms import errors
from edgekms.client_certs import self_signed_ca
from edgekms.v1 import common_pb2 as pb
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.tpm

KMSCTL = str(Path(sys.executable).parent / "kmsctl")


@pytest.fixture(scope="module")
def tpm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    data_dir = tmp_path_factory.mktemp("tpmstack") / "data"
    stack = start_stack(data_dir, "--tpm", "swtpm")
    yield stack
    assert stop_stack(stack) == 0


def test_status_includes_tpm0(tpm_stack: KmsStack) -> None:
    with tpm_stack.client() as client:
        status = client.status()
    assert {c.name: c.ok for c in status.components}["crypto/tpm0"] is True
    assert status.ok


@pytest.mark.parametrize(
    ("key_type", "digest"),
    [("ec-p256", "-sha256"), ("ec-p384", "-sha384"), ("rsa-2048", "-sha256")],
)
def test_tpm_key_signs_through_the_broker(
    tpm_stack: KmsStack, key_type: str, digest: str, tmp_path: Path
) -> None:
    """Each key signs with its type's default scheme; openssl checks with that hash."""
    name = f"tpm/{key_type}"
    message = b"signed inside the TPM"
    with tpm_stack.client(timeout=60) as client:
        key = client.create_key(name, key_type, provider="tpm0")
        assert key.provider == "tpm0"
        signature = client.sign(name, message)
        assert client.verify(name, message, signature)
        pem = client.get_public_key(name).pem
    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(signature)
    result = subprocess.run(
        ["openssl", "dgst", digest, "-verify", "pub.pem", "-signature", "sig", "msg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "Verified OK" in result.stdout, result.stderr


def test_certificate_through_remote_key_on_a_tpm_key(tpm_stack: KmsStack) -> None:
    with tpm_stack.client(timeout=60) as client:
        client.create_key("tpm/ca", "ec-p256", provider="tpm0")
        key = client.remote_key("tpm/ca")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TPM-backed CA")])
        cert = self_signed_ca(key, name, datetime.timedelta(days=30))
        cert.verify_directly_issued_by(cert)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert spki == client.get_public_key("tpm/ca").der


def test_key_type_the_tpm_lacks_is_failed_precondition(tpm_stack: KmsStack) -> None:
    with tpm_stack.client() as client:
        with pytest.raises(errors.FailedPrecondition) as info:
            client.create_key("tpm/ed", "ed25519", provider="tpm0")
        assert info.value.reason == "provider.key_type_unsupported"
        with pytest.raises(errors.NotFound):
            client.get_key("tpm/ed")  # the reservation was released


def test_tpm_digest_of_wrong_length_is_invalid_argument(tpm_stack: KmsStack) -> None:
    with tpm_stack.client() as client:
        client.create_key("tpm/len", "ec-p256", provider="tpm0")
        with pytest.raises(errors.InvalidArgument):
            client.sign_digest(
                "tpm/len", pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, hashlib.sha384(b"x").digest()
            )


def test_swtpm_is_private_and_provisioned(tpm_stack: KmsStack) -> None:
    """`kmsctl up --tpm swtpm` runs swtpm on 0600 Unix sockets, provisions it, and gives
    tpm0 the owner and endorsement auth (tpm0 signing above proves the TPM took them)."""
    import os
    import stat

    sock = tpm_stack.data_dir / "swtpm" / "swtpm.sock"
    for path in (sock, Path(f"{sock}.ctrl")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secrets = tpm_stack.data_dir / "secrets"
    for name in ("owner", "endorsement", "lockout"):
        assert stat.S_IMODE((secrets / f"tpm-{name}.auth").stat().st_mode) == 0o600
    config = (tpm_stack.data_dir / "config" / "crypto-tpm0.toml").read_text()
    assert f'tcti = "swtpm:path={sock}"' in config
    assert f'owner_auth_file = "{secrets / "tpm-owner.auth"}"' in config
    assert "tpm-lockout.auth" not in config  # the lockout auth stays with the operator


def test_save_ak_to_a_null_device_leaves_the_device(tpm_stack: KmsStack, tmp_path: Path) -> None:
    """The one --out-like option only a TPM stack exercises (the rest:
    tests/e2e/test_hardening.py::test_a_null_device_survives_every_command_that_writes_a_file)."""
    import os
    import stat

    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    with tpm_stack.client(timeout=60) as client:
        client.create_key("tpm/attested", "ec-p256", provider="tpm0")
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    done = subprocess.run(
        [KMSCTL, "key", "attest", "tpm/attested", "--save-ak", str(dev)],
        env=tpm_stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    st = os.lstat(dev)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_a_killed_swtpm_is_restarted_by_the_watcher_and_locked_again(
    tpm_stack: KmsStack,
) -> None:
    """Last in this module (it restarts the TPM under tpm0). Once the stack is up, the
    lean watcher (mgmt.upwatch) restarts swtpm on its 0600 sockets and has its platform
    hierarchy locked again, as firmware would, before it records the new pid."""
    import json
    import os
    import signal
    import stat
    import time

    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR

    from tests.conftest import SLOWDOWN

    state_file = tpm_stack.data_dir / "run" / "state.json"
    before = json.loads(state_file.read_text())["swtpm_pid"]
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 60 * SLOWDOWN
    after = before
    while after == before and time.monotonic() < deadline:
        time.sleep(0.1)
        after = json.loads(state_file.read_text())["swtpm_pid"]
    assert after != before, tpm_stack.log_path.read_text()[-2000:]
    assert "swtpm exited; restarting" in tpm_stack.log_path.read_text()
    sock = tpm_stack.data_dir / "swtpm" / "swtpm.sock"
    for path in (sock, Path(f"{sock}.ctrl")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Disabling the platform hierarchy again must fail: it is off already.
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with ESAPI(f"swtpm:path={sock}") as esys:
                esys.hierarchy_control(ESYS_TR.PLATFORM, ESYS_TR.PLATFORM, False)
        except Exception as exc:  # TSS2_Exception: refused, or the slot busy (retried)
            last = exc
            if "hierarchy" in str(exc):
                break
            time.sleep(0.2)
            continue
        raise AssertionError("the restarted swtpm's platform hierarchy was enabled")
    assert last is not None and "hierarchy" in str(last), last
