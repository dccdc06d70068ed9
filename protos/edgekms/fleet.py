"""A fleet of devices as JetStream leaf nodes: names, the hub's audit copies, their check.

Each device runs its own nats-server as a leaf node of the hub, with its own JetStream
domain (`dev-<id>`): its keys, its crypto service and its audit streams stay on the
device and keep working while the uplink is down. The hub holds a copy of every device's
audit chain in one stream per device, KMS_FLEET_<ID>, which *sources* the device's
KMS_AUDIT_<WRITER> streams across the leaf connection (through the device domain's API,
`$JS.dev-<id>.API`). Sourcing is nats-server's own catch-up: the hub keeps a consumer on
each device stream and, after a cut, resumes from the last sequence it holds, so nothing
here replays or reorders anything.

The hub stream has no subjects of its own, so nobody can publish into it; sourced
messages keep their subject (kms.audit.<writer>) and carry a `Nats-Stream-Source` header
naming the device stream and sequence they came from. `verify_device` walks the copy with
the same ChainVerifier as `kmsctl audit verify` and also checks each entry's origin: that
it was sourced (not stored at the hub by someone else), from the stream of the writer its
subject names, and that each device stream's sequences arrive whole and in order.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from edgekms.audit import (
    MAX_MESSAGE_BYTES,
    ChainReport,
    ChainVerifier,
    subject_writer,
    writer_stream,
)
from edgekms.errors import InvalidArgument, NotFound, Unavailable
from edgekms.logs import fields

log = logging.getLogger(__name__)

# A device id is a subject token, part of a stream name and of a JetStream domain.
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
FLEET_STREAM_PREFIX = "KMS_FLEET_"
FLEET_SUBJECT_PREFIX = "kms.fleet"
DOMAIN_PREFIX = "dev-"
SOURCE_HEADER = "Nats-Stream-Source"
# What the hub keeps of one device's audit: the device streams' own defaults would be
# several GiB per writer; a hub with many devices sizes this per fleet.
DEFAULT_FLEET_MAX_BYTES = 1024**3


def check_device(device: str) -> str:
    """`device` if it is a device id, else InvalidArgument("fleet.device_invalid")."""
    if not isinstance(device, str) or not DEVICE_ID_RE.match(device):
        raise InvalidArgument(
            "fleet.device_invalid",
            f"{str(device)[:40]!r} is not a device id: lowercase letters, digits and '-', "
            "at most 32, starting with a letter or digit",
        )
    return device


def device_domain(device: str) -> str:
    """The device's JetStream domain: its nats-server's `jetstream { domain }`."""
    return DOMAIN_PREFIX + check_device(device)


def device_api(device: str) -> str:
    """The API prefix through which the hub reaches the device's JetStream."""
    return f"$JS.{device_domain(device)}.API"


def fleet_stream(device: str) -> str:
    """The hub stream holding the device's audit chain."""
    return FLEET_STREAM_PREFIX + check_device(device).upper()


def deliver_prefix(device: str) -> str:
    """Where the device delivers sourced entries into the hub. The device's hub user may
    publish here and nowhere near another device's prefix (mgmt.fleet)."""
    return f"{FLEET_SUBJECT_PREFIX}.{check_device(device)}.src"


def fleet_stream_config(
    device: str,
    writers: tuple[str, ...] | list[str],
    max_bytes: int = DEFAULT_FLEET_MAX_BYTES,
    replicas: int = 1,
) -> api.StreamConfig:
    """The hub's copy of one device's audit: no subjects (nothing publishes into it), one
    source per device writer stream, append-only like the device streams themselves."""
    if not writers:
        raise InvalidArgument("fleet.writers_missing", "a device's audit needs its writers")
    sources = [
        api.StreamSource(
            name=writer_stream(writer),
            external=api.ExternalStream(api=device_api(device), deliver=deliver_prefix(device)),
        )
        for writer in sorted(set(writers))
    ]
    return api.StreamConfig(
        name=fleet_stream(device),
        sources=sources,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW,
        max_bytes=max_bytes,
        max_msg_size=MAX_MESSAGE_BYTES * 2,
        max_age=0,
        num_replicas=replicas,
        allow_direct=True,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
    )


