"""A fleet run by `kmsctl` alone: a hub `kmsctl up --leaf-listen` and two devices
`kmsctl up --uplink`, each its own stack on loopback (free ports, own data dirs).

Device a is added before the hub starts, device b while it runs (the hub reloads its
nats-server and makes b's copy by itself). Each device signs through its own broker with
its own admin config; the hub's `kmsctl audit verify --device D` passes once its copy
holds the device's head (polled). With the hub stopped device a keeps signing; with the
hub back its copy catches up and verifies whole. Bad bundles are refused before anything
starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgekms import natsrpc
from edgekms.audit import link_of, writer_stream
from edgekms.errors import FailedPrecondition, PermissionDenied
from mgmt.client import KMSClient
from mgmt.natsauth import BROKER_USER, local_credentials
from mgmt.natsserver import free_port
from mgmt.uplink import install_bundle
from tests.conftest import SLOWDOWN
from tests.fleet.test_hub_ca import csr

BIN = Path(sys.executable).parent


@dataclass
class Up:
    """One `kmsctl up` process and its data dir."""

    name: str
    data_dir: Path
    extra: list[str]
    broker: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}-up.log"

    @property
    def client_config(self) -> Path:
        return self.data_dir / "client" / "config.toml"

    def state(self) -> dict[str, Any]:
        try:
            value = json.loads((self.data_dir / "run" / "state.json").read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def start(self) -> None:
        (self.data_dir / "run" / "state.json").unlink(missing_ok=True)
        argv = [
            str(BIN / "kmsctl"), "up", "--data-dir", str(self.data_dir),
            "--nats-port", str(free_port()), "--broker-listen", self.broker,
            "--enroll-listen", f"127.0.0.1:{free_port()}",
            "--ca-http", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
            "--start-timeout", str(60.0 * SLOWDOWN), *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log_file:
            self.process = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "XDG_STATE_HOME": str(self.data_dir.parent / f"{self.name}-st")},
            )

    def wait_ready(self, seconds: float = 180.0) -> None:
        deadline = time.monotonic() + seconds * SLOWDOWN
        while not self.state().get("ready"):
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60 * SLOWDOWN)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def kmsctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
        check=False,
    )


def until(what: str, check: Callable[[], bool], seconds: float = 90.0) -> None:
    """Poll `check` with a generous deadline (a busy two-core machine)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@dataclass
