"""The docs' TPM and token enrollment and remote unlock, run as written (issue 14, item 9)
against a real stack and swtpm: README.md's "Enrollment proven by the device's TPM" (its
three blocks: the stack started by its `kmsctl up --ek-ca` line, enrollment, signing and
renewal through the TPM, an unlock secret), docs/security.md's "Remote unlock" block,
and README.md's "Devices" lines for a TPM (`enroll --tpm`) and a PKCS#11 token
(`enroll --pkcs11`, a SoftHSM token of the device's own).

Substituted only: the device's TPM (`/dev/tpmrm0`) by a swtpm with a trusted EK
certificate behind its own tpm2-abrmd (what TLS through the TPM needs), the KMS's
enrollment address by the stack's, /etc/edgekms and /run paths by the test's, the PIN
file by one holding the device token's PIN, and the elided `--pcr-digest 5f0c...a1` by
the digest the doc's own `kmsctl unlock pcrs` printed. `fingerprint=$(kmsctl enroll
fingerprint)` is the README Devices block's own line."""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mgmt.softhsm import init_token
from tests.attest.conftest import ManagedDeviceFactory, Manufacturer
from tests.conftest import SLOWDOWN, TokenInfo
from tests.doccommands import CANNOT_RUN, ROOT, Block, block, lines, run_lines
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(900)

ATTEST = "### Enrollment proven by the device's TPM"
DEVICES = "## Devices"
UNLOCK = "## Remote unlock"
ELIDED = "5f0c...a1"


@pytest.fixture
def attest_stack(tmp_path: Path, trusted_maker: Manufacturer) -> Iterator[KmsStack]:
    """The README's `kmsctl up --ek-ca tpm-manufacturers.pem`, the test manufacturer's
    bundle as that file, started with the line's options by the e2e starter."""
    (up,) = [line for line in lines(block("README.md", ATTEST, 0).text) if "kmsctl up" in line]
    args = shlex.split(up, comments=True)
    assert args == ["kmsctl", "up", "--ek-ca", "tpm-manufacturers.pem"]
    shutil.copy(trusted_maker.bundle, tmp_path / "tpm-manufacturers.pem")
    stack = start_stack(tmp_path / "data", "--ek-ca", str(tmp_path / "tpm-manufacturers.pem"))
    try:
        yield stack
    finally:
        assert stop_stack(stack) == 0, stack.log_path.read_text()[-2000:]