async def source_device(
    js: JetStreamContext,
    device: str,
    writers: tuple[str, ...] | list[str],
    max_bytes: int = DEFAULT_FLEET_MAX_BYTES,
    replicas: int = 1,
) -> None:
    """Make the hub's copy of a device's audit, or add writers to an existing one (the
    sources already there are kept: dropping one would stop copying that chain)."""
    config = fleet_stream_config(device, writers, max_bytes, replicas)
    try:
        info = await js.stream_info(fleet_stream(device))
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        log.info(
            "fleet device sourced",
            extra=fields(device=device, stream=config.name, writers=",".join(sorted(writers))),
        )
        return
    have = {s.name for s in info.config.sources or []}
    want = {s.name for s in config.sources or []}
    if want <= have:
        return
    merged = [
        *(info.config.sources or []),
        *(s for s in config.sources or [] if s.name not in have),
    ]
    info.config.sources = merged
    await js.update_stream(info.config)
    log.info(
        "fleet device sources added",
        extra=fields(device=device, stream=config.name, added=",".join(sorted(want - have))),
    )


@dataclass(frozen=True)
class Origin:
    """Where a sourced message came from: the device stream and its sequence there."""

    stream: str
    seq: int


def parse_origin(value: str | None) -> Origin | None:
    """The `Nats-Stream-Source` header ("KMS_AUDIT_BROKER:<id> 12 ..."), or None."""
    if not value:
        return None
    parts = value.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return Origin(parts[0].split(":", 1)[0], int(parts[1]))


class FleetVerifier:
    """ChainVerifier over the hub's copy, plus each entry's origin (see module doc)."""

    def __init__(self, device: str) -> None:
        self.stream = fleet_stream(device)
        self.chain = ChainVerifier()
        self.chain.begin_stream(self.stream)
        self._next: dict[str, int] = {}  # device stream -> the origin sequence due next

    def feed(self, seq: int, raw: bytes, subject: str, source: str | None) -> None:
        self.chain.feed(seq, raw, subject)
        origin = parse_origin(source)
        if origin is None:
            self.chain.add_problem(
                seq, "unsourced", f"{self.stream} {seq} was stored at the hub, not sourced"
            )
            return
        writer = subject_writer(subject)
        if writer is None or writer_stream(writer) != origin.stream:
            self.chain.add_problem(
                seq,
                "writer_mismatch",
                f"{self.stream} {seq} came from {origin.stream} but is stored on {subject!r}",
            )
        due = self._next.get(origin.stream, 1)
        if origin.seq < due:
            self.chain.add_problem(
                seq,
                "out_of_order",
                f"{self.stream} {seq}: {origin.stream} entry {origin.seq} again (expected {due})",
            )
            return
        if origin.seq > due:
            self.chain.add_problem(
                seq,
                "missing",
                f"{self.stream} {seq}: {origin.stream} entries {due}..{origin.seq - 1} "
                "never reached the hub",
            )
        self._next[origin.stream] = origin.seq + 1

    def finish(self, last_seq: int) -> ChainReport:
        return self.chain.finish(last_seq)


async def verify_device(
    js: JetStreamContext, device: str, idle_timeout: float = 2.0
) -> ChainReport:
    """Walk the hub's copy of `device`'s audit from its first entry to the last stored
    when the walk began. NotFound("fleet.device_unknown") if the hub has no copy;
    Unavailable("fleet.unavailable") if the hub's JetStream does not answer."""
    verifier = FleetVerifier(device)
    try:
        info = await js.stream_info(verifier.stream)
    except nats.js.errors.NotFoundError:
        raise NotFound(
            "fleet.device_unknown", f"the hub holds no audit for device {device!r}"
        ) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable("fleet.unavailable", f"the hub's JetStream: {exc}") from None
    last = info.state.last_seq
    if info.state.messages == 0:
        return verifier.finish(last)
    sub = await js.subscribe(
        ">",
        stream=verifier.stream,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        inactive_threshold=30.0,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except nats.errors.TimeoutError:
                break  # what is left up to `last` was deleted: finish() reports it
            seq = msg.metadata.sequence.stream
            if seq > last:
                break
            source = (msg.headers or {}).get(SOURCE_HEADER)
            verifier.feed(seq, bytes(msg.data), msg.subject, source)
            if seq >= last:
                break
    except (nats.errors.Error, TimeoutError) as exc:
        raise Unavailable("fleet.unavailable", f"reading {verifier.stream}: {exc}") from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return verifier.finish(last)