class FleetUp:
    root: Path
    leaf: str
    hub: Up
    devices: dict[str, Up]

    def add_device(self, device: str) -> Path:
        bundle = self.root / f"uplink-{device}.toml"
        done = kmsctl(
            "fleet", "add-device", device, "--data-dir", str(self.hub.data_dir),
            "--hub", self.leaf, "--out", str(bundle), "-o", "json",
            "--name", f"dns:{device}.lan",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        added = json.loads(done.stdout)
        assert added["writers"] == ["broker", "ca", "crypto-hsm0"]
        assert (added["names"], added["profiles"]) == ([f"dns:{device}.lan"], ["https-server"])
        assert "password" not in done.stdout
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
        self.devices[device] = Up(device, self.root / device, ["--uplink", str(bundle)])
        return bundle


@pytest.fixture
def fleet_up(tmp_path: Path) -> Iterator[FleetUp]:
    leaf = f"127.0.0.1:{free_port()}"
    # The hub also runs ACME: its ca.toml then holds `fleet = true` and an [acme] table,
    # and a key written after the table would be read as the table's (the CA refuses it).
    acme = f"127.0.0.1:{free_port()}"
    hub = Up("hub", tmp_path / "hub", ["--leaf-listen", leaf, "--acme", acme])
    made = FleetUp(tmp_path, leaf, hub, {})
    try:
        yield made
    finally:
        for device in made.devices.values():
            device.stop()
        hub.stop()


def hub_verify(fleet: FleetUp, device: str) -> subprocess.CompletedProcess[str]:
    config = str(fleet.hub.client_config)
    return kmsctl("audit", "verify", "--config", config, "--device", device, "-o", "json")


def device_head(up: Up) -> str:
    """The head of the device's broker chain, read on the device's own bus as the broker
    (whose grant reads its stream): the last entry's link, as verify reports heads.
    Not through the device's broker, whose TailAudit would itself add an entry."""

    async def read() -> str:
        creds = local_credentials(up.data_dir, BROKER_USER)
        nc = await natsrpc.connect(up.state()["nats_url"], name="test", **creds.connect_options())
        try:
            js = nc.jetstream(timeout=10)
            stream = writer_stream(BROKER_USER)
            info = await js.stream_info(stream)
            last = await js.get_msg(stream, info.state.last_seq)
            return link_of(last.data or b"").hex()
        finally:
            await nc.close()

    return asyncio.run(read())


def caught_up(fleet: FleetUp, device: str, head: str) -> Callable[[], bool]:
    """The hub's copy of `device` verifies whole and holds the device's broker head."""

    def check() -> bool:
        done = hub_verify(fleet, device)
        if done.returncode != 0:
            return False
        report = json.loads(done.stdout)
        return bool(report["ok"]) and report["heads"].get(BROKER_USER) == head

    return check


def sign(up: Up, key: str, count: int) -> None:
    with KMSClient.from_config(up.client_config, timeout=30 * SLOWDOWN) as kms:
        if not any(k.name == key for k in kms.list_keys()):
            kms.create_key(key, "ec-p256")
        for i in range(count):
            message = f"{up.name} {i}".encode()
            assert kms.verify(key, message, kms.sign(key, message))


@pytest.mark.timeout(900)
def test_a_hub_and_two_devices_from_kmsctl_up(fleet_up: FleetUp) -> None:
    fleet = fleet_up
    fleet.add_device("a")
    fleet.hub.start()
    fleet.hub.wait_ready()
    assert fleet.hub.state()["fleet"] == {
        "role": "hub",
        "leaf_listen": fleet.leaf,
        "devices": ["a"],
    }
    # b joins the running hub: it reloads with b's user and makes b's copy by itself.
    fleet.add_device("b")
    until("the hub takes device b", lambda: fleet.hub.state()["fleet"]["devices"] == ["a", "b"])
    listed = kmsctl("fleet", "list", "--data-dir", str(fleet.hub.data_dir), "-o", "json")
    assert [d["device"] for d in json.loads(listed.stdout)] == ["a", "b"]

    for device in fleet.devices.values():
        device.start()
    for device in fleet.devices.values():
        device.wait_ready()
        assert device.state()["fleet"]["role"] == "device"
        conf = device.data_dir / "nats" / "nats.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert 'domain: "dev-' in conf.read_text()
        # The hub password is in nats-server's 0600 config only, never on a command line.
        installed = device.data_dir / "secrets" / "uplink.toml"
        assert stat.S_IMODE(installed.stat().st_mode) == 0o600
        assert device.process is not None
        cmdline = Path(f"/proc/{device.process.pid}/cmdline").read_bytes()
        assert b"password" not in cmdline

    a, b = fleet.devices["a"], fleet.devices["b"]
    sign(a, "dev/a-key", 3)
    sign(b, "dev/b-key", 2)
    until("a's audit at the hub", caught_up(fleet, "a", device_head(a)))
    until("b's audit at the hub", caught_up(fleet, "b", device_head(b)))
    report = json.loads(hub_verify(fleet, "a").stdout)
    assert report["device"] == "a" and report["entries"] > 3
    assert list(report["heads"]) == [BROKER_USER]

    certificates_from_the_hub(fleet)

    # The hub goes away: device a keeps signing and recording each signature.
    fleet.hub.stop()
    sign(a, "dev/a-key", 5)
    head = device_head(a)
    fleet.hub.start()
    fleet.hub.wait_ready()
    until("a's audit catches up at the hub", caught_up(fleet, "a", head))
    assert caught_up(fleet, "b", device_head(b))()

    # b leaves the fleet while the hub runs: its hub user goes, its copy stays readable.
    removed = kmsctl("fleet", "remove-device", "b", "--data-dir", str(fleet.hub.data_dir))
    assert removed.returncode == 0, removed.stderr
    until("the hub drops device b", lambda: fleet.hub.state()["fleet"]["devices"] == ["a"])
    assert "leaf-b" not in (fleet.hub.data_dir / "nats" / "nats.conf").read_text()
    kept = hub_verify(fleet, "b")
    assert kept.returncode == 0 and json.loads(kept.stdout)["ok"], kept.stdout + kept.stderr

    # A device the hub never recorded: the broker finds it in no registry entry and
    # refuses it at once (its bus grant would not let it read such a copy anyway).
    unknown = hub_verify(fleet, "nobody")
    assert unknown.returncode == 4 and "fleet.device_unknown" in unknown.stderr, unknown.stderr


def certificates_from_the_hub(fleet: FleetUp) -> None:
    """A device's client asks its own broker; the certificate comes from the hub's CA,
    for the names the hub registered for that device only, and `kmsctl fleet allow`
    on the running hub takes a name away within seconds."""
    a = fleet.devices["a"]
    with KMSClient.from_config(fleet.hub.client_config, timeout=60 * SLOWDOWN) as hub:
        hub.ca_init("EdgeKMS Hub CA")
    # Each device runs no CA of its own: the hub's answers across the leaf connection.
    assert "ca" not in a.state()["children"] and a.state()["ca_http"] == ""
    assert not (a.data_dir / "config" / "ca.toml").exists()
    with KMSClient.from_config(a.client_config, timeout=30 * SLOWDOWN) as kms:
        issued = kms.issue_certificate("https-server", csr("a.lan", "a.lan"), request_id="a-1")
        chain = kms.get_ca_certificates()
        issuer = x509.load_der_x509_certificate(chain.intermediate_certificate_der)
        x509.load_der_x509_certificate(issued.certificate_der).verify_directly_issued_by(issuer)
        assert "EdgeKMS Hub CA" in issuer.subject.rfc4514_string()
        assert issued.record.requester == "fleet:a"
        with pytest.raises(PermissionDenied) as other:
            kms.issue_certificate("https-server", csr("b.lan", "b.lan"), request_id="a-2")
        assert other.value.reason == "device.name_not_allowed"
        with pytest.raises(PermissionDenied) as profile:
            kms.issue_certificate("vpn-client", csr("a.lan", "a.lan"), request_id="a-3")
        assert profile.value.reason == "device.profile_not_allowed"
    # Recorded at the hub, as the device.
    listed = kmsctl("cert", "list", "--config", str(fleet.hub.client_config), "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert issued.record.serial in listed.stdout

    allowed = kmsctl(
        "fleet", "allow", "a", "--data-dir", str(fleet.hub.data_dir), "--no-names", "-o", "json"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["names"] == []

    def refused() -> bool:
        with KMSClient.from_config(a.client_config, timeout=30 * SLOWDOWN) as kms:
            try:
                kms.issue_certificate("https-server", csr("a.lan", "a.lan"))
            except PermissionDenied as err:
                return err.reason == "device.name_not_allowed"
        return False

    until("the hub's registry takes a.lan away", refused)


def hub_bundle(tmp_path: Path, device: str = "a") -> tuple[Path, Path, str]:
    """A hub data dir with `device` added: (hub data dir, its bundle, the leaf address)."""
    hub_dir, leaf = tmp_path / "hub", f"127.0.0.1:{free_port()}"
    bundle = tmp_path / f"uplink-{device}.toml"
    made = kmsctl(
        "fleet", "add-device", device, "--data-dir", str(hub_dir), "--hub", leaf,
        "--out", str(bundle),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return hub_dir, bundle, leaf


def up_once(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`kmsctl up` on free ports, for a case refused before anything starts."""
    return kmsctl(
        "up", "--data-dir", str(data_dir), "--nats-port", str(free_port()),
        "--broker-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
        "--enroll-listen", f"127.0.0.1:{free_port()}", "--ca-http", f"127.0.0.1:{free_port()}",
        *args,
    )  # fmt: skip


def test_bad_uplink_bundles_are_refused(tmp_path: Path) -> None:
    _, bundle, leaf = hub_bundle(tmp_path)
    device_dir = tmp_path / "dev"
    good = bundle.read_text()
    password = tomllib.loads(good)["password"]
    variants = {
        "bad-id": good.replace('device = "a"', 'device = "A/>"'),
        "no-port": good.replace(f'hub = "{leaf}"', 'hub = "hub.lan"'),
        "no-password": "\n".join(
            line for line in good.splitlines() if not line.startswith("password")
        ),
        "not-pem": good.split("hub_ca = ")[0] + 'hub_ca = "-----BEGIN CERTIFICATE-----"\n',
        "not-toml": "not = [toml",
    }
    for name, text in variants.items():
        broken = tmp_path / f"{name}.toml"
        broken.write_text(text)
        refused = up_once(device_dir, "--uplink", str(broken))
        assert refused.returncode == 3, (name, refused.stderr)
        assert "fleet.bundle_invalid" in refused.stderr, (name, refused.stderr)
        assert password not in refused.stderr
    # Nothing was started or written for a refused bundle.
    assert not (device_dir / "secrets" / "uplink.toml").exists()
    assert not (device_dir / "nats" / "nats.conf").exists()


def test_up_is_a_hub_or_a_device_not_both(tmp_path: Path) -> None:
    _, bundle, leaf = hub_bundle(tmp_path)
    both = up_once(tmp_path / "dev", "--uplink", str(bundle), "--leaf-listen", leaf)
    assert both.returncode == 2 and "a hub or a device" in both.stderr
    embedded = up_once(tmp_path / "dev", "--uplink", str(bundle), "--embedded")
    assert embedded.returncode == 2 and "runs no CA" in embedded.stderr
    assert not (tmp_path / "dev" / "nats" / "nats.conf").exists()


def test_fleet_commands_refuse_bad_input(tmp_path: Path) -> None:
    hub_dir, bundle, leaf = hub_bundle(tmp_path)
    gone = kmsctl("fleet", "remove-device", "nobody", "--data-dir", str(hub_dir))
    assert gone.returncode == 4 and "fleet.device_unknown" in gone.stderr
    bad_id = kmsctl(
        "fleet", "add-device", "A.>", "--data-dir", str(hub_dir), "--hub", leaf,
        "--out", str(tmp_path / "x.toml"),
    )  # fmt: skip
    assert bad_id.returncode == 3 and "fleet.device_invalid" in bad_id.stderr
    assert not (tmp_path / "x.toml").exists()
    bad_hub = kmsctl(
        "fleet", "add-device", "c", "--data-dir", str(hub_dir), "--hub", "hub.lan",
        "--out", str(tmp_path / "y.toml"),
    )  # fmt: skip
    assert bad_hub.returncode == 3 and "fleet.address_invalid" in bad_hub.stderr
    assert not (hub_dir / "fleet" / "devices" / "c.json").exists()
    before = bundle.read_bytes()
    again = kmsctl(
        "fleet", "add-device", "a", "--data-dir", str(hub_dir), "--hub", leaf,
        "--out", str(bundle),
    )  # fmt: skip
    assert again.returncode == 6 and "fleet.bundle_exists" in again.stderr
    assert bundle.read_bytes() == before
    listed = kmsctl("fleet", "list", "--data-dir", str(hub_dir), "-o", "json")
    assert [d["device"] for d in json.loads(listed.stdout)] == ["a"]


def test_fleet_names_refuse_bad_input(tmp_path: Path) -> None:
    """Names a device may have certified: dns:/ip: only, checked before anything is written."""
    hub_dir, _, leaf = hub_bundle(tmp_path)
    record = hub_dir / "fleet" / "devices" / "a.json"
    kept = record.read_bytes()
    for bad in ("a.lan", "uri:spiffe://x/y", "dns:" + "x" * 300):
        refused = kmsctl("fleet", "allow", "a", "--data-dir", str(hub_dir), "--name", bad)
        assert refused.returncode == 3 and "fleet.names_invalid" in refused.stderr, bad
    nobody = kmsctl("fleet", "allow", "zz", "--data-dir", str(hub_dir), "--name", "dns:z.lan")
    assert nobody.returncode == 4 and "fleet.device_unknown" in nobody.stderr
    nothing = kmsctl("fleet", "allow", "a", "--data-dir", str(hub_dir))
    assert nothing.returncode == 2
    assert record.read_bytes() == kept
    unnamed = kmsctl(
        "fleet", "add-device", "d", "--data-dir", str(hub_dir), "--hub", leaf,
        "--name", "d.lan", "--out", str(tmp_path / "d.toml"),
    )  # fmt: skip
    assert unnamed.returncode == 3 and "fleet.names_invalid" in unnamed.stderr
    assert not (hub_dir / "fleet" / "devices" / "d.json").exists()
    assert not (tmp_path / "d.toml").exists()
    # Names are kept lower-case and once; profiles default to https-server with names.
    named = kmsctl(
        "fleet", "allow", "a", "--data-dir", str(hub_dir), "-o", "json",
        "--name", "dns:A.lan", "--name", "dns:a.lan", "--name", "ip:192.0.2.7",
    )  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["names"] == ["dns:a.lan", "ip:192.0.2.7"]
    assert json.loads(named.stdout)["profiles"] == ["https-server"]


def test_a_device_data_dir_takes_no_other_devices_bundle(tmp_path: Path) -> None:
    hub_dir, device_dir = tmp_path / "hub", tmp_path / "dev"
    leaf = f"127.0.0.1:{free_port()}"
    for device in ("a", "b"):
        made = kmsctl(
            "fleet", "add-device", device, "--data-dir", str(hub_dir), "--hub", leaf,
            "--out", str(tmp_path / f"{device}.toml"),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
    assert install_bundle(tmp_path / "a.toml", device_dir).device == "a"
    installed = (device_dir / "secrets" / "uplink.toml").read_bytes()
    with pytest.raises(FailedPrecondition) as err:
        install_bundle(tmp_path / "b.toml", device_dir)
    assert err.value.reason == "fleet.other_device"
    assert (device_dir / "secrets" / "uplink.toml").read_bytes() == installed
    # The same device's bundle again (a restart) is taken.
    assert install_bundle(tmp_path / "a.toml", device_dir).device == "a"
