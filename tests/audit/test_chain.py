"""The chain itself: canonical encoding, hashing and the verifier's verdicts (pure logic),
for entries of format "2" (the long form every chain written before format "3" holds;
they must verify forever). The compact format "3" has its own: tests/audit/test_compact.py."""

from __future__ import annotations

import hashlib
import json

from edgekms.audit import (
    GENESIS,
    LONG_VERSION,
    MAX_LISTED_PROBLEMS,
    ChainVerifier,
    build_entry,
    canonical,
    encode_message,
    entry_hash,
    join_message,
    link_of,
    parse_entry,
    parse_message,
    sealed_entry,
    verify_chain,
)

V2 = LONG_VERSION


def _chain(n: int) -> list[bytes]:
    prev = GENESIS
    out = []
    for i in range(n):
        entry = build_entry(
            version=V2, writer="test", action="Sign", outcome="ok", prev_hash=prev, target=f"k{i}"
        )
        out.append(canonical(entry))
        prev = bytes.fromhex(entry["hash"])
    return out


def _entries(n: int) -> list[dict[str, object]]:
    return [parse_entry(raw) for raw in _chain(n)]


def test_canonical_is_sorted_compact_utf8() -> None:
    assert (
        canonical({"b": "1", "a": {"d": "é", "c": ""}}) == '{"a":{"c":"","d":"é"},"b":"1"}'.encode()
    )


def test_sealed_bytes_are_the_canonical_entry_even_for_hostile_fields() -> None:
    # The writer splices the hash into the hashed bytes instead of encoding twice: the
    # result must be byte for byte what canonical() gives, whatever the fields hold.
    hostile = ',"outcome":"x","hash":"y"}'
    prev = GENESIS
    raws = []
    for details in (
        {},
        {"outcome": hostile, "hash": "h", "zz": '"\\'},
        {"a": "é\u2028\n", "outcome": ',"outcome":'},
    ):
        entry, raw = sealed_entry(
            version=V2,
            writer=hostile,
            action="Sign",
            outcome=hostile,
            prev_hash=prev,
            client=hostile,
            target=hostile,
            request_id=',"outcome":',
            details=details,
        )
        assert raw == canonical(entry)
        assert entry["hash"] == entry_hash(entry)
        assert parse_entry(raw) == entry
        raws.append(raw)
        prev = bytes.fromhex(entry["hash"])
    entries = [parse_entry(raw) for raw in raws]
    assert join_message(raws) == encode_message(entries)
    assert join_message(raws[:1]) == encode_message(entries[:1])


def test_hash_covers_prev_hash_and_body() -> None:
    entry = build_entry(
        version=V2, writer="w", action="Sign", outcome="ok", prev_hash=GENESIS, time="t"
    )
    body = {k: v for k, v in entry.items() if k != "hash"}
    assert entry["prev_hash"] == "00" * 32
    assert entry["hash"] == hashlib.sha256(GENESIS + canonical(body)).hexdigest()
    entry["outcome"] = "authz.policy_denied"
    assert entry_hash(entry) != entry["hash"]


def test_whole_chain_verifies() -> None:
    raws = _chain(5)
    report = verify_chain(list(enumerate(raws, start=1)), 5)
    assert report.ok and report.entries == 5 and report.last_seq == 5
    assert report.head_hash == parse_entry(raws[-1])["hash"]


def test_empty_chain_verifies() -> None:
    assert verify_chain([], 0).ok


def test_altered_entry_is_named() -> None:
    raws = _chain(5)
    entry = json.loads(raws[2])
    entry["outcome"] = "ok-but-forged"
    raws[2] = canonical(entry)
    report = verify_chain(list(enumerate(raws, start=1)), 5)
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "hash_mismatch")]


def test_rehashed_entry_breaks_the_next_link() -> None:
    raws = _chain(5)
    entry = json.loads(raws[2])
    entry["target"] = "other"
    entry["hash"] = entry_hash(entry)
    raws[2] = canonical(entry)
    report = verify_chain(list(enumerate(raws, start=1)), 5)
    assert [(p.seq, p.kind) for p in report.problems] == [(4, "prev_mismatch")]


def test_missing_entries_are_named_once() -> None:
    raws = _chain(6)
    records = [(i, r) for i, r in enumerate(raws, start=1) if i not in (3, 4)]
    report = verify_chain(records, 6)
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "missing")]
    assert "3..4" in report.problems[0].message


def test_missing_tail_and_head_are_named() -> None:
    raws = _chain(4)
    assert [(p.seq, p.kind) for p in verify_chain(list(enumerate(raws[:3], 1)), 4).problems] == [
        (4, "missing")
    ]
    records = [(i, r) for i, r in enumerate(raws, start=1) if i != 1]
    assert [(p.seq, p.kind) for p in verify_chain(records, 4).problems] == [(1, "missing")]


