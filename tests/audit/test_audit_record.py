"""How TailAudit types a stored message (broker.audit_service.audit_record): a lone
entry fills `entry` and `entries`, a batch fills `entries` in chain order, and bytes
that are no entry leave both empty while `raw` is handed out untouched."""

from __future__ import annotations

from broker.audit_service import audit_record
from edgekms.audit import GENESIS, join_message, sealed_entry


def _sealed(action: str, prev: bytes, **extra: str) -> tuple[dict[str, object], bytes]:
    return sealed_entry(
        writer="broker",
        action=action,
        outcome="ok",
        prev_hash=prev,
        client="alice",
        role="operator",
        target="app/key",
        details=extra,
    )


def test_a_lone_entry_is_typed_in_both_fields() -> None:
    entry, raw = _sealed("Sign", GENESIS, provider="hsm0")
    record = audit_record(7, "kms.audit.broker", raw)
    assert (record.seq, record.subject, record.raw) == (7, "kms.audit.broker", raw)
    assert len(record.entries) == 1
    assert record.entry == record.entries[0]
    typed = record.entry
    assert (typed.action, typed.target, typed.outcome) == ("Sign", "app/key", "ok")
    assert (typed.actor.client, typed.actor.role, typed.writer) == ("alice", "operator", "broker")
    assert dict(typed.details) == {"provider": "hsm0"}
    assert (typed.prev_hash, typed.hash) == (GENESIS.hex(), entry["hash"])


def test_a_batch_is_typed_entry_by_entry_in_chain_order() -> None:
    first, first_raw = _sealed("Sign", GENESIS)
    second, second_raw = _sealed("GetPublicKey", bytes.fromhex(str(first["hash"])))
    raw = join_message([first_raw, second_raw])
    record = audit_record(8, "kms.audit.broker", raw)
    assert record.raw == raw
    assert [e.action for e in record.entries] == ["Sign", "GetPublicKey"]
    assert [e.hash for e in record.entries] == [first["hash"], second["hash"]]
    assert record.entries[1].prev_hash == first["hash"]
    assert not record.HasField("entry")  # a batch has no single entry


def test_an_envelope_of_one_is_still_a_batch() -> None:
    """Writers store one entry bare (join_message); an envelope around one entry is
    valid all the same and is typed as the batch it is."""
    entry, raw = _sealed("Sign", GENESIS)
    assert join_message([raw]) == raw
    record = audit_record(9, "kms.audit.broker", b'{"batch":[' + raw + b"]}")
    assert [e.hash for e in record.entries] == [entry["hash"]]
    assert not record.HasField("entry")


def test_bytes_that_are_no_entry_are_handed_out_untyped() -> None:
    for raw in (b"not json", b'{"batch": []}', b'{"action": "Sign"}'):
        record = audit_record(10, "kms.audit.broker", raw)
        assert record.raw == raw
        assert not record.entries and not record.HasField("entry")
