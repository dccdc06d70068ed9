"""Fixtures of the TPM-attested enrollment tests: TPM "manufacturers" (a local CA each,
made by swtpm_localca as swtpm_setup runs it), swtpms whose EK certificate one of them
signed (`swtpm_setup --create-ek-cert`), the same behind tpm2-abrmd (as a device's TPM
is behind /dev/tpmrm0: what mutual TLS through the TPM needs), and one real `kmsctl up`
stack trusting the first manufacturer (`--ek-ca`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mgmt.swtpm import Swtpm
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.tpm.swtpm_fixtures import ResourceManagedTpm

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Manufacturer:
    """A local TPM manufacturer: swtpm_localca's CA in `dir`, and swtpm_setup's config."""

    dir: Path

    @property
    def setup_conf(self) -> Path:
        return self.dir / "swtpm_setup.conf"

    @property
    def bundle(self) -> Path:
        """The manufacturer's CA certificates (root and issuing CA), PEM."""
        return self.dir / "bundle.pem"

    def provision(self, state: Path, ek_cert: bool = True) -> None:
        """swtpm_setup: EKs made, and (ek_cert) their certificates signed by this CA."""
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = ["--create-ek-cert"] if ek_cert else ["--createek"]
        done = subprocess.run(
            [
                "swtpm_setup", "--tpm2", "--tpm-state", str(state), *flags,
                "--config", str(self.setup_conf), "--logfile", str(state / "setup.log"),
            ],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, (state / "setup.log").read_text()[-2000:]


def make_manufacturer(base: Path) -> Manufacturer:
    ca = base / "ca"
    ca.mkdir(parents=True)
    (base / "localca.conf").write_text(
        f"statedir = {ca}\n"
        f"signingkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (base / "localca.options").write_text("--platform-manufacturer EdgeKMS-tests\n")
    maker = Manufacturer(base)
    maker.setup_conf.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {base}/localca.conf\n"
        f"create_certs_tool_options = {base}/localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    # The CA is made on first use: one throwaway TPM brings it into being.
    maker.provision(base / "first-tpm")
    maker.bundle.write_bytes(
        (ca / "swtpm-localca-rootca-cert.pem").read_bytes() + (ca / "issuercert.pem").read_bytes()
    )
    return maker


def _require_tools() -> None:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages swtpm, swtpm-tools)")


@pytest.fixture(scope="package")
def trusted_maker(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    _require_tools()
    return make_manufacturer(tmp_path_factory.mktemp("maker-trusted"))


@pytest.fixture(scope="package")
def other_maker(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    _require_tools()
    return make_manufacturer(tmp_path_factory.mktemp("maker-other"))


@pytest.fixture(scope="package")
def stack(
    tmp_path_factory: pytest.TempPathFactory, trusted_maker: Manufacturer
) -> Iterator[KmsStack]:
    started = start_stack(
        tmp_path_factory.mktemp("attest") / "data", "--ek-ca", str(trusted_maker.bundle)
    )
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


DeviceFactory = Callable[..., Swtpm]


@pytest.fixture
def device_tpm(tmp_path: Path, trusted_maker: Manufacturer) -> Iterator[DeviceFactory]:
    """make(maker=trusted, ek_cert=True): a started swtpm of its own, provisioned by
    that manufacturer (with no EK certificate when ek_cert is False)."""
    started: list[Swtpm] = []

    def make(maker: Manufacturer | None = None, ek_cert: bool = True) -> Swtpm:
        state = tmp_path / f"tpm{len(started)}"
        (maker or trusted_maker).provision(state, ek_cert=ek_cert)
        tpm = Swtpm.private(state).start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


ManagedDeviceFactory = Callable[[], ResourceManagedTpm]


@pytest.fixture
def managed_device_tpm(
    tmp_path: Path, trusted_maker: Manufacturer, session_bus: str
) -> Iterator[ManagedDeviceFactory]:
    """make(): a swtpm with a trusted EK certificate, behind its own tpm2-abrmd; clients
    use its `tcti` (tabrmd:...)."""
    if shutil.which("tpm2-abrmd") is None:
        pytest.skip("tpm2-abrmd is not installed (Debian package tpm2-abrmd)")
    started: list[ResourceManagedTpm] = []

    def make() -> ResourceManagedTpm:
        state = tmp_path / f"rm-tpm{len(started)}"
        trusted_maker.provision(state)
        tpm = Swtpm.private(state).start()
        name = f"a{os.getpid()}x{len(started)}x{tmp_path.name[-8:]}".replace("-", "_")
        try:
            managed = ResourceManagedTpm(tpm, session_bus, name)
        except BaseException:
            tpm.stop()
            raise
        started.append(managed)
        return managed

    yield make
    for managed in started:
        managed.stop()
