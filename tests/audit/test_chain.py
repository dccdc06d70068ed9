"""The chain itself: canonical encoding, hashing and the verifier's verdicts (pure logic)."""

from __future__ import annotations

import hashlib
import json

from edgekms.audit import (
    GENESIS,
    build_entry,
    canonical,
    entry_hash,
    parse_entry,
    verify_chain,
)


def _chain(n: int) -> list[bytes]:
    prev = GENESIS
    out = []
    for i in range(n):
        entry = build_entry(
            writer="test", action="Sign", outcome="ok", prev_hash=prev, target=f"k{i}"
        )
        out.append(canonical(entry))
        prev = bytes.fromhex(entry["hash"])
    return out


def test_canonical_is_sorted_compact_utf8() -> None:
    assert (
        canonical({"b": "1", "a": {"d": "é", "c": ""}}) == '{"a":{"c":"","d":"é"},"b":"1"}'.encode()
    )


def test_hash_covers_prev_hash_and_body() -> None:
    entry = build_entry(writer="w", action="Sign", outcome="ok", prev_hash=GENESIS, time="t")
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
    raws = _chain(3)
    raws.insert(1, b"not json")
    report = verify_chain(list(enumerate(raws, start=1)), 4)
    assert [(p.seq, p.kind) for p in report.problems] == [(2, "malformed"), (3, "prev_mismatch")]


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
