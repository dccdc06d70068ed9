"""Keys on their node: each node's token is its own provider; a broker on a third node
signs with either over the cluster's routes, and while one node is down its keys answer
UNAVAILABLE naming that node, and the other node's keys keep working.

Real parts throughout: three nats-server nodes (tests/cluster/conftest.py), kms-crypto
`hsm-a` with its own SoftHSM token on node n0, `hsm-b` with another on n1, the ceremony
on hsm-b, and kms-broker on n2 with `provider_nodes` (broker/config.py). Node n0 is lost
the way a box is: its nats-server killed -9 and its crypto service with it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekms import audit, kvstore
from edgekms.errors import Unavailable
from mgmt.client import KMSClient
from mgmt.natsserver import NatsServer
from tests.cluster.conftest import Cluster
from tests.conftest import SLOWDOWN, make_token
from tests.e2e.conftest import BIN, Parts


class NodeParts(Parts):
    """Parts (tests.e2e.conftest) whose own provider is hsm-b on node n1, plus hsm-a on
    n0 and a broker on n2 that knows both."""

    cluster: Cluster

    def start_crypto_on(self, name: str, provider: str, node: NatsServer, root: Path) -> None:
        token = make_token(root / f"softhsm-{provider}")
        conf = root / f"{name}.toml"
        conf.write_text(
            f'provider_id = "{provider}"\nnats_url = "{node.url}"\n[pkcs11]\n'
            f'module = "{token.module}"\ntoken_label = "{token.label}"\n'
            f'pin_file = "{token.pin_file}"\nsessions = 2\n'
        )
        env = {**os.environ, "SOFTHSM2_CONF": str(token.conf)}
        self._spawn(name, [str(BIN / "kms-crypto"), "--config", str(conf)], env)

    def start_node_broker(self, node: NatsServer) -> None:
        pki = self.root / "pki"
        conf = self.root / "broker.toml"
        conf.write_text(
            f'listen = "127.0.0.1:{self.broker_port}"\nnats_url = "{node.url}"\n'
            'default_provider = "hsm-b"\nproviders = ["hsm-a", "hsm-b"]\n'
            'provider_nodes = { hsm-a = "n0", hsm-b = "n1" }\n'
            "sign_timeout = 2.0\n[tls]\n"
            f'cert = "{pki / "broker.crt"}"\nkey = "{pki / "broker.key"}"\n'
            f'client_ca = "{pki / "internal-ca.crt"}"\n'
        )
        self._spawn("broker", [str(BIN / "kms-broker"), "--config", str(conf)], {**os.environ})
        from mgmt.natsserver import wait_for_port

        wait_for_port("127.0.0.1", self.broker_port, 30 * SLOWDOWN, self.processes["broker"])


async def _replicate_state(cluster: Cluster) -> None:
    """What `kmsctl up` does first, with three copies: every bucket and audit stream."""
    nc = await cluster.connect(0, "setup")
    try:
        js = nc.jetstream(timeout=10)
        for spec in kvstore.BUCKETS.values():
            await kvstore.harden(js, spec, replicas=3)
        await audit.harden_stream(js, ["broker", "crypto-hsm-a", "crypto-hsm-b"], replicas=3)
    finally:
        await nc.close()


@pytest.fixture
def node_parts(ready_cluster: Cluster, tmp_path: Path) -> Iterator[NodeParts]:
    asyncio.run(_replicate_state(ready_cluster))
    n0, n1, n2 = ready_cluster.nodes
    assert n0 is not None and n1 is not None and n2 is not None
    built = NodeParts(tmp_path / "parts", n1, make_token(tmp_path / "softhsm-b"), "hsm-b")
    built.root.mkdir(parents=True, exist_ok=True)
    built.cluster = ready_cluster
    try:
        built.start_crypto()
        built.ceremony()
        built.start_crypto_on("crypto-a", "hsm-a", n0, tmp_path)
        built.start_node_broker(n2)
        yield built
    finally:
        built.stop_all()


def _until(what: str, check: object, seconds: float = 60.0) -> object:
    """Poll `check()` until it returns without an error, within a generous deadline."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        try:
            return check()  # type: ignore[operator]
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no success in {seconds * SLOWDOWN:g}s") from None
            time.sleep(0.2)


def _refusal_naming_the_provider(client: KMSClient, seconds: float = 60.0) -> Unavailable:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        with pytest.raises(Unavailable) as refused:
            client.sign("on/a", b"while n0 is down")
        if refused.value.reason != "audit.unavailable" or time.monotonic() > deadline:
            return refused.value
        time.sleep(0.2)


def test_a_key_is_signed_where_its_token_is_and_its_node_loss_is_named(
    node_parts: NodeParts,
) -> None:
    with KMSClient.from_config(node_parts.client_config, timeout=30 * SLOWDOWN) as client:
        _until("hsm-a answers", lambda: client.create_key("on/a", "ec-p256", provider="hsm-a"))
        client.create_key("on/b", "ec-p256", provider="hsm-b")
        assert client.get_key("on/a").provider == "hsm-a"
        assert client.sign("on/a", b"from n2 to n0")
        assert client.sign("on/b", b"from n2 to n1")

        node_parts.stop("crypto-a", signal.SIGKILL)
        node_parts.cluster.kill(0)

        # Until the audit stream's copies elect a leader without n0, a Sign may be
        # refused for the log (audit.unavailable) before the provider is even asked.
        refused = _refusal_naming_the_provider(client)
        assert refused.reason == "provider.unavailable"
        assert refused.details.get("node") == "n0"
        assert "node 'n0'" in refused.message
        # Every other key keeps working (once the audit stream's copies have a leader
        # without n0, which takes the cluster a few seconds).
        assert _until("hsm-b signs", lambda: client.sign("on/b", b"while n0 is down"))
        status = {c.name: c for c in client.status().components}
        assert not status["crypto/hsm-a"].ok and "node 'n0'" in status["crypto/hsm-a"].detail
        assert status["crypto/hsm-b"].ok
