"""Route TLS from `kmsctl cluster init` bundles (mgmt.routeca, mgmt.clusterinit): each
bundle holds its node's route certificate and key and the route CA's certificate, the
route CA's key stays in OUT/_admin, `kmsctl up --join`'s config (Stack._cluster_fields)
turns them into TLS routes, a node holding another cluster's route certificate is
refused even with the right password, and `cluster add-node --route-ca` issues a
certificate the running nodes accept. Real nats-servers on loopback; the full
three-stack run is tests/cluster/test_up_nodes.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.client import Client

from edgekms.errors import InvalidArgument
from mgmt.clusterinit import JoinBundle, install_bundle
from mgmt.natsserver import NatsServer, NatsServerConfig, free_port
from mgmt.stack import Stack
from mgmt.stacklock import leftover_pids, reap_orphans
from tests.cluster.test_route_tls import _crossing, _plain_first_line, _route_info
from tests.conftest import SLOWDOWN
from tests.logevents import count_event

BIN = Path(sys.executable).parent


def _kmsctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
        env=dict(os.environ),
        check=False,
    )


def _init(out: Path, nodes: dict[str, str]) -> dict[str, object]:
    args = [f"--node={name}={where}" for name, where in nodes.items()]
    done = _kmsctl("cluster", "init", "--name", "office", *args, "--out", str(out), "-o", "json")
    assert done.returncode == 0, done.stderr
    made: dict[str, object] = json.loads(done.stdout)
    return made


def test_init_gives_each_node_a_route_certificate_and_keeps_the_ca_key_apart(
    tmp_path: Path,
) -> None:
    out = tmp_path / "b"
    made = _init(out, {"nas1": "10.0.0.1:7001:7101", "nas2": "nas2.lan:7002:7102"})
    admin = out / "_admin"
    assert made["route_ca"] == str(admin)
    assert stat.S_IMODE(admin.stat().st_mode) == 0o700
    assert {p.name for p in admin.iterdir()} == {"route-ca.key", "route-ca.crt"}
    ca_key = (admin / "route-ca.key").read_bytes()
    ca = x509.load_pem_x509_certificate((admin / "route-ca.crt").read_bytes())
    for node, san in (("nas1", x509.IPAddress), ("nas2", x509.DNSName)):
        bundle = out / node
        for path in bundle.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600)
            # The route CA's key is in no node's bundle.
            assert path.is_dir() or ca_key not in path.read_bytes(), path
        assert (bundle / "routes-ca.crt").read_bytes() == (admin / "route-ca.crt").read_bytes()
        cert = x509.load_pem_x509_certificate((bundle / "route.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(v) for v in names.get_values_for_type(san)] == [
            "10.0.0.1" if node == "nas1" else "nas2.lan"
        ]
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca_key.decode() not in made.__repr__()


def _node_server(bundle: JoinBundle, directory: Path) -> NatsServer:
    """The node's nats-server as `kmsctl up --join` configures its cluster part."""
    config = NatsServerConfig(
        store_dir=directory / "jetstream",
        port=free_port(),
        **Stack._cluster_fields(bundle),
    )
    return NatsServer(config, directory / "nats.conf", directory / "nats.log")


async def _until_crossing(a: Client, b: Client, subject: str, deadline: float) -> None:
    while not await _crossing(a, b, subject):
        assert time.monotonic() < deadline, f"nothing crossed on {subject}"