def test_swapped_entries_are_named() -> None:
    raws = _chain(6)
    raws[2], raws[3] = raws[3], raws[2]
    report = verify_chain(list(enumerate(raws, start=1)), 6)
    assert report.problems[0].seq == 3 and report.problems[0].kind == "prev_mismatch"


def test_inserted_garbage_is_malformed_and_breaks_the_link() -> None:
    """Garbage on a writer's subject breaks that writer's chain."""
    raws = _chain(3)
    raws.insert(1, b"not json")
    records = [(seq, raw, "kms.audit.test") for seq, raw in enumerate(raws, start=1)]
    report = verify_chain(records, 4)
    assert [(p.seq, p.kind) for p in report.problems] == [(2, "malformed"), (3, "prev_mismatch")]


def _writer_chain(writer: str, n: int, prev: bytes = GENESIS) -> list[bytes]:
    out = []
    for i in range(n):
        entry = build_entry(
            version=V2,
            writer=writer,
            action="Sign",
            outcome="ok",
            prev_hash=prev,
            target=f"{writer}{i}",
        )
        out.append(canonical(entry))
        prev = bytes.fromhex(entry["hash"])
    return out


def test_each_writer_chains_its_own_entries_however_they_interleave() -> None:
    broker, ca = _writer_chain("broker", 3), _writer_chain("ca", 3)
    order = [("broker", broker[0]), ("ca", ca[0]), ("ca", ca[1]), ("broker", broker[1])]
    order += [("ca", ca[2]), ("broker", broker[2])]
    records = [(seq, raw, f"kms.audit.{w}") for seq, (w, raw) in enumerate(order, start=1)]
    report = verify_chain(records, 6)
    assert report.ok, report.problems
    assert report.heads == {
        "broker": parse_entry(broker[2])["hash"],
        "ca": parse_entry(ca[2])["hash"],
    }


def test_an_entry_claiming_another_writer_is_named() -> None:
    """Issue 11, item 4: a correctly chained entry claiming writer=broker, stored by the
    CA's identity (on kms.audit.ca), fails verify."""
    ca = _writer_chain("ca", 1)
    forged = build_entry(
        version=V2,
        writer="broker",
        action="ClientService/AddClient",
        outcome="ok",
        client="admin",
        role="admin",
        prev_hash=bytes.fromhex(parse_entry(ca[0])["hash"]),
    )
    records = [(1, ca[0], "kms.audit.ca"), (2, canonical(forged), "kms.audit.ca")]
    report = verify_chain(records, 2)
    assert [(p.seq, p.kind) for p in report.problems] == [(2, "writer_mismatch")]
    assert "claims writer 'broker'" in report.problems[0].message


def test_entries_of_the_global_chain_still_verify_and_hand_over() -> None:
    """Format 1 (one chain across writers, before per-writer chains) followed by format
    2: each writer's first new entry links to its own last old one."""
    old: list[tuple[str, bytes]] = []
    prev = GENESIS
    for writer in ["broker", "ca", "broker"]:
        entry = build_entry(version=V2, writer=writer, action="Sign", outcome="ok", prev_hash=prev)
        entry["v"] = "1"
        entry["hash"] = entry_hash(entry)
        old.append((writer, canonical(entry)))
        prev = bytes.fromhex(entry["hash"])
    last_broker = bytes.fromhex(parse_entry(old[2][1])["hash"])
    new = _writer_chain("broker", 2, prev=last_broker)
    order = [*old, ("broker", new[0]), ("broker", new[1])]
    records = [(seq, raw, f"kms.audit.{w}") for seq, (w, raw) in enumerate(order, start=1)]
    assert verify_chain(records, 5).ok


def test_a_flood_of_junk_is_one_count_not_a_line_each() -> None:
    good = _writer_chain("broker", 2)
    records = [(1, good[0], "kms.audit.broker")]
    records += [(seq, b"junk", "kms.audit.ca") for seq in range(2, 5002)]
    records.append((5002, good[1], "kms.audit.broker"))
    report = verify_chain(records, 5002)
    assert report.problem_count == 5000
    assert len(report.problems) == MAX_LISTED_PROBLEMS
    assert report.problems[0].seq == 2 and report.problems[0].kind == "malformed"
    assert report.to_dict()["problem_count"] == 5000


