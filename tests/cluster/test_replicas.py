"""Every bucket and audit stream EdgeKMS owns, made with the cluster's replicas.

Pure config rendering first, then a real three-node JetStream cluster: `kvstore.harden`
and `audit.harden_stream` (what `kmsctl up` runs at start) make R3 streams, scale an R1
bucket made before to R3, and leave an existing stream's replicas alone when the
deployment names none."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekms import audit, kvstore
from mgmt.natsserver import ClusterConfig, NatsServerConfig, NatsServerError
from tests.cluster.conftest import Cluster


def test_cluster_block_names_routes_with_credentials(tmp_path: object) -> None:
    config = NatsServerConfig(
        store_dir=tmp_path,  # type: ignore[arg-type]
        server_name="a",
        cluster=ClusterConfig(
            name="office", port=6222, routes=("10.0.0.2:6222",), password="p@ss word"
        ),
    )
    text = config.render()
    assert 'name: "office"' in text
    assert "port: 6222" in text
    # The password is quoted into the URL, never left to break its syntax.
    assert '"nats-route://edgekms-route:p%40ss%20word@10.0.0.2:6222"' in text
    assert 'password: "p@ss word"' in text
    assert "sync_interval: always" in text


def test_routes_without_a_password_are_refused(tmp_path: object) -> None:
    config = NatsServerConfig(
        store_dir=tmp_path,  # type: ignore[arg-type]
        cluster=ClusterConfig(name="office", port=6222, routes=("10.0.0.2:6222",)),
    )
    with pytest.raises(NatsServerError, match="routes need a password"):
        config.render()


def test_replicas_out_of_range_are_refused() -> None:
    spec = kvstore.BUCKETS["kms_keys"]
    with pytest.raises(ValueError, match=r"replicas must be 1\.\.5"):
        kvstore.bucket_config(spec, 0)
    with pytest.raises(ValueError, match=r"replicas must be 1\.\.5"):
        kvstore.bucket_config(spec, 6)
    assert kvstore.bucket_config(spec, 3).num_replicas == 3


async def test_every_bucket_and_audit_stream_is_r3(ready_cluster: Cluster) -> None:
    nc = await ready_cluster.connect()
    try:
        js = nc.jetstream(timeout=10)
        # One bucket made R1 first, as a single-node stack made it before it grew.
        await kvstore.open_kv(js, kvstore.BUCKETS["kms_clients"])
        first = await js.stream_info(kvstore.stream_name("kms_clients"))
        assert first.config.num_replicas == 1
        for spec in kvstore.BUCKETS.values():
            await kvstore.harden(js, spec, replicas=3)
        writers = ["broker", "ca", "crypto-hsm0"]
        await audit.harden_stream(js, writers, replicas=3)
        names = [kvstore.stream_name(b) for b in kvstore.BUCKETS] + [
            audit.writer_stream(w) for w in writers
        ]
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and info.cluster.leader, name
            # The leader and two more peers: three copies on three nodes.
            assert len(info.cluster.replicas or []) == 2, name
        # Without a replicas choice an existing stream keeps its copies.
        assert not await kvstore.harden(js, kvstore.BUCKETS["kms_keys"])
        await audit.harden_stream(js, writers)
        info = await js.stream_info(audit.writer_stream("broker"))
        assert info.config.num_replicas == 3
    finally:
        await nc.close()


async def test_services_create_what_is_missing_with_their_configured_replicas(
    ready_cluster: Cluster,
) -> None:
    """Where nothing made them first (no `kmsctl up`), a service's own bucket and audit
    stream get the `replicas` of its config: the CA's store and an audit writer here."""
    from ca_service.store import CAStore

    nc = await ready_cluster.connect(1)
    try:
        js = nc.jetstream(timeout=10)
        await CAStore.open(js, replicas=3)
        writer = audit.AuditWriter(js, "crypto-hsm-x", replicas=3)
        await writer.ensure_stream()
        await writer.append("Sign", "ok", target="k")
        for name in (kvstore.stream_name("kms_ca"), audit.writer_stream("crypto-hsm-x")):
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
    finally:
        await nc.close()


def test_service_configs_take_replicas(tmp_path: Path) -> None:
    from broker.config import ConfigError
    from broker.config import load_config as load_broker
    from ca_service.config import CAConfigError, load_serve_config
    from crypto_service.config import ConfigError as CryptoConfigError
    from crypto_service.config import parse_config

    broker = tmp_path / "broker.toml"
    body = (
        'listen = "127.0.0.1:8443"\nnats_url = "nats://127.0.0.1:4222"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0"]\n{extra}\n'
        '[tls]\ncert = "b.crt"\nkey = "b.key"\nclient_ca = "ca.crt"\n'
    )
    broker.write_text(body.format(extra="replicas = 3"))
    assert load_broker(broker).replicas == 3
    broker.write_text(body.format(extra=""))
    assert load_broker(broker).replicas == 1
    broker.write_text(body.format(extra="replicas = 7"))
    with pytest.raises(ConfigError, match="replicas: must be an integer from 1 to 5"):
        load_broker(broker)

    ca = tmp_path / "ca.toml"
    ca.write_text('nats_url = "nats://127.0.0.1:4222"\nreplicas = 3\n')
    assert load_serve_config(ca).replicas == 3
    ca.write_text('nats_url = "nats://127.0.0.1:4222"\nreplicas = "three"\n')
    with pytest.raises(CAConfigError, match="replicas: must be an integer"):
        load_serve_config(ca)

    crypto = {
        "provider_id": "hsm0",
        "nats_url": "nats://127.0.0.1:4222",
        "pkcs11": {"module": "/x.so", "token_label": "t", "pin_env": "PIN"},
    }
    assert parse_config({**crypto, "replicas": 3}).replicas == 3
    with pytest.raises(CryptoConfigError, match="replicas: must be an integer"):
        parse_config({**crypto, "replicas": 0})
