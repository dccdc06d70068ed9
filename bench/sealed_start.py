"""`python -m bench.sealed_start`: a broker start with 50,000 sealed key records (issue 11,
"Broker start with 50,000 sealed records"). Part of `make bench`; alone a few minutes.

On a `kmsctl up` stack: 50,000 KeyRecords are put into kms_keys sealed with the broker's
own key (as the broker seals them; edgekms.sealed), then the broker is killed (SIGKILL)
and `kmsctl up` restarts it. Measured: the new broker's own figure for loading kms_keys
(read and verify every seal; its log line "bucket loaded"), and the time from the kill
until a GetKey of the last seeded key answers through the new broker. Before, the
broker gave its initial snapshot a fixed 10 s and a start at this size failed (and was
restarted forever) on a loaded 2-core machine; now it waits as long as records keep
coming (broker.buckets.SNAPSHOT_STALL_S without one ends it). Results:
bench/results/sealed_start.json and sealed_start.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import stackrun

log = logging.getLogger("bench.sealed_start")

RECORDS = 50_000
_WINDOW = 256  # puts in flight while seeding


async def _seed(data_dir: Path, nats_url: str, count: int) -> float:
    import nats

    from broker.buckets import open_bucket
    from edgekms.sealed import WRITER_BROKER, SealedKV
    from edgekms.subjects import KEY_REGISTRY_BUCKET
    from edgekms.v1 import common_pb2 as pb
    from mgmt.sealkeys import local_seal

    nc = await nats.connect(nats_url, **stackrun.bus_options(data_dir, "broker"))
    try:
        seal = local_seal(data_dir / "secrets", WRITER_BROKER)
        assert seal is not None, "kmsctl up made no sealing keys"
        raw = await open_bucket(nc.jetstream(timeout=30), KEY_REGISTRY_BUCKET, description="")
        kv = SealedKV(raw, KEY_REGISTRY_BUCKET, seal)
        slots = asyncio.Semaphore(_WINDOW)
        der = bytes(91)  # a P-256 SubjectPublicKeyInfo's size; never used to verify

        async def one(i: int) -> None:
            record = pb.KeyRecord(
                name=f"seeded/k{i}",
                provider="hsm0",
                key_type=pb.KEY_TYPE_EC_P256,
                key_id=i.to_bytes(16, "big"),
                public_key_der=der,
                state=pb.KEY_STATE_ACTIVE,
                created_at="2026-01-01T00:00:00+00:00",
                updated_at="2026-01-01T00:00:00+00:00",
            )
            async with slots:
                await kv.put(record.name, record.SerializeToString())

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - started
    finally:
        await nc.close()


def _loaded_seconds(broker_log: Path, after: int) -> float | None:
    """The new broker's own kms_keys load time, from its structured log."""
    text = broker_log.read_bytes()[after:].decode("utf-8", errors="replace")
    for line in text.splitlines():
        if "bucket loaded" in line and "kms_keys" in line:
            for part in line.replace(",", " ").split():
                if part.startswith("seconds="):
                    return float(part.split("=", 1)[1].strip('"'))
            try:
                record = json.loads(line)
                return float(record["seconds"])
            except (ValueError, KeyError):
                return None
    return None


def run(stack: stackrun.RunningStack, count: int = RECORDS) -> dict[str, Any]:
    from mgmt.client import KMSClient

    seeded = asyncio.run(_seed(stack.data_dir, stack.nats_url, count))
    log.warning("seeded %d sealed records in %.1fs", count, seeded)
    broker_log = stack.data_dir / "logs" / "broker.log"
    offset = broker_log.stat().st_size
    pid = stack.pids()["broker"]
    load_before = os.getloadavg()
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    answered = None
    deadline = killed + 900
    last = f"seeded/k{count - 1}"
    while time.perf_counter() < deadline:
        try:
            with KMSClient.from_config(stack.client_config, timeout=10) as kms:
                if kms.get_key(last).name == last:
                    answered = time.perf_counter() - killed
                    break
        except Exception:
            time.sleep(0.5)
    if answered is None:
        raise RuntimeError("the broker did not answer within 900 s of its restart")
    loaded = None
    for _ in range(20):  # the line may still be on its way to the file
        loaded = _loaded_seconds(broker_log, offset)
        if loaded is not None:
            break
        time.sleep(0.5)
    result = {
        "records": count,
        "seed_seconds": round(seeded, 1),
        "kill_to_first_answer_s": round(answered, 1),
        "broker_load_kms_keys_s": loaded,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": len(os.sched_getaffinity(0)),
    }
    log.warning("sealed start: %s", result)
    return result


def run_fresh(work: Path, count: int = RECORDS) -> dict[str, Any]:
    data = work / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    stack = stackrun.start(data, log_level="info")
    try:
        return run(stack, count)
    finally:
        stack.stop()


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sealed_start.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    lines = [
        "# Broker start with sealed records",
        "",
        f"{result['records']:,} KeyRecords in kms_keys, each sealed with the broker's key,",
        "then the broker killed (SIGKILL) and restarted by `kmsctl up`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| seeding (puts, 256 in flight) | {result['seed_seconds']} s |",
        f"| broker's own kms_keys load (read + verify every seal) | "
        f"{result['broker_load_kms_keys_s']} s |",
        f"| kill to the first GetKey answered by the new broker | "
        f"{result['kill_to_first_answer_s']} s |",
        f"| load average before / after | {result['loadavg_before']} / {result['loadavg_after']} |",
        f"| CPUs | {result['cpus']} |",
        "",
    ]
    (out / "sealed_start.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sealed_start", description=__doc__)
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-sealed-start-"))
    try:
        result = run_fresh(work, args.records)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
