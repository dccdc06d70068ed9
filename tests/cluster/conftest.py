"""Three real nats-server nodes on loopback: routes, JetStream clustering, one store each.

Each node is a NatsServer with a ClusterConfig naming the other two (mgmt.natsserver);
`Cluster.kill(i)` is kill -9 of one node, `start(i)` brings it back on the same ports and
store. `wait_ready` polls until JetStream has a meta leader and every node answers, with
a generous deadline (a busy two-core CI machine).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from mgmt.natsserver import (
    ClusterConfig,
    NatsServer,
    NatsServerConfig,
    free_port,
    wait_cluster_ready,
)
from tests.cluster.netns import NetnsCluster, unavailable_reason
from tests.conftest import SLOWDOWN

CLUSTER = "edgekms-test"


@dataclass
class Cluster:
    root: Path
    size: int = 3
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    client_ports: list[int] = field(default_factory=list)
    route_ports: list[int] = field(default_factory=list)
    nodes: list[NatsServer | None] = field(default_factory=list)
    # The nodes' JetStream domain (a fleet hub's "hub"); None: none.
    domain: str | None = None

    def __post_init__(self) -> None:
        self.client_ports = [free_port() for _ in range(self.size)]
        self.route_ports = [free_port() for _ in range(self.size)]
        self.nodes = [None] * self.size

    def name(self, index: int) -> str:
        return f"n{index}"

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    def config(self, index: int) -> NatsServerConfig:
        routes = tuple(f"127.0.0.1:{p}" for i, p in enumerate(self.route_ports) if i != index)
        return NatsServerConfig(
            store_dir=self.root / self.name(index) / "jetstream",
            port=self.client_ports[index],
            server_name=self.name(index),
            domain=self.domain,
            cluster=ClusterConfig(
                name=CLUSTER, port=self.route_ports[index], routes=routes, password=self.password
            ),
        )

    def start(self, index: int) -> NatsServer:
        directory = self.root / self.name(index)
        directory.mkdir(parents=True, exist_ok=True)
        server = NatsServer(self.config(index), directory / "nats.conf", directory / "nats.log")
        self.nodes[index] = server.start(timeout=15.0 * SLOWDOWN)
        return server

    def start_all(self) -> None:
        for index in range(self.size):
            self.start(index)

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        assert node is not None
        node.kill()
        self.nodes[index] = None

    def stop_all(self) -> None:
        for index, node in enumerate(self.nodes):
            if node is not None:
                node.stop()
                self.nodes[index] = None

    def index_of(self, server_name: str) -> int:
        return int(server_name.removeprefix("n"))

    async def connect(self, first: int = 0, name: str = "test") -> Client:
        """A client that prefers node `first` and fails over to the others."""
        ordered = self.urls[first:] + self.urls[:first]
        return await nats.connect(
            servers=ordered,
            name=name,
            dont_randomize=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
        )

    async def wait_ready(self, seconds: float = 60.0) -> None:
        """Until every live node's JetStream answers and the meta group knows them all
        (mgmt.natsserver.wait_cluster_ready)."""
        await wait_cluster_ready(
            [u if n is not None else None for u, n in zip(self.urls, self.nodes, strict=True)],
            seconds * SLOWDOWN,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster")
    made.start_all()
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
async def ready_cluster(cluster: Cluster) -> AsyncIterator[Cluster]:
    await cluster.wait_ready()
    yield cluster


@pytest.fixture
async def netns_cluster(tmp_path: Path) -> AsyncIterator[NetnsCluster]:
    """Three nodes each in its own network namespace, ready (tests.cluster.netns); the
    namespaces are deleted at teardown, also when setup fails half-way."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"partition tests need network namespaces: {reason}")
    made = NetnsCluster(tmp_path / "netns")
    try:
        made.build_network()
        made.start_all()
        await made.wait_ready()
        yield made
    finally:
        made.teardown()
