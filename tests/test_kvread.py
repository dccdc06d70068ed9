"""edgekms.kvread against a real nats-server: a snapshot holds every key's latest entry
however soon it follows the writes, and a follower started from the snapshot's last
revision sees each later change exactly once."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from edgekms import kvread
from mgmt.natsserver import NatsServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def bucket(nats_server: NatsServer) -> AsyncIterator[tuple[Any, Any, str]]:
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    js = nc.jetstream(timeout=5)
    name = f"kvread_{secrets.token_hex(4)}"
    kv = await js.create_key_value(bucket=name, history=5)
    yield js, kv, name
    await js.delete_key_value(name)
    await nc.close()


async def test_an_empty_bucket_reads_as_nothing(bucket: tuple[Any, Any, str]) -> None:
    js, _, name = bucket
    assert await kvread.snapshot(js, name) == ([], 0)


async def test_snapshot_is_the_latest_entry_of_each_key(bucket: tuple[Any, Any, str]) -> None:
    js, kv, name = bucket
    await kv.put("cert.a", b"a1")
    await kv.put("cert.b", b"b1")
    await kv.put("cert.a", b"a2")
    await kv.put("other", b"x")
    await kv.delete("cert.b")
    entries, last = await kvread.snapshot(js, name, "cert.>")
    assert [(e.key, e.value, kvread.is_removal(e)) for e in entries] == [
        ("cert.a", b"a2", False),
        ("cert.b", b"", True),
    ]
    assert last == (await kv.status()).values == 5  # the delete marker is revision 5
    assert [e.revision for e in entries] == [3, 5]
    # A purge is a removal as well.
    await kv.purge("cert.a")
    entries, _ = await kvread.snapshot(js, name, "cert.>")
    assert {e.key: kvread.is_removal(e) for e in entries} == {"cert.a": True, "cert.b": True}


async def test_history_is_every_revision_of_one_key_oldest_first(
    bucket: tuple[Any, Any, str],
) -> None:
    js, kv, name = bucket
    await kv.put("k", b"v1")
    await kv.put("other", b"x")
    await kv.put("k", b"v2")
    await kv.delete("k")
    await kv.put("k", b"v3")
    entries = await kvread.history(js, name, "k")
    assert [(e.revision, e.value, kvread.is_removal(e)) for e in entries] == [
        (1, b"v1", False),
        (3, b"v2", False),
        (4, b"", True),
        (5, b"v3", False),
    ]
    assert await kvread.history(js, name, "never-written") == []


async def test_snapshot_right_after_each_write_is_complete(
    bucket: tuple[Any, Any, str],
) -> None:
    """The case KeyValue.watch() gets wrong now and then (nats-io/nats.py#842): a
    listing started as soon as a write is acknowledged must include it."""
    js, kv, name = bucket
    for i in range(60):
        await kv.put(f"cert.{i:03d}", str(i).encode())
        entries, last = await kvread.snapshot(js, name, "cert.>")
        assert [e.key for e in entries] == [f"cert.{j:03d}" for j in range(i + 1)]
        assert last == i + 1


async def test_snapshot_larger_than_one_fetch(bucket: tuple[Any, Any, str]) -> None:
    js, kv, name = bucket
    count = 2 * kvread._FETCH_BATCH + 7
    await asyncio.gather(*(kv.put(f"k.{i}", b"v") for i in range(count)))
    entries, last = await kvread.snapshot(js, name)
    assert sorted(e.key for e in entries) == sorted(f"k.{i}" for i in range(count))
    assert last == count


async def test_snapshot_leaves_no_consumer(bucket: tuple[Any, Any, str]) -> None:
    js, kv, name = bucket
    await kv.put("a", b"1")
    for _ in range(3):
        await kvread.snapshot(js, name)
    assert (await js.stream_info(f"KV_{name}")).state.consumer_count == 0


async def test_follow_continues_where_the_snapshot_ended(
    bucket: tuple[Any, Any, str],
) -> None:
    js, kv, name = bucket
    await kv.put("a", b"1")
    await kv.put("b", b"1")
    entries, last = await kvread.snapshot(js, name)
    assert [e.key for e in entries] == ["a", "b"]
    # Written after the snapshot but before the follower subscribes: not lost.
    await kv.put("a", b"2")
    changes = kvread.follow(js, name, last)
    seen = [await asyncio.wait_for(anext(changes), 5)]
    await kv.delete("b")
    await kv.put("c", b"1")
    seen += [await asyncio.wait_for(anext(changes), 5) for _ in range(2)]
    assert [(e.key, e.value, kvread.is_removal(e), e.revision) for e in seen] == [
        ("a", b"2", False, 3),
        ("b", b"", True, 4),
        ("c", b"1", False, 5),
    ]
    # Nothing from the snapshot came again, and nothing more is pending.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(changes), 0.3)
    await changes.aclose()
    assert (await js.stream_info(f"KV_{name}")).state.consumer_count == 0


async def test_follow_from_an_empty_snapshot_sees_the_first_write(
    bucket: tuple[Any, Any, str],
) -> None:
    js, kv, name = bucket
    _, last = await kvread.snapshot(js, name)
    await kv.put("first", b"1")
    changes = kvread.follow(js, name, last)
    entry = await asyncio.wait_for(anext(changes), 5)
    assert (entry.key, entry.value, entry.revision) == ("first", b"1", 1)
    await changes.aclose()


async def test_changes_after_a_revision_bring_a_copy_up_to_date(
    bucket: tuple[Any, Any, str],
) -> None:
    """snapshot(after=...) is what the CA's catalog catches up with: every change since,
    in order, delete markers included; nothing at all when nothing changed."""
    js, kv, name = bucket
    await kv.put("cert.a", b"a1")
    await kv.put("cert.b", b"b1")
    copy: dict[str, bytes | None] = {}
    entries, last = await kvread.snapshot(js, name, "cert.>")
    for entry in entries:
        copy[entry.key] = entry.value
    assert await kvread.snapshot(js, name, "cert.>", after=last) == ([], 0)
    await kv.put("cert.a", b"a2")
    await kv.put("other", b"not a cert")
    await kv.delete("cert.b")
    await kv.put("cert.c", b"c1")
    seen: list[Any] = []
    changes, newest = await kvread.snapshot(js, name, "cert.>", after=last, each=seen.append)
    assert changes == [] and newest == (await kv.status()).values
    assert [(e.key, e.value, kvread.is_removal(e)) for e in seen] == [
        ("cert.a", b"a2", False),
        ("cert.b", b"", True),
        ("cert.c", b"c1", False),
    ]
    for entry in seen:
        if kvread.is_removal(entry):
            copy.pop(entry.key, None)
        else:
            copy[entry.key] = entry.value
    fresh, _ = await kvread.snapshot(js, name, "cert.>")
    assert copy == {e.key: e.value for e in fresh if not kvread.is_removal(e)}
