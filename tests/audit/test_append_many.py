"""AuditWriter.append_many (a SignBatch's decisions, issue 19): the entries GroupSealer
splices are byte for byte what sealed_entry encodes, so the chain format and every
reader are unchanged; against a real nats-server, N decisions are N chained entries in
as few messages as the caps allow, durable when the call returns, and a store failure
is raised to the caller with the writer carrying on from the real head."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os

import pytest
from nats.aio.client import Client as NATS

from edgekms.audit import (
    COMPACT_VERSION,
    LONG_VERSION,
    AuditWriter,
    Decision,
    GroupSealer,
    _entry_body,
    canonical,
    entry_hash,
    now_rfc3339,
    parse_message,
    sealed_entry,
    split_message,
    stream_config,
    without_prev,
    writer_stream,
)
from edgekms.errors import Unavailable
from tests.audit.helpers import stored, verify_stream

# Strings that stress the splice: quotes, backslashes, control characters, non-ASCII,
# JSON's line separators, keys that sort before and after the entry's own fields.
AWKWARD = ['a"b', "back\\slash", "line\nbreak\x01", "naïve ✓", "\u2028\u2029", "", "outcome"]


@pytest.mark.parametrize("version", [LONG_VERSION, COMPACT_VERSION])
@pytest.mark.parametrize("text", AWKWARD)
def test_a_group_entry_is_byte_identical_to_a_lone_one(text: str, version: str) -> None:
    prev = os.urandom(32)
    time = now_rfc3339()
    details = {"via": text, text or "k": "v", "algorithm": "ecdsa", "zz": text, "p": text}
    sealer = GroupSealer("broker", "Sign", f"client {text}", text, time, version)
    raw, link = sealer.seal(Decision(text or "ok", text, text, details), prev)
    entry, expected = sealed_entry(
        version=version,
        writer="broker",
        action="Sign",
        outcome=text or "ok",
        prev_hash=prev,
        client=f"client {text}",
        role=text,
        target=text,
        request_id=text,
        details=details,
        time=time,
    )
    assert raw == expected
    assert link.hex() == entry["hash"]
    if version == COMPACT_VERSION:  # a batch item after the first: the link left out
        inner, _ = sealer.seal(Decision(text or "ok", text, text, details), prev, False)
        assert inner == without_prev(expected) and b'"p":' not in inner[-80:]


def test_entries_without_details_and_with_shared_details_seal_alike() -> None:
    prev = bytes(32)
    sealer = GroupSealer("broker", "Sign", "c", "r", now_rfc3339())
    shared = {"via": "SignBatch:x"}
    first, link = sealer.seal(Decision("ok", "k", "1", shared), prev)
    second, _ = sealer.seal(Decision("ok", "k", "1", dict(shared)), prev)
    assert first == second  # cached details give the same bytes
    bare, _ = sealer.seal(Decision("ok"), link)
    assert parse_message(bare)[0]["details"] == {}


async def test_many_decisions_are_many_chained_entries_in_few_messages(nc: NATS) -> None:
    js = nc.jetstream()
    writer = AuditWriter(js, "broker")
    await writer.ensure_stream()
    lone = await writer.append(
        "Sign", "ok", client="alice", role="signer", target="k", request_id="r", details={"a": "1"}
    )
    decisions = [
        Decision("ok" if i % 7 else "key.not_found", f"key{i}", f"batch.{i}", {"via": "B"})
        for i in range(300)
    ]
    await writer.append_many("Sign", decisions, client="alice", role="signer")
    records = await stored(js)
    entries = [e for _, raw, _ in records for e in parse_message(raw)]
    assert len(entries) == 301
    group = entries[1:]
    # Several decisions per message, fewer messages than entries.
    assert len(records) - 1 < 300 and all(split_message(raw) for _, raw, _ in records[1:])
    assert [e["request_id"] for e in group] == [f"batch.{i}" for i in range(300)]
    assert [e["outcome"] for e in group] == [d.outcome for d in decisions]
    assert {e["action"] for e in group} == {"Sign"}
    assert {(e["actor"]["client"], e["actor"]["role"]) for e in group} == {("alice", "signer")}
    assert group[0]["prev_hash"] == lone.entry["hash"]
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(group))
    # The same fields as an entry `append` makes, nothing more, nothing less.
    assert set(group[0]) == set(lone.entry)
    report = await verify_stream(js)
    assert report.ok, report.problems
    assert report.entries == 301
    # The writer's head moved past the group: a later append chains to its last entry.
    after = await writer.append("GetKey", "ok")
    assert after.entry["prev_hash"] == group[-1]["hash"]


async def test_groups_and_lone_appends_interleave_on_one_chain(nc: NATS) -> None:
    js = nc.jetstream()
    writer = AuditWriter(js, "broker")
    await writer.ensure_stream()
    groups = [[Decision("ok", f"g{g}", f"g{g}.{i}") for i in range(50)] for g in range(4)]
    await asyncio.gather(
        *(writer.append_many("Sign", group, client=f"c{g}") for g, group in enumerate(groups)),
        *(writer.append("Sign", "ok", request_id=f"lone{i}") for i in range(20)),
    )
    report = await verify_stream(js)
    assert report.ok, report.problems
    assert report.entries == 4 * 50 + 20
    ids = [e["request_id"] for _, raw, _ in await stored(js) for e in parse_message(raw)]
    for g in range(4):  # each group's entries keep their order
        mine = [i for i in ids if i.startswith(f"g{g}.")]
        assert mine == [f"g{g}.{i}" for i in range(50)]


async def test_an_empty_group_stores_nothing(nc: NATS) -> None:
    writer = AuditWriter(nc.jetstream(), "broker")
    await writer.ensure_stream()
    await writer.append_many("Sign", [])
    info = await nc.jetstream().stream_info(writer_stream("broker"))
    assert info.state.messages == 0


async def test_a_group_the_store_refuses_raises_and_the_chain_goes_on(nc: NATS) -> None:
    # The stream takes a lone entry but no message of several: the group cannot be stored.
    js = nc.jetstream()
    config = stream_config("broker")
    config.max_msg_size = 2048
    await js.add_stream(config)
    writer = AuditWriter(js, "broker")
    first = await writer.append("CreateKey", "ok", target="k")
    with pytest.raises(Unavailable) as refused:
        await writer.append_many("Sign", [Decision("ok", f"k{i}") for i in range(12)])
    assert refused.value.reason == "audit.unavailable"
    assert [seq for seq, _, _ in await stored(js)] == [first.seq]
    after = await writer.append("GetKey", "ok")
    assert after.entry["prev_hash"] == first.entry["hash"]
    assert (await verify_stream(js)).ok


@pytest.mark.parametrize("text", AWKWARD)
def test_the_spliced_hash_body_is_canonical_json(text: str) -> None:
    """entry_hash splices the body of a well-shaped entry instead of sorting it through
    the JSON encoder (it runs once per stored decision in the broker's chain check):
    the bytes must be canonical()'s, for entries as stored and as parsed back (the
    long form, "2"; the compact form's hashing: tests/audit/test_compact.py)."""
    entry, raw = sealed_entry(
        version=LONG_VERSION,
        writer=text or "w",
        action=text,
        outcome=text,
        prev_hash=os.urandom(32),
        client=text,
        role=text,
        target=text,
        request_id=text,
        details={text: text, "via": text, "A": "1"},
    )
    body = {k: v for k, v in entry.items() if k != "hash"}
    assert _entry_body(entry) == canonical(body)
    assert entry_hash(json.loads(raw)) == entry["hash"]


def test_an_entry_of_another_shape_is_hashed_through_canonical_json() -> None:
    entry, _ = sealed_entry(
        writer="broker", action="Sign", outcome="ok", prev_hash=bytes(32), version=LONG_VERSION
    )
    for change in (
        {"details": {"n": 1}},
        {"actor": {"client": "c", "role": "r", "extra": "x"}},
        {"target": 7},
        {"extra": "field"},
    ):
        odd = {**entry, **change}
        assert _entry_body(odd) is None
        body = {k: v for k, v in odd.items() if k != "hash"}
        expected = hashlib.sha256(bytes(32) + canonical(body)).hexdigest()
        assert entry_hash(odd) == expected
