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

Unavailable: `open_kv` hands out a `GuardedKV`, whose reads and writes that get no
answer from the bus (a node on the small side of a partition, without quorum; a lost
connection) raise Unavailable("store.unavailable") naming the bucket, instead of
nats-py's own exceptions, which the services would otherwise answer as INTERNAL. A
write refused so was not acknowledged: the caller retries it (with its request id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from edgekms.errors import Unavailable
from edgekms.logs import fields
from edgekms.subjects import CA_BUCKET, CLIENTS_BUCKET, IDEMPOTENCY_BUCKET, KEY_REGISTRY_BUCKET

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# What nats-py raises when a bucket operation got no answer: a timeout (no quorum
# behind the stream, or its leader beyond a partition), nobody listening for the stream,
# JetStream itself unavailable (503), or a connection that is not usable.
UNANSWERED: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


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


def store_unavailable(bucket: str, operation: str, exc: BaseException) -> Unavailable:
    """The typed error for a bucket operation that got no answer (UNANSWERED)."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Unavailable(
        "store.unavailable",
        f"bucket {bucket}: {operation} got no answer from the bus ({detail}); nothing "
        "was acknowledged, try again (a node without quorum refuses writes)",
        {"bucket": bucket, "operation": operation},
    )


class GuardedKV(KeyValue):
    """nats-py's KeyValue whose get, put, create, update and delete raise
    Unavailable("store.unavailable") where nats-py would raise one of UNANSWERED; every
    other error (wrong last sequence, key not found...) passes unchanged."""

    @classmethod
    def of(cls, kv: KeyValue) -> GuardedKV:
        if isinstance(kv, GuardedKV):
            return kv
        return cls(name=kv._name, stream=kv._stream, pre=kv._pre, js=kv._js, direct=kv._direct)

    async def _guard(self, operation: str, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except UNANSWERED as exc:
            raise store_unavailable(self._name, operation, exc) from None

    async def get(
        self, key: str, revision: int | None = None, validate_keys: bool = True
    ) -> KeyValue.Entry:
        return await self._guard("get", super().get(key, revision, validate_keys))

    async def put(self, key: str, value: bytes, validate_keys: bool = True) -> int:
        return await self._guard("put", super().put(key, value, validate_keys))

    async def create(
        self, key: str, value: bytes, validate_keys: bool = True, msg_ttl: float | None = None
    ) -> int:
        return await self._guard("create", super().create(key, value, validate_keys, msg_ttl))

    async def update(
        self, key: str, value: bytes, last: int | None = None, validate_keys: bool = True
    ) -> int:
        return await self._guard("update", super().update(key, value, last, validate_keys))

    async def delete(
        self,
        key: str,
        last: int | None = None,
        validate_keys: bool = True,
        msg_ttl: float | None = None,
    ) -> bool:
        return await self._guard("delete", super().delete(key, last, validate_keys, msg_ttl))


async def open_kv(js: JetStreamContext, spec: BucketSpec, replicas: int = 1) -> KeyValue:
    """The bucket (a GuardedKV), made with `bucket_config` if it does not exist yet (one
    that exists keeps its replicas: only the supervisor's `harden` changes them)."""
    try:
        return GuardedKV.of(await js.key_value(spec.bucket))
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        await js.add_stream(bucket_config(spec, replicas))
        log.info("bucket created", extra=fields(bucket=spec.bucket, replicas=replicas))
    except nats.js.errors.BadRequestError:
        pass  # another part made it between our look and our add
    return GuardedKV.of(await js.key_value(spec.bucket))


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
