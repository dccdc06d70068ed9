"""JetStream KV buckets made so that a writer can change only entries, never the bucket.

nats-py's `create_key_value` makes a bucket's stream with rollup headers allowed (one
message with `Nats-Rollup: all` then replaces every key: the "rollup wipe" of issue 11)
and per-message TTLs allowed (a `Nats-TTL` header makes a record expire). Every EdgeKMS
bucket is made here instead, with both off and the stream's delete and purge APIs denied,
so what a bus identity can do to a bucket is bounded by the subjects it may publish on
($KV.<bucket>.<key>, mgmt/natsauth.py): put, update and delete markers of its own keys,
each one more revision in the history. `harden` brings a bucket made by an older version
to the same settings (`kmsctl up` runs it at start, before any service), except the
per-message TTL switch, which nats-server cannot turn off on an existing stream.

Replicas: on one nats-server every bucket is R1; on a JetStream cluster the deployment
chooses (R3 on three nodes, docs/cluster.md), and `harden` scales a bucket made before
to that number (nats-server moves the data; the bucket stays writable meanwhile).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from edgekms.logs import fields
from edgekms.subjects import CA_BUCKET, CLIENTS_BUCKET, IDEMPOTENCY_BUCKET, KEY_REGISTRY_BUCKET

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketSpec:
    """What a bucket keeps: revisions per key, and how long (0: for ever)."""

    bucket: str
    description: str
    history: int = 5
    ttl: float = 0.0


# Every bucket of a stack, so that the supervisor can make or harden them all first.
BUCKETS: dict[str, BucketSpec] = {
    KEY_REGISTRY_BUCKET: BucketSpec(KEY_REGISTRY_BUCKET, "EdgeKMS key registry"),
    CLIENTS_BUCKET: BucketSpec(
        CLIENTS_BUCKET, "EdgeKMS clients (client.<name>) and revoked serials (revoked.<hex>)"
    ),
    # The broker's idempotency entries live 24 hours (broker/idempotency.py).
    IDEMPOTENCY_BUCKET: BucketSpec(
        IDEMPOTENCY_BUCKET, "EdgeKMS idempotency: answers by client and request id", 5, 86400.0
    ),
    CA_BUCKET: BucketSpec(CA_BUCKET, "EdgeKMS mini-CA state and certificate records"),
}


def stream_name(bucket: str) -> str:
    return f"KV_{bucket}"


def check_replicas(replicas: int) -> int:
    """JetStream keeps 1 to 5 copies of a stream (one per cluster node at most)."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1..{MAX_REPLICAS}, got {replicas}")
    return replicas


# JetStream's own limit on a stream's copies.
MAX_REPLICAS = 5


def parse_replicas(raw: Mapping[str, Any]) -> tuple[int, list[str]]:
    """A service config's `replicas` (copies of a bucket or stream it creates, where
    `kmsctl up` did not make it first): 1 by default; problems as "field: problem"."""
    value = raw.get("replicas", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
        return 1, [f"replicas: must be an integer from 1 to {MAX_REPLICAS}"]
    return value, []


def bucket_config(spec: BucketSpec, replicas: int = 1) -> api.StreamConfig:
    """The stream of a KV bucket as nats-py would make it, minus rollups, message TTLs,
    purges and deletes through the stream API; `replicas` copies on a cluster."""
    duplicate_window = 120.0
    if spec.ttl and spec.ttl < duplicate_window:
        duplicate_window = spec.ttl
    return api.StreamConfig(
        name=stream_name(spec.bucket),
        description=spec.description,
        subjects=[f"$KV.{spec.bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=False,
        allow_msg_ttl=False,
        deny_delete=True,
        deny_purge=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=duplicate_window,
        max_age=spec.ttl or None,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=spec.history,
        num_replicas=check_replicas(replicas),
        storage=api.StorageType.FILE,
    )


def spec_for(bucket: str, description: str = "", history: int = 5, ttl: float = 0.0) -> BucketSpec:
    """The stack's spec for `bucket`; tests' own buckets get one made from the arguments."""
    known = BUCKETS.get(bucket)
    if known is not None:
        return known
    return BucketSpec(bucket, description or bucket, history, ttl)


async def open_kv(js: JetStreamContext, spec: BucketSpec, replicas: int = 1) -> KeyValue:
    """The bucket, made with `bucket_config` if it does not exist yet (one that exists
    keeps its replicas: only the supervisor's `harden` changes them)."""
    try:
        return await js.key_value(spec.bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        await js.add_stream(bucket_config(spec, replicas))
        log.info("bucket created", extra=fields(bucket=spec.bucket, replicas=replicas))
    except nats.js.errors.BadRequestError:
        pass  # another part made it between our look and our add
    return await js.key_value(spec.bucket)


def is_hardened(config: api.StreamConfig) -> bool:
    return bool(not config.allow_rollup_hdrs and config.deny_delete and config.deny_purge)


async def harden(js: JetStreamContext, spec: BucketSpec, replicas: int | None = None) -> bool:
    """Make the bucket, or turn off rollups and deny delete and purge on the one there;
    with `replicas`, also scale it to that many copies (None: a new bucket gets one, an
    existing one keeps its own). Returns whether anything changed. Needs the
    STREAM.CREATE/UPDATE grant that only the supervisor holds, and only while it sets the
    stack up."""
    try:
        info = await js.stream_info(stream_name(spec.bucket))
    except nats.js.errors.NotFoundError:
        await open_kv(js, spec, replicas or 1)
        return True
    scale = replicas is not None and check_replicas(replicas) != (info.config.num_replicas or 1)
    if is_hardened(info.config) and not scale:
        return False
    config = dataclasses.replace(
        info.config,
        allow_rollup_hdrs=False,
        deny_delete=True,
        deny_purge=True,
        num_replicas=replicas if scale else info.config.num_replicas,
    )
    await js.update_stream(config)
    log.warning(
        "bucket hardened: rollups off, no purge or delete",
        extra=fields(bucket=spec.bucket, replicas=config.num_replicas),
    )
    return True
