"""Remote unlock tests get a stack of their own (the broker's per-address challenge
ration is shared by everything on loopback, so the enrollment tests' challenges must not
count against these) that also announces itself by mDNS on loopback, with the TPM
manufacturer fixtures of tests/attest, an AES-256 KMS key `unlock`, and LUKS2 image
files."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.attest.conftest import Manufacturer, device_tpm, other_maker, trusted_maker
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.enroll.conftest import run

__all__ = ["device_tpm", "other_maker", "trusted_maker"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="package")
def stack(
    tmp_path_factory: pytest.TempPathFactory, trusted_maker: Manufacturer
) -> Iterator[KmsStack]:
    """The stack trusting the test manufacturer, announcing itself on loopback by mDNS."""
    started = start_stack(
        tmp_path_factory.mktemp("unlock") / "data",
        "--ek-ca",
        str(trusted_maker.bundle),
        "--mdns",
        "--mdns-interface",
        "127.0.0.1",
    )
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="package")
def unlock_key(stack: KmsStack) -> str:
    made = run(stack, "key", "create", "unlock", "--type", "aes-256")
    assert made.exit_code == 0, made.output
    return "unlock"


LuksFactory = Callable[[Path], Path]


@pytest.fixture
def luks_volume(tmp_path: Path) -> LuksFactory:
    """make(key_file): a LUKS2 volume in an image file whose one key slot is key_file
    (PBKDF2 with few iterations: the tests open it many times)."""
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup is not installed (Debian package cryptsetup-bin)")

    def make(key_file: Path) -> Path:
        image = tmp_path / f"{key_file.stem}.img"
        with open(image, "wb") as out:
            out.truncate(20 * 1024 * 1024)
        subprocess.run(
            [
                "cryptsetup",
                "luksFormat",
                "--type",
                "luks2",
                "--batch-mode",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                str(key_file),
                str(image),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return image

    return make


def opens(image: Path, secret: bytes) -> bool:
    """`cryptsetup open --test-passphrase`: does `secret` open the volume?"""
    done = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(image)],
        input=secret,
        capture_output=True,
        timeout=120,
    )
    return done.returncode == 0