def test_request_details_names_enums_and_keeps_unknown_values() -> None:
    from broker.audit_service import request_details
    from edgekms.v1 import keys_pb2

    known = keys_pb2.SignRequest(name="k", data=b"secret digest")
    known.algorithm = 1  # type: ignore[assignment]
    details = request_details(known)
    assert set(details) == {"algorithm"} and details["algorithm"].startswith("signature_algorithm")
    unknown = keys_pb2.SignRequest(name="k")
    unknown.algorithm = 99  # type: ignore[assignment]
    assert request_details(unknown) == {"algorithm": "99"}


def test_batches_verify_across_and_within_messages() -> None:
    entries = _entries(7)
    raws = [
        encode_message(entries[0:1]),
        encode_message(entries[1:4]),
        encode_message(entries[4:5]),
        encode_message(entries[5:7]),
    ]
    assert raws[0] == canonical(entries[0]) and raws[1].startswith(b'{"batch":[')
    assert parse_message(raws[1]) == entries[1:4] and parse_message(raws[0]) == [entries[0]]
    assert link_of(raws[3]) == bytes.fromhex(str(entries[6]["hash"]))
    report = verify_chain(list(enumerate(raws, start=1)), 4)
    assert report.ok and report.entries == 7 and report.messages == report.last_seq == 4
    assert report.head_hash == entries[6]["hash"]


def test_altered_entry_in_a_batch_is_named_with_its_index() -> None:
    entries = _entries(6)
    entries[3] = {**entries[3], "target": "forged"}
    raws = [encode_message(entries[0:2]), encode_message(entries[2:6])]
    report = verify_chain(list(enumerate(raws, start=1)), 2)
    assert [(p.seq, p.index, p.kind) for p in report.problems] == [(2, 1, "hash_mismatch")]
    assert report.problems[0].to_dict()["index"] == 1
    assert "entry 2 #1" in report.problems[0].message


def test_reordered_entries_within_a_batch_are_named() -> None:
    entries = _entries(5)
    entries[2], entries[3] = entries[3], entries[2]
    report = verify_chain([(1, encode_message(entries))], 1)
    assert next((p.seq, p.index, p.kind) for p in report.problems) == (1, 2, "prev_mismatch")
    assert "does not link to entry 1 #1" in report.problems[0].message


def test_dropped_entry_from_a_batch_is_named() -> None:
    entries = _entries(5)
    raws = [encode_message(entries[0:2]), encode_message(entries[3:5])]
    report = verify_chain(list(enumerate(raws, start=1)), 2)
    assert [(p.seq, p.index, p.kind) for p in report.problems] == [(2, 0, "prev_mismatch")]
    assert "does not link to entry 1 #1" in report.problems[0].message


def test_malformed_item_in_a_batch_is_named_and_the_walk_goes_on() -> None:
    entries: list[object] = list(_entries(4))
    del entries[1]["hash"]  # type: ignore[attr-defined]
    raw = canonical({"batch": entries})
    report = verify_chain([(1, raw)], 1)
    assert [(p.seq, p.index, p.kind) for p in report.problems] == [
        (1, 1, "malformed"),
        (1, 2, "prev_mismatch"),
    ]
    assert report.entries == 4


def test_a_writer_chain_runs_on_from_the_legacy_stream_into_its_own() -> None:
    """Per-writer streams: each stream numbers from 1, a writer's chain crosses from the
    closed legacy stream into its own, and a dropped legacy tail breaks that link."""
    chain = _chain(5)
    verifier = ChainVerifier()
    verifier.begin_stream("KMS_AUDIT")
    for seq, raw in enumerate(chain[:3], 1):
        verifier.feed(seq, raw, "kms.audit.test")
    verifier.end_stream(3)
    verifier.begin_stream("KMS_AUDIT_TEST")
    for seq, raw in enumerate(chain[3:], 1):
        verifier.feed(seq, raw, "kms.audit.test")
    report = verifier.finish(2)
    assert report.ok and report.entries == 5
    assert report.streams == {"KMS_AUDIT": 3, "KMS_AUDIT_TEST": 2}

    verifier = ChainVerifier()
    verifier.begin_stream("KMS_AUDIT")
    for seq, raw in enumerate(chain[:2], 1):  # the legacy stream rewritten one short
        verifier.feed(seq, raw, "kms.audit.test")
    verifier.end_stream(2)
    verifier.begin_stream("KMS_AUDIT_TEST")
    for seq, raw in enumerate(chain[3:], 1):
        verifier.feed(seq, raw, "kms.audit.test")
    report = verifier.finish(2)
    assert [(p.stream, p.seq, p.kind) for p in report.problems] == [
        ("KMS_AUDIT_TEST", 1, "prev_mismatch")
    ]
    assert report.problems[0].where == "KMS_AUDIT_TEST 1"
