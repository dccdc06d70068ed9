"""`python -m bench.cluster` (`make bench-cluster`): the same work on one nats-server and
on a three-node JetStream cluster on this machine, and the time from killing a node to
the first success after it (issue 18, "Speed"). About a minute.

Measured at the bus, with the real parts the figures depend on:
  - Sign: a real kms-crypto with a SoftHSM token, EC P-256 signs through CryptoClient
    (as the broker sends them), 16 in flight; on the cluster the token's service is on
    node n0 and the caller on n2, so every sign crosses a route.
  - issuance's durable writes: per certificate the CA's record (KV create of a random
    serial on kms_ca), a CRL-number compare-and-set and one audit entry (AuditWriter,
    writer `ca`), 8 in flight; R1 on one node, R3 on the cluster (each write
    acknowledged once two of three copies have it on disk: sync_interval always).
  - kill to first success: the issuance loop keeps going while the node leading kms_ca
    is killed -9; the figure is the time from the kill to the first issuance begun
    after it that completes.
Certificate signing itself (the CA's key on the token) is left out: it does not change
with the cluster. Results: bench/results/cluster.json and cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
# The kill run: the leader dies this long into it, and it goes on long enough after.
KILL_AFTER_S = 4.0
KILL_RUN_S = 25.0


def _node_config(root: Path, index: int, size: int, ports: list[int], routes: list[int]) -> Any:
    from mgmt.natsserver import ClusterConfig, NatsServerConfig

    cluster = None
    if size > 1:
        cluster = ClusterConfig(
            name="bench",
            port=routes[index],
            routes=tuple(f"127.0.0.1:{p}" for i, p in enumerate(routes) if i != index),
            password="bench-" + "x" * 16,
        )
    return NatsServerConfig(
        store_dir=root / f"n{index}" / "jetstream",
        port=ports[index],
        server_name=f"n{index}",
        cluster=cluster,
    )


class Nodes:
    """`size` nats-server processes (one: no cluster block), started and ready."""

    def __init__(self, root: Path, size: int) -> None:
        from mgmt.natsserver import NatsServer, free_port

        self.size = size
        ports = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.servers = []
        for index in range(size):
            directory = root / f"n{index}"
            directory.mkdir(parents=True)
            config = _node_config(root, index, size, ports, routes)
            server = NatsServer(config, directory / "nats.conf", directory / "nats.log")
            self.servers.append(server.start())
        self.urls = [s.url for s in self.servers]

    async def wait_ready(self) -> None:
        from mgmt.natsserver import wait_cluster_ready

        await wait_cluster_ready(list(self.urls), 120)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _start_crypto(root: Path, url: str) -> subprocess.Popen[bytes]:
    from mgmt.softhsm import init_token

    pin = secrets.token_hex(8)
    token = init_token(root / "softhsm", "bench", pin=pin, so_pin=secrets.token_hex(8))
    pin_file = root / "pin"
    pin_file.write_text(pin)
    os.chmod(pin_file, 0o600)
    conf = root / "crypto.toml"
    conf.write_text(
        f'provider_id = "hsmb"\nnats_url = "{url}"\n[pkcs11]\nmodule = "{token.module}"\n'
        f'token_label = "bench"\npin_file = "{pin_file}"\nsessions = 2\n'
    )
    log = open(root / "crypto.log", "ab")  # noqa: SIM115 - handed to the child
    env = {**os.environ, **token.env()}
    return subprocess.Popen(
        [str(BIN / "kms-crypto"), "--config", str(conf)], stdout=log, stderr=log, env=env
    )


async def _sign_rate(url: str, seconds: float, inflight: int = 16) -> float:
    import nats

    from edgekms.crypto_client import CryptoClient
    from edgekms.errors import KMSError
    from edgekms.v1 import common_pb2, crypto_pb2

    nc = await nats.connect(url)
    client = CryptoClient(nc, default_timeout=10)
    deadline = time.monotonic() + 60
    while True:
        try:
            made = await client.generate_key(
                "hsmb",
                crypto_pb2.GenerateKeyRequest(
                    key_id=secrets.token_bytes(16),
                    label="bench",
                    key_type=common_pb2.KEY_TYPE_EC_P256,
                ),
            )
            break
        except KMSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    request = crypto_pb2.SignRequest(
        key_id=made.key_id,
        algorithm=common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        data=b"\x01" * 32,
    )
    done = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            await client.sign("hsmb", request)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    rate = done / (time.monotonic() - started)
    await nc.close()
    return rate


async def _issuance(
    nodes: Nodes, seconds: float, inflight: int = 8, kill: bool = False
) -> dict[str, float]:
    import nats

    from ca_service.store import CAStore, store_with_fresh_serial
    from edgekms import audit, kvstore
    from edgekms.v1 import ca_pb2

    replicas = nodes.size
    setup = await nats.connect(nodes.urls[0])
    js = setup.jetstream(timeout=10)
    await kvstore.harden(js, kvstore.BUCKETS["kms_ca"], replicas=replicas)
    await audit.harden_stream(js, ["ca"], replicas=replicas)
    info = await js.stream_info(kvstore.stream_name("kms_ca"))
    leader = info.cluster.leader if info.cluster else None
    await setup.close()
    victim = int(leader.removeprefix("n")) if kill and leader else None
    order = [i for i in range(nodes.size) if i != victim] + ([victim] if victim is not None else [])
    nc = await nats.connect(
        servers=[nodes.urls[i] for i in order],
        dont_randomize=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    js = nc.jetstream(timeout=3)
    store = await CAStore.open(js)
    writer = audit.AuditWriter(js, "ca", timeout=3, replicas=replicas)
    done = 0
    killed_at: float | None = None
    first_after: float | None = None
    end = time.monotonic() + seconds

    async def make(serial: int) -> ca_pb2.CertificateRecord:
        return ca_pb2.CertificateRecord(serial=f"{serial:X}", profile="server", requester="b")

    async def worker() -> None:
        nonlocal done, first_after
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                record = await store_with_fresh_serial(
                    store, make, lambda: secrets.randbits(63) | (1 << 62)
                )
                await store.next_crl_number()
                await writer.append("IssueCertificate", "ok", target=record.serial)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            done += 1
            # The first issuance begun after the kill: one already past its writes when
            # the node died says nothing about the recovery.
            if killed_at is not None and began >= killed_at and first_after is None:
                first_after = time.monotonic()

    started = time.monotonic()
    tasks = [asyncio.create_task(worker()) for _ in range(inflight)]
    if victim is not None:
        await asyncio.sleep(KILL_AFTER_S)
        nodes.servers[victim].kill()
        killed_at = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    await nc.close()
    out = {"issuances_per_s": round(done / elapsed, 1)}
    if victim is not None:
        out["kill_to_first_success_s"] = (
            round(first_after - killed_at, 2) if first_after and killed_at else -1.0
        )
    return out


async def _run(root: Path, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in (1, 3):
        label = f"{size}-node"
        nodes = Nodes(root / label, size)
        crypto = None
        try:
            await nodes.wait_ready()
            crypto = _start_crypto(root / label, nodes.urls[0])
            figures: dict[str, float] = {}
            figures["signs_per_s"] = round(await _sign_rate(nodes.urls[-1], seconds), 1)
            figures.update(await _issuance(nodes, seconds))
            results[label] = figures
        finally:
            if crypto is not None:
                crypto.terminate()
                crypto.wait(15)
            nodes.stop()
    nodes = Nodes(root / "kill", 3)
    try:
        await nodes.wait_ready()
        results["3-node, leader killed"] = await _issuance(nodes, KILL_RUN_S, kill=True)
    finally:
        nodes.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per figure")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        results = asyncio.run(_run(root, args.duration))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["cpus"] = os.cpu_count() or 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| setup | signs/s | issuances/s | kill to first success (s) |", "|---|---|---|---|"]
    for label, figures in results.items():
        if isinstance(figures, dict):
            lines.append(
                f"| {label} | {figures.get('signs_per_s', '')} | "
                f"{figures.get('issuances_per_s', '')} | "
                f"{figures.get('kill_to_first_success_s', '')} |"
            )
    (args.out / "cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
