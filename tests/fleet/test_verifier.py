"""FleetVerifier's origin checks on stored copies built by hand (pure logic: what the hub's
copy would hold if entries were lost on the way, or came from the wrong stream).

The real-server tests (test_leaf.py) cover sourcing itself; these cover the verdicts the
servers cannot be made to produce on demand.
"""

from __future__ import annotations

from edgekms.audit import GENESIS, sealed_entry, writer_stream
from edgekms.fleet import FleetVerifier, parse_origin


def chain(writer: str, count: int) -> list[bytes]:
    """`count` linked entries of one writer, as stored."""
    out, prev = [], GENESIS
    for _ in range(count):
        entry, raw = sealed_entry(writer=writer, action="Sign", outcome="ok", prev_hash=prev)
        out.append(raw)
        prev = bytes.fromhex(entry["hash"])
    return out


def header(writer: str, seq: int) -> str:
    return f"{writer_stream(writer)}:AbCd1234 {seq} > > kms.audit.{writer} XyZ"


def kinds(verifier: FleetVerifier, last: int) -> set[str]:
    return {p.kind for p in verifier.finish(last).problems}


def test_two_writers_interleaved_verify_whole() -> None:
    verifier = FleetVerifier("a")
    a, b = chain("crypto-a", 3), chain("broker", 2)
    stored = [("crypto-a", 1, a[0]), ("broker", 1, b[0]), ("crypto-a", 2, a[1])]
    stored += [("crypto-a", 3, a[2]), ("broker", 2, b[1])]
    for seq, (writer, origin, raw) in enumerate(stored, start=1):
        verifier.feed(seq, raw, f"kms.audit.{writer}", header(writer, origin))
    report = verifier.finish(len(stored))
    assert report.ok, report.to_dict()
    assert report.entries == 5 and set(report.heads) == {"crypto-a", "broker"}


def test_an_entry_lost_on_the_way_is_missing() -> None:
    verifier = FleetVerifier("a")
    a = chain("crypto-a", 3)
    verifier.feed(1, a[0], "kms.audit.crypto-a", header("crypto-a", 1))
    verifier.feed(2, a[2], "kms.audit.crypto-a", header("crypto-a", 3))
    # The origin gap is named, and the chain link does not hold either.
    assert {"missing", "prev_mismatch"} <= kinds(verifier, 2)


def test_an_entry_from_another_writers_stream_is_a_mismatch() -> None:
    verifier = FleetVerifier("a")
    a = chain("crypto-a", 1)
    verifier.feed(1, a[0], "kms.audit.crypto-a", header("broker", 1))
    assert kinds(verifier, 1) == {"writer_mismatch"}


def test_the_same_origin_twice_is_out_of_order() -> None:
    verifier = FleetVerifier("a")
    a = chain("crypto-a", 1)
    verifier.feed(1, a[0], "kms.audit.crypto-a", header("crypto-a", 1))
    verifier.feed(2, a[0], "kms.audit.crypto-a", header("crypto-a", 1))
    assert "out_of_order" in kinds(verifier, 2)


def test_origin_header_parsing() -> None:
    origin = parse_origin("KMS_AUDIT_BROKER:PNYlYRMl 12 > > kms.audit.broker 6Cd7acHA")
    assert origin is not None and (origin.stream, origin.seq) == ("KMS_AUDIT_BROKER", 12)
    for bad in (None, "", "KMS_AUDIT_BROKER", "KMS_AUDIT_BROKER x"):
        assert parse_origin(bad) is None
