"""A fleet hub that is a three-node cluster, run by `kmsctl` alone: three `kmsctl up
--join` nodes on loopback, nas1 also `--leaf-listen`, and one device `kmsctl up --uplink`
whose leaf connection reaches nas1 (docs/cluster.md, "A hub that is a cluster").

The device is added on the running nas1 (`kmsctl fleet add-device`); it signs through
its own broker; the hub's `kmsctl audit verify --device a` (nas1's broker) passes once
the copy holds the device's head (polled); the device gets a certificate from the hub's
CA through its own broker; the copy and the device registry have three copies (R3).
With nas3 (a node that does not listen) stopped, the device signs on, its audit reaches
the hub and verifies whole, and another certificate is issued.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgekms import natsrpc
from edgekms.fleet import fleet_stream
from edgekms.fleet_ca import FLEET_DEVICES_BUCKET
from mgmt.client import KMSClient
from mgmt.natsauth import BROKER_USER, kmsctl_identity, local_credentials
from mgmt.natsserver import free_port
from tests.cluster.test_up_nodes import NODES, Node, _bundles, _config_for, _start, _wait_ready
from tests.conftest import SLOWDOWN
from tests.fleet.test_hub_ca import csr
from tests.fleet.test_up_fleet import Up, device_head, kmsctl, sign, until


@dataclass
class HubCluster:
    root: Path
    leaf: str
    nodes: list[Node]
    device: Up | None = None

    @property
    def admin(self) -> Path:
        """The admin client config the ceremony wrote on nas1: broker nas1 first."""
        return self.nodes[0].data_dir / "client" / "config.toml"

    def state(self, node: Node) -> dict[str, Any]:
        try:
            value = json.loads((node.data_dir / "run" / "state.json").read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


@pytest.fixture
def hub_cluster(tmp_path: Path) -> Iterator[HubCluster]:
    ports = {n: (free_port(), free_port()) for n in NODES}
    bundles = _bundles(tmp_path, ports)
    nodes = [Node(n, tmp_path / n, f"127.0.0.1:{ports[n][1]}", bundles / n) for n in NODES]
    made = HubCluster(tmp_path, f"127.0.0.1:{free_port()}", nodes)
    try:
        _start(nodes[0], "--leaf-listen", made.leaf)
        for node in nodes[1:]:
            _start(node)
        _wait_ready(nodes, 240)
        yield made
    finally:
        if made.device is not None:
            made.device.stop()
        for node in nodes:
            node.stop()


def _verify(config: Path, device: str) -> subprocess.CompletedProcess[str]:
    return kmsctl("audit", "verify", "--config", str(config), "--device", device, "-o", "json")


def _caught_up(config: Path, device: str, head: str) -> Callable[[], bool]:
    def check() -> bool:
        done = _verify(config, device)
        if done.returncode != 0:
            return False
        report = json.loads(done.stdout)
        return bool(report["ok"]) and report["heads"].get(BROKER_USER) == head

    return check


def _replicas(node: Node, nats_url: str, streams: list[str]) -> dict[str, int]:
    """Each stream's copies and how many of them are current, read on the node's bus as
    its broker (whose grant reads the device's copy and the registry)."""

    async def read() -> dict[str, int]:
        creds = local_credentials(node.data_dir, BROKER_USER)
        nc = await natsrpc.connect(nats_url, name="test", **creds.connect_options())
        try:
            js = nc.jetstream(timeout=10 * SLOWDOWN)
            found: dict[str, int] = {}
            for stream in streams:
                info = await js.stream_info(stream)
                assert info.cluster is not None
                current = [r for r in info.cluster.replicas or [] if r.current]
                found[stream] = info.config.num_replicas or 0
                found[f"{stream}.current"] = 1 + len(current)  # the leader and its peers
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def _issue(device: Up, request_id: str) -> x509.Certificate:
    with KMSClient.from_config(device.client_config, timeout=30 * SLOWDOWN) as kms:
        issued = kms.issue_certificate("https-server", csr("a.lan", "a.lan"), request_id=request_id)
        issuer = x509.load_der_x509_certificate(
            kms.get_ca_certificates().intermediate_certificate_der
        )
    assert issued.record.requester == "fleet:a"
    cert = x509.load_der_x509_certificate(issued.certificate_der)
    cert.verify_directly_issued_by(issuer)
    assert "EdgeKMS Hub CA" in issuer.subject.rfc4514_string()
    return cert


@pytest.mark.timeout(600)
def test_a_device_on_a_hub_that_is_a_cluster(hub_cluster: HubCluster) -> None:
    nas1, nas2, nas3 = hub_cluster.nodes
    # Every node is in the domain "hub"; only nas1 listens for leaf connections.
    for node in hub_cluster.nodes:
        conf = (node.data_dir / "nats" / "nats.conf").read_text()
        assert 'domain: "hub"' in conf
        assert ("leafnodes" in conf) == (node is nas1)
        # Every node's CA answers devices: a request crosses the routes to any of them.
        assert "fleet = true" in (node.data_dir / "config" / "ca.toml").read_text()
    assert hub_cluster.state(nas1)["fleet"] == {
        "role": "hub",
        "leaf_listen": hub_cluster.leaf,
        "devices": [],
    }
    done = kmsctl(
        "ca", "init", "--config", str(hub_cluster.admin), "--provider", "hsm-nas1",
        "--name", "EdgeKMS Hub CA",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    # The device is added on the running node that listens; it takes it by itself.
    bundle = hub_cluster.root / "uplink-a.toml"
    added = kmsctl(
        "fleet", "add-device", "a", "--data-dir", str(nas1.data_dir), "--hub", hub_cluster.leaf,
        "--name", "dns:a.lan", "--out", str(bundle), "-o", "json",
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    until(
        "nas1 serves device a",
        lambda: hub_cluster.state(nas1).get("fleet", {}).get("devices") == ["a"],
    )
    device = Up("a", hub_cluster.root / "a", ["--uplink", str(bundle)])
    hub_cluster.device = device
    device.start()
    device.wait_ready()

    sign(device, "dev/a-key", 3)
    until("a's audit at the hub", _caught_up(hub_cluster.admin, "a", device_head(device)))
    first = _issue(device, "a-1")

    # The copy and the registry outlive the node the device reaches: one copy per node.
    nats_url = str(hub_cluster.state(nas1)["nats_url"])
    streams = [fleet_stream("a"), f"KV_{FLEET_DEVICES_BUCKET}"]
    copies: dict[str, int] = {}

    def all_current() -> bool:
        copies.update(_replicas(nas1, nats_url, streams))
        return all(copies[s] == 3 and copies[f"{s}.current"] == 3 for s in streams)

    until("three current copies of the device's copy and the registry", all_current)
    # Every node's broker reads the copy: the nodes that do not listen learn the devices
    # from the replicated registry and grant their brokers (a nats-server reload).
    head = device_head(device)
    only_nas2 = _config_for(hub_cluster.nodes, nas2)
    until("nas2's broker verifies a's copy", _caught_up(only_nas2, "a", head))
    for node in (nas2, nas3):
        assert fleet_stream("a") in (node.data_dir / "nats" / "nats.conf").read_text()

    # A node that does not listen goes away: the device signs on, its audit reaches the
    # hub's (now two-node) copy and verifies whole, and the hub's CA still issues.
    nas3.stop()
    sign(device, "dev/a-key", 3)
    until(
        "a's audit at the hub without nas3", _caught_up(hub_cluster.admin, "a", device_head(device))
    )
    second = _issue(device, "a-2")
    assert second.serial_number != first.serial_number
    assert nas1.process is not None and nas1.process.poll() is None
    assert nas2.process is not None and nas2.process.poll() is None

    # nas3 back, then the node the device reaches goes: the device is cut off and signs
    # on alone, and the hub's copy of everything it sent before stays readable and whole
    # through another node's broker.
    _start(nas3)
    _wait_ready([nas3], 180)
    until("a's copy current on nas3 again", all_current)
    head = device_head(device)
    until("a's audit at the hub with nas3 back", _caught_up(hub_cluster.admin, "a", head))
    nas1.stop()
    sign(device, "dev/a-key", 2)
    # Polled: the streams nas1 led elect new leaders on nas2 and nas3 first.
    until("nas2's broker verifies a's copy without nas1", _caught_up(only_nas2, "a", head))


def test_uplink_with_join_is_refused(tmp_path: Path) -> None:
    """A fleet device on a cluster node is not built: refused as a usage error (exit 2)
    before anything starts or is written."""
    bundles = _bundles(tmp_path, {n: (free_port(), free_port()) for n in NODES})
    uplink = tmp_path / "uplink.toml"
    uplink.write_text("")
    done = kmsctl(
        "up", "--data-dir", str(tmp_path / "d"), "--join", str(bundles / "nas1"),
        "--uplink", str(uplink), "--nats-port", str(free_port()),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--uplink with --join" in done.stderr, done.stderr
    assert not (tmp_path / "d").exists()


def test_a_cluster_supervisor_reads_the_registry_and_writes_nothing_of_it() -> None:
    """The grant behind every node's broker reading the copies: a cluster node's
    supervisor may read the device registry, never write or make it (outside the setup
    grant of a node that listens); one box's gets nothing of it."""
    registry = f"KV_{FLEET_DEVICES_BUCKET}"
    node = kmsctl_identity(["hsm-nas1"], cluster=True).permissions.publish
    assert f"$JS.API.STREAM.INFO.{registry}" in node
    assert f"$JS.API.CONSUMER.CREATE.{registry}.>" in node
    assert not [s for s in node if s.startswith(f"$KV.{FLEET_DEVICES_BUCKET}")]
    assert not [s for s in node if registry in s and ("STREAM.CREATE" in s or "UPDATE" in s)]
    one_box = kmsctl_identity(["hsm0"]).permissions.publish
    assert not [s for s in one_box if FLEET_DEVICES_BUCKET in s]