@pytest.mark.timeout(300)
async def test_bundle_routes_are_tls_refuse_another_cluster_and_take_an_added_node(
    tmp_path: Path,
) -> None:
    routes = {n: free_port() for n in ("nas1", "nas2", "nas3", "nas4")}
    three = {n: f"127.0.0.1:{routes[n]}:{free_port()}" for n in ("nas1", "nas2", "nas3")}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _init(ours, three)
    _init(theirs, three)
    # nas3 comes from another cluster of the same name, nodes and route password: only
    # its route certificate (and the CA it trusts) differ.
    (theirs / "nas3" / "route.password").write_bytes(
        (ours / "nas3" / "route.password").read_bytes()
    )
    grown = tmp_path / "grown"
    added = _kmsctl(
        "cluster", "add-node", "--from", str(ours / "nas1"), "--route-ca", str(ours / "_admin"),
        "--node", f"nas4=127.0.0.1:{routes['nas4']}:{free_port()}", "--out", str(grown),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    sources = {
        "nas1": ours / "nas1",
        "nas2": ours / "nas2",
        "nas3": theirs / "nas3",
        "nas4": grown / "nas4",
    }
    servers: dict[str, NatsServer] = {}
    clients: dict[str, Client] = {}
    try:
        for name, source in sources.items():
            data = tmp_path / f"data-{name}"
            bundle = install_bundle(source, data / "secrets")
            assert bundle.route_tls is not None
            server = _node_server(bundle, data)
            servers[name] = server.start(timeout=15.0 * SLOWDOWN)
            conf = server.conf_path.read_text()
            installed = data / "secrets" / "cluster"
            assert f'ca_file: "{installed / "routes-ca.crt"}"' in conf
            assert f'cert_file: "{installed / "route.crt"}"' in conf and "verify: true" in conf
            assert "password:" in conf
            clients[name] = await nats.connect(server.url, connect_timeout=5)
        deadline = time.monotonic() + 90 * SLOWDOWN
        await _until_crossing(clients["nas1"], clients["nas2"], "rt.12", deadline)
        # The node added by add-node routes to the running ones with its new certificate.
        await _until_crossing(clients["nas4"], clients["nas1"], "rt.41", deadline)
        await _until_crossing(clients["nas2"], clients["nas4"], "rt.24", deadline)
        # The route port speaks TLS only; a route certificate of the cluster gets INFO.
        assert not _plain_first_line(routes["nas1"]).startswith(b"INFO")
        probe = ours / "nas2"
        info = _route_info(
            routes["nas1"], probe / "route.crt", probe / "route.key", probe / "routes-ca.crt"
        )
        assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True
        # nas3, with the other cluster's certificate, is refused in the handshake.
        for name in ("nas1", "nas2"):
            log_path = servers[name].log_path
            while "certificate signed by unknown authority" not in log_path.read_text(
                errors="replace"
            ):
                assert time.monotonic() < deadline, f"no TLS refusal of nas3 in {log_path}"
                await asyncio.sleep(0.2)
        assert not await _crossing(clients["nas1"], clients["nas3"], "rt.refused")
        assert not await _crossing(clients["nas3"], clients["nas2"], "rt.refused")
    finally:
        for client in clients.values():
            await client.close()
        for server in servers.values():
            server.stop()


def test_add_node_needs_the_clusters_own_route_ca(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    nodes = {"nas1": "127.0.0.1:7001:7101", "nas2": "127.0.0.1:7002:7102"}
    _init(ours, nodes)
    _init(theirs, nodes)
    new = ("--node", "nas3=127.0.0.1:7003:7103")
    missing = _kmsctl("cluster", "add-node", "--from", str(ours / "nas1"), *new, "--out",
                      str(tmp_path / "g1"))  # fmt: skip
    assert missing.returncode == 6 and "cluster.route_ca_required" in missing.stderr
    other = _kmsctl(
        "cluster", "add-node", "--from", str(ours / "nas1"), "--route-ca",
        str(theirs / "_admin"), *new, "--out", str(tmp_path / "g2"),
    )  # fmt: skip
    assert other.returncode == 6 and "cluster.route_ca_mismatch" in other.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "route-ca.key").write_bytes((ours / "nas1" / "route.key").read_bytes())
    (tmp_path / "broken" / "route-ca.crt").write_bytes(
        (ours / "_admin" / "route-ca.crt").read_bytes()
    )
    broken = _kmsctl(
        "cluster", "add-node", "--from", str(ours / "nas1"), "--route-ca",
        str(tmp_path / "broken"), *new, "--out", str(tmp_path / "g3"),
    )  # fmt: skip
    assert broken.returncode == 3 and "cluster.route_ca_invalid" in broken.stderr
    for refused in ("g1", "g2", "g3"):
        assert not (tmp_path / refused).exists()
    # Without --node: the same nodes, new route certificates from the same CA.
    again = _kmsctl(
        "cluster", "add-node", "--from", str(ours / "nas2"), "--route-ca", str(ours / "_admin"),
        "--out", str(tmp_path / "g4"),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    renewed = tmp_path / "g4" / "nas1"
    assert (renewed / "route.crt").read_bytes() != (ours / "nas1" / "route.crt").read_bytes()
    assert (renewed / "routes-ca.crt").read_bytes() == (
        ours / "nas1" / "routes-ca.crt"
    ).read_bytes()
    assert not (tmp_path / "g4" / "_admin").exists()


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        ("drop-key", "all three"),
        ("other-node", "not the key of route.crt"),
        ("other-cluster-cert", "not issued by routes-ca.crt"),
        ("other-node-cert", "does not name this node's host"),
    ],
)
def test_install_refuses_route_files_that_do_not_hang_together(
    tmp_path: Path, spoil: str, why: str
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    nodes = {"nas1": "10.0.0.1", "nas2": "10.0.0.2"}
    _init(ours, nodes)
    _init(theirs, nodes)
    bundle = ours / "nas1"
    if spoil == "drop-key":
        (bundle / "route.key").unlink()
    elif spoil == "other-node":
        (bundle / "route.key").write_bytes((ours / "nas2" / "route.key").read_bytes())
    elif spoil == "other-cluster-cert":
        for name in ("route.crt", "route.key"):
            (bundle / name).write_bytes((theirs / "nas1" / name).read_bytes())
    else:
        for name in ("route.crt", "route.key"):
            (bundle / name).write_bytes((ours / "nas2" / name).read_bytes())
    secrets_dir = tmp_path / "data" / "secrets"
    with pytest.raises(InvalidArgument) as refused:
        install_bundle(bundle, secrets_dir)
    assert refused.value.reason == "cluster.bundle_invalid" and why in refused.value.message
    assert not (secrets_dir / "cluster").exists() and not (secrets_dir / "seal").exists()


def test_a_bundle_from_before_route_tls_runs_plain_routes(tmp_path: Path) -> None:
    out = tmp_path / "b"
    _init(out, {"nas1": "127.0.0.1:7001:7101", "nas2": "127.0.0.1:7002:7102"})
    secrets_dir = tmp_path / "data" / "secrets"
    assert install_bundle(out / "nas1", secrets_dir).route_tls is not None
    for name in ("route.crt", "route.key", "routes-ca.crt"):
        (out / "nas1" / name).unlink()
    old = install_bundle(out / "nas1", secrets_dir)
    # No route file of the earlier bundle stays behind to be used.
    assert old.route_tls is None
    assert not any((secrets_dir / "cluster" / n).exists() for n in ("route.crt", "route.key"))
    rendered = "\n".join(Stack._cluster_fields(old)["cluster"].render())
    assert "tls" not in rendered and "password:" in rendered
    # add-node without --node moves such a bundle's cluster to TLS: a new route CA and
    # a certificate for every node, with the same secrets.
    moved = tmp_path / "tls"
    done = _kmsctl("cluster", "add-node", "--from", str(out / "nas1"), "--out", str(moved))
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((moved / "_admin" / "route-ca.crt").read_bytes())
    for node in ("nas1", "nas2"):
        cert = x509.load_pem_x509_certificate((moved / node / "route.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
    assert (moved / "nas1" / "join.key").read_bytes() == (out / "nas1" / "join.key").read_bytes()
    assert install_bundle(moved / "nas1", secrets_dir).route_tls is not None


@pytest.mark.timeout(300)
def test_up_with_a_bundle_from_before_route_tls_warns_and_runs_plain_routes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "b"
    # Two nodes, one started: it renders its config and then waits for its peer.
    two = {n: f"127.0.0.1:{free_port()}:{free_port()}" for n in ("solo", "peer")}
    _init(out, two)
    for name in ("route.crt", "route.key", "routes-ca.crt"):
        (out / "solo" / name).unlink()
    data, log_path = tmp_path / "data", tmp_path / "up.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "kmsctl"),
                "up",
                "--data-dir",
                str(data),
                "--join",
                str(out / "solo"),
                "--nats-port",
                str(free_port()),
                "--ca-http",
                f"127.0.0.1:{free_port()}",
                "--enroll-listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                "",
                "--log-format",
                "json",
                "--start-timeout",
                str(60.0 * SLOWDOWN),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        )
    try:
        deadline = time.monotonic() + 120 * SLOWDOWN
        conf_path = data / "nats" / "nats.conf"
        # Until its nats-server runs and is recorded (so the teardown can end it).
        while not (conf_path.exists() and leftover_pids(data)):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        event = "cluster routes without TLS: the bundle has no route certificate"
        assert count_event(log_path.read_text(), event, cluster="office", node="solo") == 1
        conf = conf_path.read_text()
        cluster_block = conf[conf.index("cluster: {") :]
        assert "password:" in cluster_block and "tls: {" not in cluster_block
    finally:
        # The supervisor waits for its peer's quorum and acts on a stop only once
        # started: end it, and what it started, as a takeover would (mgmt.stacklock).
        process.kill()
        process.wait()
        reap_orphans(data)
