"""Compact audit entries (format "3", issue 21 "Cheaper records"): the same record in
fewer bytes, hashed so the chain is as strong as before, read back into the long form
every consumer knows, and chained on from format "2" entries unbroken; and, against a
real nats-server, a writer that stored format "2" followed by one that stores "3" gives
one chain `verify` proves whole, in fewer bytes per entry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest
from nats.aio.client import Client as NATS

from edgekms.audit import (
    COMPACT_VERSION,
    GENESIS,
    LONG_VERSION,
    AuditWriter,
    Decision,
    _compact_body,
    canonical,
    encode_message,
    entry_hash,
    join_message,
    link_of,
    link_text,
    parse_entry,
    parse_link,
    parse_message,
    sealed_entry,
    split_message,
    stored_form,
    verify_chain,
    without_prev,
    writer_stream,
)
from tests.audit.helpers import stored, verify_stream

SIGN = "/edgekms.v1.KeyService/Sign"


def _sign_entry(prev: bytes, version: str, i: int = 0) -> tuple[dict[str, object], bytes]:
    """A Sign decision as the broker records one (the figure `make bench` measures)."""
    return sealed_entry(
        writer="broker",
        action=SIGN,
        outcome="ok",
        prev_hash=prev,
        client="spiffe://edgekms/client/ops-admin",
        role="admin",
        target=f"bench-key-{i}",
        request_id=os.urandom(16).hex(),
        details={"algorithm": "ecdsa_sha256"},
        version=version,
    )


def _chain(n: int, prev: bytes = GENESIS) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        entry, _ = _sign_entry(prev, COMPACT_VERSION, i)
        out.append(entry)
        prev = bytes.fromhex(str(entry["hash"]))
    return out


def test_a_compact_entry_is_the_same_record_in_fewer_bytes() -> None:
    prev = os.urandom(32)
    long_entry, long_raw = _sign_entry(prev, LONG_VERSION)
    entry, raw = _sign_entry(prev, COMPACT_VERSION)
    stored_obj = json.loads(raw)
    assert set(stored_obj) == set("acdhinoprtvw") and stored_obj["v"] == "3"
    assert parse_link(stored_obj["p"]) == prev and len(stored_obj["h"]) == 43
    # Read back, it is the long form with every field a consumer reads.
    assert parse_entry(raw) == entry and set(entry) == set(long_entry)
    assert entry["prev_hash"] == prev.hex() and link_of(raw).hex() == entry["hash"]
    assert raw == canonical(stored_form(entry))
    # The measured cut for one Sign entry: the two links and the names.
    assert len(long_raw) - len(raw) >= 100, (len(long_raw), len(raw))


def test_the_hash_starts_with_the_link_and_seals_every_other_field() -> None:
    prev = os.urandom(32)
    entry, raw = _sign_entry(prev, COMPACT_VERSION)
    body = {k: v for k, v in json.loads(raw).items() if k not in ("h", "p")}
    assert entry["hash"] == hashlib.sha256(prev + canonical(body)).hexdigest()
    assert entry_hash(entry) == entry["hash"]
    for name, value in (
        ("outcome", "authz.policy_denied"),
        ("target", "other"),
        ("time", "2000-01-01T00:00:00.000000Z"),
        ("writer", "ca"),
        ("details", {"algorithm": "rsa"}),
        ("actor", {"client": "mallory", "role": "admin"}),
        ("prev_hash", os.urandom(32).hex()),
    ):
        assert entry_hash({**entry, name: value}) != entry["hash"], name
    # A long form that has no compact form (an extra field) matches no hash.
    assert entry_hash({**entry, "extra": "x"}) == ""


def test_hostile_fields_splice_to_the_canonical_bytes() -> None:
    """The writer splices "h" and "p" into the hashed bytes rather than encode twice:
    the result is canonical()'s whatever the fields hold (keys named like the links,
    quotes, the separators the splice looks for)."""
    hostile = ',"i":"x","r":"y","p":"z"}'
    prev = GENESIS
    raws = []
    for details in ({}, {"i": hostile, "p": hostile, "r": '"\\'}, {"h": "é\u2028\n"}):
        entry, raw = sealed_entry(
            writer=hostile,
            action=hostile,
            outcome=hostile,
            prev_hash=prev,
            client=hostile,
            role=hostile,
            target=hostile,
            request_id=hostile,
            details=details,
        )
        assert raw == canonical(stored_form(entry))
        assert parse_entry(raw) == entry and entry_hash(entry) == entry["hash"]
        raws.append(raw)
        prev = bytes.fromhex(str(entry["hash"]))
    entries = [parse_entry(r) for r in raws]
    joined = join_message([raws[0], *(without_prev(r) for r in raws[1:])])
    assert joined == encode_message(entries)
    assert parse_message(joined) == entries
    assert verify_chain([(1, joined)], 1).ok


def test_a_batch_stores_the_link_once_and_verifies() -> None:
    entries = _chain(6)
    raw = encode_message(entries[1:5])
    items = json.loads(raw)["batch"]
    assert "p" in items[0] and all("p" not in item for item in items[1:])
    full = join_message([canonical(stored_form(e)) for e in entries[1:5]])
    assert len(full) - len(raw) == 3 * len(',"p":""' + "A" * 43)
    assert parse_message(raw) == entries[1:5]
    records = [
        (1, encode_message(entries[0:1])),
        (2, raw),
        (3, encode_message(entries[5:6])),
    ]
    report = verify_chain(records, 3)
    assert report.ok and report.entries == 6 and report.head_hash == entries[5]["hash"]


def test_tampering_inside_a_compact_batch_is_named() -> None:
    entries = _chain(5)
    altered = [*entries]
    altered[2] = {**entries[2], "outcome": "forged"}
    report = verify_chain([(1, encode_message(altered))], 1)
    assert [(p.index, p.kind) for p in report.problems] == [(2, "hash_mismatch")]
    # Reordered: the moved item's implied link is the wrong one, so its hash fails.
    swapped = [entries[0], entries[2], entries[1], entries[3], entries[4]]
    report = verify_chain([(1, encode_message(swapped))], 1)
    assert report.problems and report.problems[0].index == 1
    # Dropped from the middle: the next item's implied link no longer seals it.
    report = verify_chain([(1, encode_message([entries[0], *entries[2:]]))], 1)
    assert [(p.index, p.kind) for p in report.problems] == [(1, "hash_mismatch")]
    # A second message whose first item does not follow the first message's last.
    report = verify_chain([(1, encode_message(entries[:2])), (2, encode_message(entries[3:]))], 2)
    assert [(p.seq, p.index, p.kind) for p in report.problems] == [(2, 0, "prev_mismatch")]


def test_a_chain_runs_on_from_long_entries_into_compact_ones() -> None:
    """Format "2" then "3" on one writer's subject (a data dir written before and after
    the upgrade), lone and batched: links are the same 32 bytes in both."""
    prev = GENESIS
    old = []
    for i in range(3):
        entry, raw = _sign_entry(prev, LONG_VERSION, i)
        old.append(raw)
        prev = bytes.fromhex(str(entry["hash"]))
    new = _chain(5, prev)
    records = [(seq, raw, "kms.audit.broker") for seq, raw in enumerate(old, 1)]
    records += [(4, encode_message(new[:1]), "kms.audit.broker")]
    records += [(5, encode_message(new[1:]), "kms.audit.broker")]
    report = verify_chain(records, 5)
    assert report.ok, report.problems
    assert report.entries == 8 and report.heads == {"broker": new[-1]["hash"]}


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Stored compact entries that are not entries: each is "malformed", and the walk goes on.
_GOOD = json.loads(_sign_entry(GENESIS, COMPACT_VERSION)[1])
MALFORMED = {
    "padded link": {**_GOOD, "h": _GOOD["h"] + "="},
    "hex link": {**_GOOD, "p": "00" * 32},
    "link with a stray character": {**_GOOD, "h": _GOOD["h"][:-1] + "*"},
    # The last of 43 characters carries 2 unused bits: set one, the same 32 bytes.
    "link with other trailing bits": {
        **_GOOD,
        "h": _GOOD["h"][:-1] + _B64URL[_B64URL.index(_GOOD["h"][-1]) ^ 1],
    },
    "long field names beside short ones": {**_GOOD, "outcome": "ok"},
    "a field missing": {k: v for k, v in _GOOD.items() if k != "o"},
    "no link to the entry before": {k: v for k, v in _GOOD.items() if k != "p"},
    "details not an object": {**_GOOD, "d": "algorithm=rsa"},
}


def test_a_malformed_compact_entry_is_named_and_the_walk_goes_on() -> None:
    good = _chain(3)
    for case, bad in MALFORMED.items():
        with pytest.raises(ValueError):
            parse_entry(canonical(bad))
        records = [
            (1, encode_message(good[:1]), "kms.audit.broker"),
            (2, canonical(bad), "kms.audit.broker"),
            (3, encode_message(good[1:]), "kms.audit.broker"),
        ]
        report = verify_chain(records, 3)
        found = [(p.seq, p.kind) for p in report.problems]
        assert found[0] == (2, "malformed"), (case, found)
        assert report.entries == 4, case
    # A batch whose FIRST item lacks its link has nothing to take it from.
    first = {k: v for k, v in json.loads(encode_message(good[:1])).items() if k != "p"}
    assert split_message(canonical({"batch": [first, _GOOD]})) is not None
    report = verify_chain([(1, canonical({"batch": [first, _GOOD]}))], 1)
    assert (report.problems[0].index, report.problems[0].kind) == (0, "malformed")


def test_link_text_round_trips_and_accepts_one_spelling_only() -> None:
    for link in (GENESIS, bytes(range(32)), os.urandom(32)):
        assert parse_link(link_text(link)) == link and len(link_text(link)) == 43
    for bad in ("", "A" * 42, "A" * 44, link_text(GENESIS)[:-1] + "=", 7, None):
        with pytest.raises(ValueError):
            parse_link(bad)


async def test_a_writer_upgraded_from_long_to_compact_entries_keeps_one_chain(nc: NATS) -> None:
    """A stream written in format "2" (lone and group-committed), then by a writer that
    stores format "3": the first compact entry links to the last long one, `verify`
    proves the whole stream, and a compact entry costs the stream fewer bytes."""
    js = nc.jetstream()
    old = AuditWriter(js, "broker", version=LONG_VERSION)
    await old.ensure_stream()
    await old.append(SIGN, "ok", client="c", role="r", target="k", details={"algorithm": "x"})
    await asyncio.gather(*(old.append(SIGN, "ok", target=f"k{i}") for i in range(20)))
    before = (await js.stream_info(writer_stream("broker"))).state
    last_long = parse_message((await stored(js))[-1][1])[-1]
    assert last_long["v"] == LONG_VERSION

    new = AuditWriter(js, "broker")  # reads its head from the long entries
    first = await new.append(SIGN, "ok", client="c", role="r", target="k", details={"a": "x"})
    assert first.entry["v"] == COMPACT_VERSION
    assert first.entry["prev_hash"] == last_long["hash"]
    await asyncio.gather(*(new.append(SIGN, "ok", target=f"k{i}") for i in range(20)))
    await new.append_many(SIGN, [Decision("ok", f"b{i}", f"batch.{i}") for i in range(30)])

    report = await verify_stream(js)
    assert report.ok, report.problems
    assert report.entries == 21 + 1 + 20 + 30
    records = await stored(js)
    versions = [e["v"] for _, raw, _ in records for e in parse_message(raw)]
    assert versions == [LONG_VERSION] * 21 + [COMPACT_VERSION] * 51
    compact_batches = [raw for _, raw, _ in records[before.messages :] if split_message(raw)]
    assert compact_batches and all(raw.count(b'"p":"') == 1 for raw in compact_batches)
    # The same lone Sign record, long and compact, as the stream stored them.
    long_lone, compact_lone = records[0][1], records[before.messages][1]
    assert len(long_lone) - len(compact_lone) >= 100
    # The compare-and-set header JetStream keeps with each message: the subject form,
    # in both formats (the stream form would let a head read from a lagging replica
    # pass; see "Compact entries" in edgekms/audit.py).
    stream = writer_stream("broker")
    first_msg = await js.get_msg(stream, seq=1)
    assert set(first_msg.headers or {}) >= {"Nats-Expected-Last-Subject-Sequence"}
    later = await js.get_msg(stream, seq=before.messages + 1)
    assert (later.headers or {}).get("Nats-Expected-Last-Subject-Sequence") == str(before.messages)
    assert "Nats-Expected-Last-Sequence" not in (later.headers or {})


AWKWARD = ['a"b', "back\\slash", "line\nbreak\x01", "naïve ✓", "\u2028\u2029", "", "o"]


@pytest.mark.parametrize("text", AWKWARD)
def test_the_spliced_compact_body_is_canonical_json(text: str) -> None:
    """entry_hash splices a well-shaped compact body instead of sorting it through the
    JSON encoder (the broker's chain check hashes every entry again): the bytes must be
    canonical()'s, and an entry of another shape still hashes through canonical()."""
    entry, raw = sealed_entry(
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
    body = {k: v for k, v in json.loads(raw).items() if k not in ("h", "p")}
    assert _compact_body(entry) == canonical(body)
    assert entry_hash(parse_entry(raw)) == entry["hash"]
    odd = {**entry, "details": {"n": 1}, "target": 7}
    expected = {**body, "d": {"n": 1}, "n": 7}
    prev = bytes.fromhex(str(entry["prev_hash"]))
    assert entry_hash(odd) == hashlib.sha256(prev + canonical(expected)).hexdigest()
