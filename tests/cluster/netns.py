"""Three real nats-server nodes, each in its own network namespace, for partitions.

Why namespaces: on loopback a "partition" can only be faked by killing nodes; here the
node keeps running and serving its clients while its route link is cut, which is what
the small side of a real partition sees.

Layout (names carry a random tag, so parallel runs never clash; interface names stay
within Linux's 15 characters):

    eks-<tag>-hub   a namespace holding bridge `br0`; one veth per node (`c<tag><i>`)
                    plugged into it: the cluster network, 10.A.B.11-13/25
    eks-<tag>-n<i>  node i: its nats-server, `route0` on the cluster network (routes
                    only), and `client0`, a point-to-point link to the test's own (root)
                    namespace, 10.A.B.(130+4i)/30, where its clients connect

`partition(i)` sets node i's port on the bridge down: its routes go silent both ways
while the test still reaches it on its client link; `heal(i)` sets it up again. Node
namespaces have no default route, so nothing crosses between the two networks. Teardown
kills the servers and deletes every namespace (deleting a namespace deletes its veths),
also after a failed setup.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client

from mgmt import subprocs
from mgmt.natsserver import (
    ClusterConfig,
    NatsServer,
    NatsServerConfig,
    check_version,
    find_binary,
    wait_cluster_ready,
    wait_for_port,
)
from tests.conftest import SLOWDOWN

CLIENT_PORT = 4222
ROUTE_PORT = 6222
CLUSTER_NAME = "edgekms-netsplit"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One `ip` command; its stderr in the exception when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (the fixture skips with it), or None."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    probe = f"eks-probe-{secrets.token_hex(3)}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is refused here (no CAP_NET_ADMIN?): {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /24 that no address of this (root) namespace is in."""
    used = ip("-o", "-4", "addr", "show").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}.0/24"
        )
        prefix = ".".join(str(net.network_address).split(".")[:3]) + "."
        if f" {prefix}" not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


class NamespacedServer(NatsServer):
    """A NatsServer started inside a network namespace (`ip netns exec`, which execs the
    binary itself: the process kept is nats-server's)."""

    def __init__(
        self, netns: str, config: NatsServerConfig, conf_path: Path, log_path: Path
    ) -> None:
        super().__init__(config, conf_path, log_path)
        self.netns = netns

    def start(self, timeout: float = 15.0) -> NatsServer:
        binary = find_binary()
        check_version(binary, timeout)
        self.config.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conf_path.write_text(self.config.render())
        os.chmod(self.conf_path, 0o600)
        argv = ["ip", "netns", "exec", self.netns, binary, "-c", str(self.conf_path)]
        self.process = subprocs.spawn(argv, self.log_path)
        wait_for_port(self.config.host, self.config.port, timeout, self.process, self.log_path)
        return self


@dataclass
class NetnsCluster:
    root: Path
    size: int = 3
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    nodes: list[NatsServer | None] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [None] * self.size

    # ---- names and addresses -------------------------------------------------------------

    @property
    def hub(self) -> str:
        return f"eks-{self.tag}-hub"

    def netns(self, index: int) -> str:
        return f"eks-{self.tag}-n{index}"

    def name(self, index: int) -> str:
        return f"n{index}"

    def _addr(self, offset: int) -> str:
        return str(self.subnet.network_address + offset)

    def route_ip(self, index: int) -> str:
        return self._addr(11 + index)

    def client_ip(self, index: int) -> str:
        return self._addr(130 + 4 * index)

    def _root_ip(self, index: int) -> str:
        return self._addr(129 + 4 * index)

    def _bridge_port(self, index: int) -> str:
        return f"c{self.tag}{index}"

    @property
    def urls(self) -> list[str]:
        return [f"nats://{self.client_ip(i)}:{CLIENT_PORT}" for i in range(self.size)]

    def index_of(self, server_name: str) -> int:
        return int(server_name.removeprefix("n"))

    # ---- the network ---------------------------------------------------------------------

    def build_network(self) -> None:
        self._add_netns(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.size):
            ns = self.netns(i)
            self._add_netns(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # The cluster network: node i's route0 <-> its port on the hub's bridge.
            port = self._bridge_port(i)
            ip("link", "add", port, "netns", self.hub, "type", "veth",
               "peer", "name", "route0", "netns", ns)  # fmt: skip
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.route_ip(i)}/25", "dev", "route0")
            ip("-n", ns, "link", "set", "route0", "up")
            # The client link: the test's namespace <-> node i, a /30 of its own.
            root_end = f"k{self.tag}{i}"
            ip("link", "add", root_end, "type", "veth", "peer", "name", "client0", "netns", ns)
            ip("addr", "add", f"{self._root_ip(i)}/30", "dev", root_end)
            ip("link", "set", root_end, "up")
            ip("-n", ns, "addr", "add", f"{self.client_ip(i)}/30", "dev", "client0")
            ip("-n", ns, "link", "set", "client0", "up")

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)

    def partition(self, index: int) -> None:
        """Cut node `index` off the cluster network (both directions)."""
        ip("-n", self.hub, "link", "set", self._bridge_port(index), "down")

    def heal(self, index: int) -> None:
        ip("-n", self.hub, "link", "set", self._bridge_port(index), "up")

    # ---- the servers ---------------------------------------------------------------------

    def config(self, index: int) -> NatsServerConfig:
        routes = tuple(f"{self.route_ip(i)}:{ROUTE_PORT}" for i in range(self.size) if i != index)
        return NatsServerConfig(
            store_dir=self.root / self.name(index) / "jetstream",
            host=self.client_ip(index),
            port=CLIENT_PORT,
            server_name=self.name(index),
            cluster=ClusterConfig(
                name=CLUSTER_NAME,
                host=self.route_ip(index),
                port=ROUTE_PORT,
                routes=routes,
                password=self.password,
            ),
        )

    def start(self, index: int) -> None:
        directory = self.root / self.name(index)
        directory.mkdir(parents=True, exist_ok=True)
        server = NamespacedServer(
            self.netns(index), self.config(index), directory / "nats.conf", directory / "nats.log"
        )
        self.nodes[index] = server.start(timeout=15.0 * SLOWDOWN)

    def start_all(self) -> None:
        for index in range(self.size):
            self.start(index)

    async def connect(self, index: int, name: str = "test", failover: bool = False) -> Client:
        """A client of node `index` on its client link; with `failover`, it moves to
        the other nodes when that one is gone (never for the partitioned node's clients:
        they must stay on the small side)."""
        urls = self.urls[index:] + self.urls[:index] if failover else [self.urls[index]]
        return await nats.connect(
            servers=urls,
            name=name,
            dont_randomize=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
        )

    async def wait_ready(self, seconds: float = 60.0) -> None:
        """Until every live node's JetStream answers and the meta group knows them all."""
        await wait_cluster_ready(
            [u if n is not None else None for u, n in zip(self.urls, self.nodes, strict=True)],
            seconds * SLOWDOWN,
        )

    def teardown(self) -> None:
        """Stop every server and delete every namespace this cluster made; never raises
        (it runs after failures too)."""
        for index, node in enumerate(self.nodes):
            if node is not None:
                with contextlib.suppress(Exception):
                    node.stop()
                self.nodes[index] = None
        for name in reversed(self.namespaces):
            # Deleting a namespace deletes the veths in it, and with them their peers.
            ip("netns", "del", name, check=False)
        self.namespaces.clear()
