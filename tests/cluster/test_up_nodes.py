"""Three `kmsctl up --join` processes on loopback are one EdgeKMS: each a real
nats-server node (routes, JetStream cluster, R3), its own SoftHSM token as provider
hsm-<node>, a broker, a CA service; the ceremony ran once, on nas1.

A key made through nas1's broker on hsm-nas1 signs through nas2's broker (over the
routes); the admin config lists all three brokers; a certificate is issued through nas3;
`kmsctl audit verify` passes; with nas1's stack stopped, hsm-nas1's keys answer
UNAVAILABLE naming nas1 and hsm-nas2's keep signing; nas1 restarted with its bundle
runs no second ceremony and signs again. Bad bundles are refused before anything
starts."""

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgekms import natsrpc
from edgekms.errors import InvalidArgument, Unavailable
from mgmt.client import KMSClient
from mgmt.clusterinit import (
    SharedPki,
    install_bundle,
    open_pki,
    parse_node,
    read_secrets,
    read_spec,
    seal_pki,
)
from mgmt.natsauth import local_credentials
from mgmt.natsserver import free_port
from tests.cluster.test_route_tls import _plain_first_line, _route_info
from tests.conftest import SLOWDOWN

BIN = Path(sys.executable).parent
NODES = ("nas1", "nas2", "nas3")


@dataclass
class Node:
    name: str
    data_dir: Path
    broker: str
    bundle: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}-up.log"

    def ready(self) -> bool:
        state = self.data_dir / "run" / "state.json"
        try:
            return bool(json.loads(state.read_text() or "{}").get("ready"))
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60 * SLOWDOWN)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _kmsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
        env=env or dict(os.environ),
        check=False,
    )


def _bundles(root: Path, ports: dict[str, tuple[int, int]]) -> Path:
    out = root / "bundles"
    nodes = [f"--node={n}=127.0.0.1:{r}:{b}" for n, (r, b) in ports.items()]
    done = _kmsctl("cluster", "init", "--name", "office", *nodes, "--out", str(out), "-o", "json")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["replicas"] == 3 and sorted(made["bundles"]) == list(NODES)
    return out


