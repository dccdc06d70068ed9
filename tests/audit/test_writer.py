"""AuditWriter against a real nats-server: a chain per writer (replicas of one writer
racing on it without forking), tampering through the raw JetStream API caught and named,
and no entry stored when the stream is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, StreamConfig

from edgekms.audit import (
    LEGACY_STREAM,
    AuditWriter,
    encode_message,
    harden_stream,
    parse_entry,
    parse_message,
    split_message,
    stored_form,
    stream_config,
    writer_stream,
)
from edgekms.errors import Unavailable
from tests.audit.helpers import deletable_stream_config, rewrite, stored, verify_stream
from tests.conftest import start_nats


async def test_the_stream_refuses_deletion_and_rollup(nc: NATS) -> None:
    """Issue 11, item 4: the stream itself takes no delete of an entry and no rollup.
    Purge from the front is the archiver's (issue 21): the stream allows it, the bus
    grants it to the broker alone (tests/natsperm/test_tables.py)."""
    await _fill(nc, 3)
    js = nc.jetstream()
    with pytest.raises(nats.js.errors.APIError) as info:
        await js.delete_msg(writer_stream("test"), 2)
    assert "not permitted" in str(info.value)
    with pytest.raises(nats.js.errors.APIError):
        await js.publish("kms.audit.test", b"{}", headers={"Nats-Rollup": "all"})
    assert [seq for seq, _, _ in await stored(js)] == [1, 2, 3]
    assert (await verify_stream(js)).ok
    assert not (await js.stream_info(writer_stream("test"))).config.deny_purge


async def test_a_stream_made_before_retention_keeps_deny_purge_at_setup(nc: NATS) -> None:
    """nats-server cannot cancel deny_purge (err 10052): setup must leave it, not fail."""
    js = nc.jetstream()
    old = dataclasses.replace(stream_config("test"), deny_purge=True)
    await js.add_stream(old)
    await harden_stream(js, ("test",))
    assert (await js.stream_info(writer_stream("test"))).config.deny_purge


async def _fill(nc: NATS, n: int) -> AuditWriter:
    writer = AuditWriter(nc.jetstream(), "test")
    await writer.ensure_stream()
    for i in range(n):
        await writer.append("Sign", "ok", client="alice", role="signer", target=f"key{i}")
    return writer


async def test_entries_carry_the_fields_and_chain(nc: NATS) -> None:
    writer = AuditWriter(nc.jetstream(), "broker")
    await writer.ensure_stream()
    first = await writer.append(
        "Sign",
        "authz.policy_denied",
        client="bob",
        role="signer",
        target="web",
        request_id="r1",
        details={"algorithm": "ecdsa_sha256"},
    )
    second = await writer.append("DisableKey", "ok", client="admin", role="admin", target="web")
    assert (first.seq, second.seq) == (1, 2)
    (s1, raw1, subject1), (_, raw2, _) = await stored(nc.jetstream())
    entry = parse_entry(raw1)
    assert subject1 == "kms.audit.broker" and s1 == 1
    assert entry["actor"] == {"client": "bob", "role": "signer"}
    assert (entry["action"], entry["target"], entry["outcome"]) == (
        "Sign",
        "web",
        "authz.policy_denied",
    )
    assert entry["request_id"] == "r1" and entry["details"] == {"algorithm": "ecdsa_sha256"}
    assert entry["prev_hash"] == "00" * 32
    assert parse_entry(raw2)["prev_hash"] == entry["hash"]
    assert (await verify_stream(nc.jetstream())).ok


async def test_writers_and_replicas_chain_without_forks(tmp_path: Path) -> None:
    """Two replicas of writer w0 (two connections) race on its chain; w1 has its own."""
    server = start_nats(tmp_path / "nats")
    conns = [await nats.connect(server.url) for _ in range(2)]
    try:
        writers = [
            AuditWriter(conns[0].jetstream(), "w0"),
            AuditWriter(conns[1].jetstream(), "w0"),
            AuditWriter(conns[1].jetstream(), "w1"),
        ]
        await writers[0].ensure_stream()
        await writers[1].ensure_stream()
        await writers[2].ensure_stream()

        async def busy(writer: AuditWriter) -> None:
            for i in range(60):
                await writer.append("Sign", "ok", target=f"{writer.writer}-{i}")

        await asyncio.gather(*(busy(w) for w in writers for _ in range(2)))
        report = await verify_stream(conns[0].jetstream())
        assert report.ok, report.problems
        # Group commit: two tasks per writer share messages, so fewer messages than entries.
        assert report.entries == 360 and report.messages <= 360
        assert set(report.streams) == {writer_stream("w0"), writer_stream("w1")}
        # Each writer in its own stream, on its own subject.
        for name in ("w0", "w1"):
            subjects = {s for _, _, s in await stored(conns[0].jetstream(), writer_stream(name))}
            assert subjects == {f"kms.audit.{name}"}
    finally:
        for c in conns:
            await c.close()
        server.stop()


async def test_deleted_entry_is_named(nc: NATS) -> None:
    await nc.jetstream().add_stream(deletable_stream_config())
    await _fill(nc, 6)
    await nc.jetstream().delete_msg(writer_stream("test"), 4)
    report = await verify_stream(nc.jetstream())
    assert [(p.seq, p.kind) for p in report.problems] == [(4, "missing")]


async def test_deleted_last_entry_is_named_and_writing_goes_on(nc: NATS) -> None:
    await nc.jetstream().add_stream(deletable_stream_config())
    await _fill(nc, 4)
    await nc.jetstream().delete_msg(writer_stream("test"), 4)
    fresh = AuditWriter(nc.jetstream(), "test")  # no cached head: reads past the hole
    appended = await fresh.append("GetKey", "ok")
    assert appended.seq == 5
    report = await verify_stream(nc.jetstream())
    assert [(p.seq, p.kind) for p in report.problems] == [(4, "missing")]


async def test_tampered_entry_is_named(nc: NATS) -> None:
    await _fill(nc, 6)
    messages = [(raw, subject) for _, raw, subject in await stored(nc.jetstream())]
    entry = parse_entry(messages[2][0])
    entry["outcome"] = "ok"
    entry["actor"]["client"] = "mallory"
    messages[2] = (json.dumps(stored_form(entry)).encode(), messages[2][1])
    await rewrite(nc.jetstream(), messages)
    report = await verify_stream(nc.jetstream())
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "hash_mismatch")]


async def test_reordered_entries_are_named(nc: NATS) -> None:
    await _fill(nc, 6)
    messages = [(raw, subject) for _, raw, subject in await stored(nc.jetstream())]
    messages[3], messages[4] = messages[4], messages[3]
    await rewrite(nc.jetstream(), messages)
    report = await verify_stream(nc.jetstream())
    assert report.problems[0].seq == 4 and report.problems[0].kind == "prev_mismatch"


async def test_forged_append_is_named(nc: NATS) -> None:
    await _fill(nc, 3)
    (_, raw, _) = (await stored(nc.jetstream()))[0]
    await nc.jetstream().publish("kms.audit.test", raw)  # a replayed entry
    report = await verify_stream(nc.jetstream())
    assert [(p.seq, p.kind) for p in report.problems] == [(4, "prev_mismatch")]


async def test_no_stream_fails_closed(nc: NATS) -> None:
    writer = await _fill(nc, 2)
    await nc.jetstream().delete_stream(writer_stream("test"))
    with pytest.raises(Unavailable) as caught:
        await writer.append("Sign", "ok")
    assert caught.value.reason == "audit.unavailable"
    with pytest.raises(Unavailable):
        await AuditWriter(nc.jetstream(), "other").append("Sign", "ok")  # no stream made


# -- group commit ------------------------------------------------------------------------


async def test_concurrent_appends_share_messages_and_chain(nc: NATS) -> None:
    writer = AuditWriter(nc.jetstream(), "broker")
    await writer.ensure_stream()
    results = await asyncio.gather(
        *(writer.append("Sign", "ok", target=f"k{i}", request_id=f"r{i}") for i in range(200))
    )
    records = await stored(nc.jetstream())
    report = await verify_stream(nc.jetstream())
    assert report.ok, report.problems
    assert report.entries == 200 and report.messages == len(records) < 200
    assert any(split_message(raw) is not None for _, raw, _ in records)
    # Each caller learns where its own entry went, and the entries are chained in order.
    by_place = {(r.seq, r.index): r.entry for r in results}
    assert len(by_place) == 200
    for seq, raw, _ in records:
        items = parse_message(raw)  # each in the long form, as the writer returned it
        for index, item in enumerate(items):
            assert by_place[(seq, index)] == item
    ordered = [by_place[k] for k in sorted(by_place)]
    assert [e["request_id"] for e in ordered] == [f"r{i}" for i in range(200)]
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(ordered))
    # A lone append after the burst is stored as a plain entry, as before group commit.
    last = await writer.append("GetKey", "ok")
    assert last.index == 0 and split_message((await stored(nc.jetstream()))[-1][1]) is None
    assert (await verify_stream(nc.jetstream())).ok


async def test_batch_respects_entry_cap(nc: NATS) -> None:
    writer = AuditWriter(nc.jetstream(), "broker", max_batch_entries=7)
    await writer.ensure_stream()
    await asyncio.gather(*(writer.append("Sign", "ok", target=f"k{i}") for i in range(30)))
    sizes = [len(split_message(raw) or [raw]) for _, raw, _ in await stored(nc.jetstream())]
    assert sum(sizes) == 30 and max(sizes) == 7
    assert (await verify_stream(nc.jetstream())).ok


async def test_tampered_entry_inside_a_batch_is_named_with_its_index(nc: NATS) -> None:
    writer = AuditWriter(nc.jetstream(), "broker")
    await writer.ensure_stream()
    await writer.append("CreateKey", "ok", target="k")
    await asyncio.gather(*(writer.append("Sign", "ok", target=f"k{i}") for i in range(10)))
    messages = [(raw, subject) for _, raw, subject in await stored(nc.jetstream())]
    batch_at = next(i for i, (raw, _) in enumerate(messages) if split_message(raw))
    assert split_message(messages[batch_at][0]) is not None
    items = parse_message(messages[batch_at][0])
    assert len(items) > 4
    items[3]["outcome"] = "authz.policy_denied"
    messages[batch_at] = (encode_message(items), messages[batch_at][1])
    await rewrite(nc.jetstream(), messages, "broker")
    report = await verify_stream(nc.jetstream())
    assert [(p.seq, p.index, p.kind) for p in report.problems] == [
        (batch_at + 1, 3, "hash_mismatch")
    ]
    assert report.problems[0].where == f"KMS_AUDIT_BROKER {batch_at + 1} #3"
    assert f"entry {batch_at + 1} #3" in report.problems[0].message


async def test_failed_batch_fails_every_caller_and_stores_nothing(nc: NATS) -> None:
    # The stream takes a lone entry but not a batch of 12: the server rejects the whole
    # message, with the stream intact, the way a real store failure would.
    js = nc.jetstream()
    config = stream_config("broker")
    config.max_msg_size = 2048
    await js.add_stream(config)
    writer = AuditWriter(js, "broker")
    first = await writer.append("CreateKey", "ok", target="k")
    outcomes = await asyncio.gather(
        *(writer.append("Sign", "ok", target=f"k{i}") for i in range(12)),
        return_exceptions=True,
    )
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, Unavailable)} == {"audit.unavailable"}
    records = await stored(js)
    assert [seq for seq, _, _ in records] == [first.seq]
    assert (await js.stream_info(writer_stream("broker"))).state.last_seq == first.seq
    # The writer carries on from the real head: nothing half-done is chained to.
    after = await writer.append("GetKey", "ok")
    assert after.seq == first.seq + 1 and after.entry["prev_hash"] == first.entry["hash"]
    assert (await verify_stream(js)).ok


async def test_a_stream_an_older_version_made_is_closed_and_chains_go_on(nc: NATS) -> None:
    """`kmsctl up` closes the old shared KMS_AUDIT (deletable, no limits, every writer
    in it), keeping its entries, and gives each writer a stream whose first entry links
    to that writer's last one in the old stream: verify walks both, unbroken."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=LEGACY_STREAM,
            subjects=["kms.audit.>"],
            discard=DiscardPolicy.OLD,
            max_bytes=-1,
            allow_direct=True,
        )
    )
    # Entries as an older version wrote them: two writers in the one stream.
    old = {w: AuditWriter(js, w) for w in ("broker", "ca")}
    for w in old.values():
        w.stream = LEGACY_STREAM
    for i in range(3):
        for w in old.values():
            await w.append("Sign", "ok", target=f"old{i}")
    assert await harden_stream(js, ["broker", "ca"])
    legacy = await js.stream_info(LEGACY_STREAM)
    assert legacy.config.subjects == ["kms.audit-legacy.closed"]
    assert legacy.config.deny_delete and legacy.config.deny_purge
    assert legacy.state.messages == 6  # every old entry kept
    config = (await js.stream_info(writer_stream("ca"))).config
    assert config.subjects == ["kms.audit.ca"] and config.discard == DiscardPolicy.NEW
    assert config.max_bytes == stream_config("ca").max_bytes
    assert not await harden_stream(js, ["broker", "ca"])  # once is enough
    for writer in ("broker", "ca"):
        fresh = AuditWriter(js, writer)
        appended = await fresh.append("Sign", "ok", target="new")
        assert appended.seq == 1  # its own stream, numbered from 1 ...
        # ... chained to its last entry in the closed stream.
        assert appended.entry["prev_hash"] == old[writer]._head[1].hex()  # type: ignore[index]
    report = await verify_stream(js)
    assert report.ok, report.problems
    assert report.entries == 8
    assert list(report.streams) == [LEGACY_STREAM, writer_stream("broker"), writer_stream("ca")]