def script(text: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Lines that share shell variables (`$fingerprint`), as one script under set -e."""
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + text],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300 * SLOWDOWN,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def fingerprint_line() -> str:
    (line,) = [
        x for x in lines(block("README.md", DEVICES, 0).text) if x.startswith("fingerprint=")
    ]
    return line


def device_text(found: Block, tcti: str, enroll: str, work: Path) -> str:
    return (
        found.text.replace("device:/dev/tpmrm0", tcti)
        .replace("/dev/tpmrm0", tcti)
        .replace("127.0.0.1:8444", enroll)
        .replace("kms.home.arpa:8444", enroll)
        .replace("/etc/edgekms", str(work / "etc-edgekms"))
        .replace("/run/", f"{work}/run/")
    )


def test_tpm_enrollment_and_remote_unlock_run_as_written(
    attest_stack: KmsStack, managed_device_tpm: ManagedDeviceFactory, tmp_path: Path
) -> None:
    stack, tpm = attest_stack, managed_device_tpm()
    work = tmp_path / "work"
    (work / "run" / "cryptsetup-keys.d").mkdir(parents=True)
    env = {**stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}
    enroll = str(stack.state()["enroll"])

    # README, the attested enrollment (the `kmsctl up` line is the fixture's).
    first = device_text(block("README.md", ATTEST, 0), tpm.tcti, enroll, work)
    body = "\n".join(x for x in lines(first) if not x.startswith("kmsctl up "))
    done = script(fingerprint_line() + "\n" + body, work, env)
    shown = json.loads(done.stdout[done.stdout.rindex("\n{") + 1 :])
    assert shown["name"] == "router-1" and len(shown["ek_sha256"]) == 64
    config = (work / "router-1" / "config.toml").read_text()
    assert 'key_store = "tpm"' in config
    assert (work / "router-1" / "device.tss2.pem").read_text().startswith("-----BEGIN TSS2")

    # Signing and renewal through the TPM: the key the README's Devices block makes for
    # its device, made here for router-1, and its reading.txt line.
    setup = [
        "kmsctl key create devices/router-1/app --type ec-p256",
        'echo "reading 42" > reading.txt',
    ]
    run_lines(setup, work, env)
    run_lines(lines(block("README.md", ATTEST, 1).text), work, env)
    assert (work / "reading.sig").stat().st_size > 0

    # docs/security.md's whole unlock flow for router-1 (its device dir /etc/edgekms is
    # where README's enrollment wrote, router-1/); the digest is the `pcrs` line's.
    shutil.copytree(work / "router-1", work / "etc-edgekms")
    flow = lines(device_text(block("docs/security.md", UNLOCK, 0), tpm.tcti, enroll, work))
    by_mdns = [x for x in flow if "--mdns" in x]
    # Not run here (the default TPM and the LAN), and listed so.
    assert len(by_mdns) == 1
    assert [c for c in block("docs/security.md", UNLOCK, 0).commands if "--mdns" in c] == [
        c for c in CANNOT_RUN if c.startswith("kmsctl unlock fetch") and "--mdns" in c
    ]
    flow.remove(by_mdns[0])
    ran = run_lines(flow[:2], work, env)
    digest = ran[1].out.strip()
    assert len(digest) == 64, ran[1].out
    rest = run_lines([x.replace(ELIDED, digest) for x in flow[2:]], work, env)
    added, listed, shown_unlock, _fetched, rotated, removed = rest
    assert listed.out.splitlines()[1].split() == ["router-1", "data", "0,2,4,7", "1"]
    assert json.loads(shown_unlock.out)["pcrs"] == [0, 2, 4, 7]
    released = work / "run" / "cryptsetup-keys.d" / "data.key"
    assert released.read_bytes() == (work / "data.key").read_bytes()
    assert released.stat().st_mode & 0o777 == 0o600
    assert (work / "data-2.key").read_bytes() != (work / "data.key").read_bytes()
    assert all(r.code == 0 for r in (added, rotated, removed))

    # README's unlock block: PCRs 0 and 7, the digest from the same `unlock pcrs` line.
    pcrs = run_lines([f"kmsctl unlock pcrs --pcrs 0,7 --tcti {tpm.tcti}"], work, env)
    readme_unlock = device_text(block("README.md", ATTEST, 2), tpm.tcti, enroll, work)
    run_lines([x.replace(ELIDED, pcrs[0].out.strip()) for x in lines(readme_unlock)], work, env)
    assert (work / "run" / "data.key").read_bytes() == (work / "data.key").read_bytes()

    # README's `enroll --tpm`: another device (sensor-8) in the same TPM, its token made
    # as the Devices block makes sensor-7's.
    token = "kmsctl enroll token create sensor-8 --profile device --token-out sensor-8.token"
    run_lines([token], work, env)
    tpm_line = device_text(block("README.md", DEVICES, 1), tpm.tcti, enroll, work)
    (work / "etc-edgekms").rename(work / "etc-edgekms-router-1")
    script(fingerprint_line() + "\n" + tpm_line, work, env)
    assert 'key_store = "tpm"' in (work / "etc-edgekms" / "config.toml").read_text()


def test_pkcs11_enrollment_runs_as_written(
    attest_stack: KmsStack, softhsm_token: TokenInfo, tmp_path: Path
) -> None:
    """README's `enroll --pkcs11 sensor-token ...`: a SoftHSM token labelled
    sensor-token of the device's own (tests/enroll/test_enroll_pkcs11.py says why not
    the session's), in the session's SOFTHSM2_CONF, its PIN in the file the line names."""
    stack = attest_stack
    work = tmp_path / "work"
    work.mkdir()
    pin = secrets.token_hex(8)
    init_token(softhsm_token.conf.parent, "sensor-token", pin=pin, so_pin=secrets.token_hex(8))
    env = {**stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}
    enroll = str(stack.state()["enroll"])
    run_lines(
        ["kmsctl enroll token create sensor-9 --profile device --token-out sensor-9.token"],
        work,
        env,
    )
    text = device_text(block("README.md", DEVICES, 2), "", enroll, work)
    (work / "etc-edgekms").mkdir(mode=0o700)
    (work / "etc-edgekms" / "pin").write_text(pin + "\n")
    (work / "etc-edgekms" / "pin").chmod(0o600)
    script(fingerprint_line() + "\n" + text, work, env)
    config = (work / "etc-edgekms" / "config.toml").read_text()
    assert "pkcs11:" in config and "token=sensor-token" in config
    assert not list((work / "etc-edgekms").glob("*.key"))