def _start(node: Node, *extra: str) -> None:
    """`kmsctl up --join` for `node` on free ports, `extra` appended (a hub's
    --leaf-listen). A restarted node is ready when its new state file says so."""
    (node.data_dir / "run" / "state.json").unlink(missing_ok=True)
    with open(node.log, "ab") as log_file:
        node.process = subprocess.Popen(
            [
                str(BIN / "kmsctl"),
                "up",
                "--data-dir",
                str(node.data_dir),
                "--join",
                str(node.bundle),
                "--nats-port",
                str(free_port()),
                "--ca-http",
                f"127.0.0.1:{free_port()}",
                # Not the broker's port + 1, which another node may have been given.
                "--enroll-listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                "",
                "--start-timeout",
                str(60.0 * SLOWDOWN),
                *extra,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_STATE_HOME": str(node.data_dir.parent / f"{node.name}-st")},
        )


def _wait_ready(nodes: list[Node], seconds: float) -> None:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while not all(n.ready() for n in nodes):
        for n in nodes:
            assert n.process is not None
            if n.process.poll() is not None:
                raise AssertionError(f"{n.name} exited: {n.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.name}\n{n.log.read_text()[-1500:]}" for n in nodes)
            raise AssertionError(f"cluster not ready in {seconds * SLOWDOWN:g}s\n{tails}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    root = tmp_path_factory.mktemp("up-cluster")
    ports = {n: (free_port(), free_port()) for n in NODES}
    bundles = _bundles(root, ports)
    nodes = [Node(n, root / n, f"127.0.0.1:{ports[n][1]}", bundles / n) for n in NODES]
    try:
        for node in nodes:
            _start(node)
        _wait_ready(nodes, 240)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _config_for(nodes: list[Node], node: Node) -> Path:
    """The admin's config (made on nas1) pointed at one node's broker only."""
    admin = nodes[0].data_dir / "client" / "config.toml"
    values = tomllib.loads(admin.read_text())
    values.pop("brokers", None)
    values["broker"] = node.broker
    path = admin.parent / f"only-{node.name}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def _until(what: str, check: object, seconds: float = 60.0) -> object:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        try:
            return check()  # type: ignore[operator]
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: no success in {seconds * SLOWDOWN:g}s: {exc}"
                ) from None
            time.sleep(0.3)


@pytest.mark.timeout(600)
def test_three_kmsctl_up_nodes_are_one_kms(three_nodes: list[Node]) -> None:
    nas1, nas2, nas3 = three_nodes
    timeout = 30 * SLOWDOWN
    # The ceremony ran once: one internal CA, the same certificate on every node; the
    # admin client config exists only on nas1 and lists every broker.
    ca_pems = {(n.data_dir / "pki" / "internal-ca.crt").read_bytes() for n in three_nodes}
    assert len(ca_pems) == 1
    assert not (nas2.data_dir / "client" / "config.toml").exists()
    admin = tomllib.loads((nas1.data_dir / "client" / "config.toml").read_text())
    assert admin["broker"] == nas1.broker and admin["brokers"] == [nas2.broker, nas3.broker]
    # Secrets from the bundle and the route password are 0600, never in a config but
    # nats-server's own (0600) one.
    for node in three_nodes:
        for secret in (node.data_dir / "secrets" / "cluster").iterdir():
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        conf = node.data_dir / "nats" / "nats.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        broker_toml = tomllib.loads((node.data_dir / "config" / "broker.toml").read_text())
        assert broker_toml["providers"] == ["hsm-nas1", "hsm-nas2", "hsm-nas3"]
        assert broker_toml["provider_nodes"]["hsm-nas1"] == "nas1"
        assert broker_toml["replicas"] == 3
        _assert_route_tls(node)

    # Every bucket and audit stream has one copy per node, on three servers.
    copies = asyncio.run(_copies(nas2))
    assert copies == {s: (3, 3) for s in copies} and len(copies) == len(STREAMS), copies

    with KMSClient.from_config(_config_for(three_nodes, nas1), timeout=timeout) as via1:
        via1.create_key("office/on1", "ec-p256", provider="hsm-nas1")
        assert via1.get_key("office/on1").provider == "hsm-nas1"
    with KMSClient.from_config(_config_for(three_nodes, nas2), timeout=timeout) as via2:
        signature = via2.sign("office/on1", b"routed from nas2 to nas1")
        assert via2.verify("office/on1", b"routed from nas2 to nas1", signature)
        via2.create_key("office/on2", "ec-p256", provider="hsm-nas2")

    # One config listing all three brokers works.
    with KMSClient.from_config(nas1.data_dir / "client" / "config.toml", timeout=timeout) as kms:
        assert kms.sign("office/on2", b"through the admin config")
        assert {c.name for c in kms.status().components} >= {
            "crypto/hsm-nas1",
            "crypto/hsm-nas2",
            "crypto/hsm-nas3",
        }

    # A certificate through nas3: the CA's keys in nas1's token, its service on nas3.
    only3 = str(_config_for(three_nodes, nas3))
    ca = _kmsctl("ca", "init", "--config", only3, "--provider", "hsm-nas1", "--name", "Office CA")
    assert ca.returncode == 0, ca.stderr
    out = nas3.data_dir.parent / "web.crt"
    cert_args = ["--profile", "https-server", "--generate", "--cn", "web.office.arpa"]
    done = _kmsctl(
        "cert", "issue", "--config", only3, *cert_args, "--san", "dns:web.office.arpa",
        "--out", str(out), "--key-out", str(out.with_suffix(".key")), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"BEGIN CERTIFICATE" in out.read_bytes()

    verified = _kmsctl("audit", "verify", "--config", only3, "-o", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # nas1 goes away: its keys answer UNAVAILABLE naming it, the others keep working.
    nas1.stop()
    with KMSClient.from_config(_config_for(three_nodes, nas2), timeout=timeout) as via2:
        refused = _refusal(via2)
        assert refused.reason == "provider.unavailable", refused
        assert refused.details.get("node") == "nas1"
        assert _until("hsm-nas2 signs", lambda: via2.sign("office/on2", b"nas1 is down"))

    # nas1 back with the same bundle: no second ceremony, its keys sign again.
    admin_before = (nas1.data_dir / "client" / "config.toml").read_bytes()
    (nas1.data_dir / "run" / "state.json").unlink(missing_ok=True)
    _start(nas1)
    _wait_ready([nas1], 120)
    with KMSClient.from_config(_config_for(three_nodes, nas2), timeout=timeout) as via2:
        assert _until("hsm-nas1 signs again", lambda: via2.sign("office/on1", b"nas1 is back"))
    assert (nas1.data_dir / "pki" / "internal-ca.crt").read_bytes() in ca_pems
    assert (nas1.data_dir / "client" / "config.toml").read_bytes() == admin_before


def _assert_route_tls(node: Node) -> None:
    """The node's routes are TLS with its bundle's certificate, each peer verified, the
    password kept; its route port sends nothing in plain text, and its INFO only after a
    handshake with a route certificate of the cluster's route CA."""
    installed = node.data_dir / "secrets" / "cluster"
    conf = (node.data_dir / "nats" / "nats.conf").read_text()
    cluster_block = conf[conf.index("cluster: {") :]
    for line in (
        f"cert_file: {json.dumps(str(installed / 'route.crt'))}",
        f"key_file: {json.dumps(str(installed / 'route.key'))}",
        f"ca_file: {json.dumps(str(installed / 'routes-ca.crt'))}",
        "verify: true",
        "password:",
    ):
        assert line in cluster_block, (node.name, line)
    route_port = read_spec(node.bundle / "cluster.toml")[0].node(node.name).route_port
    assert not _plain_first_line(route_port).startswith(b"INFO")
    peer = node.bundle.parent / ("nas2" if node.name == "nas1" else "nas1")
    info = _route_info(route_port, peer / "route.crt", peer / "route.key", peer / "routes-ca.crt")
    assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True


STREAMS = ("KV_kms_keys", "KV_kms_clients", "KV_kms_requests", "KMS_AUDIT_BROKER")


async def _copies(node: Node) -> dict[str, tuple[int, int]]:
    """stream -> (replicas configured, servers holding it: leader + replicas), read
    through the node's server as its broker (which may read these streams)."""
    state = json.loads((node.data_dir / "run" / "state.json").read_text())
    options = local_credentials(node.data_dir, "broker").connect_options()
    nc = await natsrpc.connect(state["nats_url"], name="test", **options)
    try:
        js = nc.jetstream(timeout=10)
        found = {}
        for stream in STREAMS:
            info = await js.stream_info(stream)
            assert info.cluster is not None
            held = 1 + len(info.cluster.replicas or [])
            found[stream] = (info.config.num_replicas or 1, held)
        return found
    finally:
        await nc.close()


def _refusal(client: KMSClient, seconds: float = 90.0) -> Unavailable:
    """The refusal of a Sign on hsm-nas1, once the audit stream has a leader without
    nas1 (until then the broker may answer audit.unavailable before asking)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        with pytest.raises(Unavailable) as refused:
            client.sign("office/on1", b"while nas1 is down")
        if refused.value.reason == "provider.unavailable" or time.monotonic() > deadline:
            return refused.value
        time.sleep(0.3)


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        ("nas1", "cluster.node_invalid"),
        ("nas1=127.0.0.1:99999", "cluster.node_invalid"),
        ("NAS=127.0.0.1", "cluster.node_invalid"),
    ],
)
def test_cluster_init_refuses_a_bad_node(tmp_path: Path, node: str, reason: str) -> None:
    done = _kmsctl(
        "cluster", "init", "--name", "office", "--node", node, "--out", str(tmp_path / "b")
    )
    assert done.returncode == 3, done.stderr
    assert reason in done.stderr
    assert not (tmp_path / "b").exists()


def test_cluster_init_refuses_duplicates_and_a_used_directory(tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    same = ("--node", "a=127.0.0.1", "--node", "b=127.0.0.1")
    done = _kmsctl("cluster", "init", "--name", "office", *same, "--out", out)
    assert done.returncode == 3 and "cluster.node_duplicate" in done.stderr
    assert not Path(out).exists()
    ok = ("--node", "a=127.0.0.1:7001:7101", "--node", "b=127.0.0.1:7002:7102")
    assert _kmsctl("cluster", "init", "--name", "office", *ok, "--out", out).returncode == 0
    before = (Path(out) / "a" / "route.password").read_bytes()
    again = _kmsctl("cluster", "init", "--name", "office", *ok, "--out", out)
    assert again.returncode == 5 and "cluster.bundle_exists" in again.stderr
    assert (Path(out) / "a" / "route.password").read_bytes() == before
    for path in (Path(out) / "a").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600)
    assert before.decode().strip() not in again.stdout + again.stderr


def test_up_refuses_a_broken_bundle_before_starting_anything(tmp_path: Path) -> None:
    out = tmp_path / "b"
    ok = ("--node", "a=127.0.0.1:7001:7101", "--node", "b=127.0.0.1:7002:7102")
    assert _kmsctl("cluster", "init", "--name", "office", *ok, "--out", str(out)).returncode == 0
    (out / "a" / "cluster.toml").write_text('cluster = "office"\nnode = "zz"\n[[nodes]]\n')
    data = tmp_path / "data"
    done = _kmsctl("up", "--data-dir", str(data), "--join", str(out / "a"))
    assert done.returncode == 3, done.stderr
    assert "cluster.bundle_invalid" in done.stderr
    assert not (data / "nats").exists()


def test_up_refuses_to_join_a_data_dir_with_its_own_sealing_keys(tmp_path: Path) -> None:
    out = tmp_path / "b"
    ok = (f"--node=a=127.0.0.1:{free_port()}:{free_port()}", f"--node=b=127.0.0.1:{free_port()}")
    assert _kmsctl("cluster", "init", "--name", "office", *ok, "--out", str(out)).returncode == 0
    data = tmp_path / "data"
    own = data / "secrets" / "seal" / "broker.key"
    own.parent.mkdir(parents=True)
    own.write_bytes((out / "b" / "seal" / "ca.key").read_bytes())  # not the broker's
    done = _kmsctl(
        "up", "--data-dir", str(data), "--join", str(out / "a"), "--nats-port", str(free_port()),
        "--ca-http", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
    )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert "cluster.seal_mismatch" in done.stderr
    assert not (data / "secrets" / "cluster").exists()
    assert not (data / "nats").exists()


def test_a_node_data_dir_is_not_started_without_its_bundle(tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert (
        _kmsctl(
            "cluster", "init", "--name", "office", "--node=a=127.0.0.1", "--out", str(out)
        ).returncode
        == 0
    )
    data = tmp_path / "data"
    install_bundle(out / "a", data / "secrets")
    done = _kmsctl("up", "--data-dir", str(data), "--nats-port", str(free_port()))
    assert done.returncode == 6, done.stderr
    assert "cluster.join_required" in done.stderr
    assert not (data / "nats").exists()


def test_add_node_keeps_the_secrets_and_the_first_node(tmp_path: Path) -> None:
    out, grown = tmp_path / "b", tmp_path / "b4"
    three = [f"--node={n}=127.0.0.1:{7000 + i}:{7100 + i}" for i, n in enumerate(NODES)]
    assert _kmsctl("cluster", "init", "--name", "office", *three, "--out", str(out)).returncode == 0
    done = _kmsctl(
        "cluster", "add-node", "--from", str(out / "nas2"), "--route-ca", str(out / "_admin"),
        "--node", "nas4=127.0.0.1:7003:7103", "--out", str(grown), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replicas"] == 4
    spec, shared = read_secrets(grown / "nas4")
    assert [n.name for n in spec.nodes] == [*NODES, "nas4"] and spec.first.name == "nas1"
    assert shared == read_secrets(out / "nas1")[1]
    clash = _kmsctl(
        "cluster", "add-node", "--from", str(out / "nas1"), "--route-ca", str(out / "_admin"),
        "--node", "nas3=127.0.0.1:7009:7109", "--out", str(tmp_path / "b5"),
    )  # fmt: skip
    assert clash.returncode == 3 and "cluster.node_duplicate" in clash.stderr
    assert not (tmp_path / "b5").exists()


def test_pki_sealed_under_another_join_key_is_refused(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for out in (ours, theirs):
        assert (
            _kmsctl(
                "cluster", "init", "--name", "office", "--node=a=127.0.0.1", "--out", str(out)
            ).returncode
            == 0
        )
    mine = install_bundle(ours / "a", tmp_path / "d1" / "secrets")
    other = install_bundle(theirs / "a", tmp_path / "d2" / "secrets")
    pki = SharedPki(b"ca", b"cert", b"key")
    assert open_pki(mine, seal_pki(mine, pki)) == pki
    for blob in (seal_pki(other, pki), b"", b"x" * 40):
        with pytest.raises(InvalidArgument) as refused:
            open_pki(mine, blob)
        assert refused.value.reason == "cluster.pki_forged"


def test_the_node_unit_runs_a_real_kmsctl_up_command(tmp_path: Path) -> None:
    """deploy/cluster/edgekms-node.service's ExecStart parses as `kmsctl up` does (its
    bundle directory, which must exist, here a temporary one)."""
    import shlex

    from mgmt.cli.stack import up

    unit = Path(__file__).parents[2] / "deploy" / "cluster" / "edgekms-node.service"
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[:2] == ["/usr/bin/kmsctl", "up"]
    assert argv[argv.index("--join") + 1] == "/var/lib/edgekms/bundle"
    argv[argv.index("--join") + 1] = str(tmp_path)
    with up.make_context("up", argv[2:]) as ctx:
        assert ctx.params["join"] == tmp_path


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("nas1=10.0.0.1", ("nas1", "10.0.0.1", 6222, 8443)),
        ("nas2=nas2.lan:7222", ("nas2", "nas2.lan", 7222, 8443)),
        ("nas3=[fd00::3]:6222:9443", ("nas3", "fd00::3", 6222, 9443)),
    ],
)
def test_a_node_is_name_host_and_optional_ports(text: str, node: tuple[str, str, int, int]) -> None:
    parsed = parse_node(text)
    assert (parsed.name, parsed.host, parsed.route_port, parsed.broker_port) == node
    assert parsed.provider == f"hsm-{node[0]}"
    if ":" in node[1]:
        assert parsed.route == f"[{node[1]}]:{node[2]}"
