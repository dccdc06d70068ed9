"""Pure logic of edgekms.sealed: who owns which key, what a seal binds, and the config
fields that give a service its keys (the live attacks are in tests/natsperm and
tests/e2e)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.config import ConfigError, load_config
from edgekms.sealed import (
    LEGACY_SEAL_VERSION,
    WRITERS,
    CounterBook,
    RecordSeal,
    TamperedRecord,
    new_signing_key_pem,
    owner_of,
    parse_seal_fields,
    public_key_hex,
)
from edgekms.sealed import _message as _message
from edgekms.v1 import sealed_pb2
from mgmt.sealkeys import ensure_seal_keys

KEYS = {writer: Ed25519PrivateKey.generate() for writer in WRITERS}
PUBLIC = {writer: key.public_key() for writer, key in KEYS.items()}


def test_owners_follow_the_write_grants() -> None:
    from mgmt.natsauth import CA_REGISTRY_KEYS, CEREMONY_REGISTRY_KEYS

    assert {owner_of("kms_keys", k) for k in CA_REGISTRY_KEYS} == {"ca"}
    assert {owner_of("kms_keys", k) for k in CEREMONY_REGISTRY_KEYS} == {"ceremony"}
    assert owner_of("kms_keys", "ca/intermediate-2") == "ca"  # a rotation's
    assert owner_of("kms_keys", "ca/backup") == "broker"  # a user key under ca/
    assert owner_of("kms_keys", "nas/https") == "broker"
    assert owner_of("kms_clients", "revoked.ab") == "broker"
    assert owner_of("kms_ca", "config") == "ca"


def test_a_seal_binds_bucket_and_key() -> None:
    seal = RecordSeal("broker", KEYS["broker"], PUBLIC)
    value = seal.seal("kms_clients", "client.alice", b"payload")
    assert seal.open("kms_clients", "client.alice", value) == b"payload"
    for bucket, key in (("kms_clients", "client.mallory"), ("kms_keys", "client.alice")):
        with pytest.raises(TamperedRecord) as refused:
            seal.open(bucket, key, value)
        assert refused.value.reason in ("record.seal_invalid", "record.writer_not_owner")


def test_an_unknown_writer_is_refused() -> None:
    seal = RecordSeal("broker", KEYS["broker"], {"broker": PUBLIC["broker"]})
    value = RecordSeal("ca", KEYS["ca"], PUBLIC).seal("kms_ca", "config", b"x")
    with pytest.raises(TamperedRecord) as refused:
        seal.open("kms_ca", "config", value)
    assert refused.value.reason == "record.writer_unknown"


def _fields(writer: str, key_file: Path, public: dict[str, str]) -> dict[str, object]:
    return {"seal_writer": writer, "seal_key_file": str(key_file), "seal_public_keys": public}


def test_config_fields_give_a_working_seal(tmp_path: Path) -> None:
    keys = ensure_seal_keys(tmp_path)
    seal, problems = parse_seal_fields(_fields("ca", keys.key_files["ca"], keys.public_keys))
    assert problems == [] and seal is not None and seal.writer == "ca"
    assert seal.open("kms_ca", "config", seal.seal("kms_ca", "config", b"s")) == b"s"
    assert parse_seal_fields({}) == (None, [])


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"seal_writer": "root"}, "seal_writer: must be one of"),
        ({"seal_public_keys": {"broker": "zz"}}, "seal_public_keys.broker: must be 64"),
        ({"seal_public_keys": {"mallory": "00" * 32}}, "seal_public_keys.mallory: not a writer"),
        ({"seal_public_keys": "x"}, "seal_public_keys: must be a table"),
        ({"seal_key_file": "/nonexistent/key"}, "seal_key_file: cannot read"),
    ],
)
def test_bad_seal_fields_are_problems(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    keys = ensure_seal_keys(tmp_path)
    table = {**_fields("broker", keys.key_files["broker"], keys.public_keys), **change}
    seal, problems = parse_seal_fields(table)
    assert seal is None and problems and problems[0].startswith(problem), problems


def test_a_key_that_is_not_the_named_writers_is_a_problem(tmp_path: Path) -> None:
    keys = ensure_seal_keys(tmp_path)
    _, other = new_signing_key_pem()
    public = {**keys.public_keys, "broker": other}
    _, problems = parse_seal_fields(_fields("broker", keys.key_files["broker"], public))
    assert problems == ["seal_key_file: does not match seal_public_keys.broker"]
    assert public_key_hex(PUBLIC["ca"]) != other


def test_the_broker_config_refuses_another_writers_key(tmp_path: Path) -> None:
    keys = ensure_seal_keys(tmp_path / "secrets")
    config = tmp_path / "broker.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\nnats_url = "nats://127.0.0.1:4222"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0"]\n'
        + keys.toml("ca")
        + '[tls]\ncert = "c"\nkey = "k"\nclient_ca = "a"\n'
    )
    with pytest.raises(ConfigError, match="seal_writer must be 'broker'"):
        load_config(config)


def test_an_older_genuine_record_stored_later_is_a_replay_and_a_late_one_is_not() -> None:
    """Issue 11 item 3's gap: a writer's own older record written back under the same key
    is refused; the same older record delivered late (at its own, earlier revision, as a
    follower may see it) is not."""
    writer = RecordSeal("broker", KEYS["broker"], PUBLIC)
    loose = writer.seal("kms_keys", "nas/app", b"loose policy")
    strict = writer.seal("kms_keys", "nas/app", b"strict policy")
    reader = RecordSeal(None, None, PUBLIC)
    assert reader.open("kms_keys", "nas/app", loose, revision=3) == b"loose policy"
    assert reader.open("kms_keys", "nas/app", strict, revision=4) == b"strict policy"
    assert reader.open("kms_keys", "nas/app", loose, revision=3) == b"loose policy"  # late
    with pytest.raises(TamperedRecord) as refused:
        reader.open("kms_keys", "nas/app", loose, revision=9)  # written back
    assert refused.value.reason == "record.replayed"
    assert refused.value.details["key"] == "nas/app"


def test_counters_grow_past_the_clock_and_what_was_seen() -> None:
    writer = RecordSeal("broker", KEYS["broker"], PUBLIC)
    first = writer.next_counter("kms_keys", "k")
    writer.counters.observe("kms_keys", "k", first + 10**9, 7)  # a record from a fast clock
    assert writer.next_counter("kms_keys", "k") == first + 10**9 + 1


def test_the_counter_is_signed() -> None:
    writer = RecordSeal("broker", KEYS["broker"], PUBLIC)
    envelope = sealed_pb2.SealedRecord()
    envelope.ParseFromString(writer.seal("kms_keys", "nas/app", b"p"))
    envelope.counter += 10**12  # lifted to outrank a newer record
    with pytest.raises(TamperedRecord) as refused:
        RecordSeal(None, None, PUBLIC).open("kms_keys", "nas/app", envelope.SerializeToString())
    assert refused.value.reason == "record.seal_invalid"


def test_format_1_records_still_open_and_rank_below_any_counter() -> None:
    """Records sealed before counters (format 1) still verify, as counter 0."""
    message = _message("kms_keys", "nas/app", "broker", b"", b"old", LEGACY_SEAL_VERSION)
    legacy = sealed_pb2.SealedRecord(
        version=LEGACY_SEAL_VERSION,
        writer="broker",
        payload=b"old",
        signature=KEYS["broker"].sign(message),
    ).SerializeToString()
    reader = RecordSeal(None, None, PUBLIC)
    assert reader.open("kms_keys", "nas/app", legacy, revision=1) == b"old"
    current = RecordSeal("broker", KEYS["broker"], PUBLIC).seal("kms_keys", "nas/app", b"new")
    assert reader.open("kms_keys", "nas/app", current, revision=2) == b"new"
    with pytest.raises(TamperedRecord) as refused:
        reader.open("kms_keys", "nas/app", legacy, revision=3)
    assert refused.value.reason == "record.replayed"


def test_the_counter_book_outlives_the_process(tmp_path: Path) -> None:
    path = tmp_path / "seal" / "broker.counters"
    book = CounterBook(path)
    book.observe("kms_keys", "nas/app", 500, 4)
    book.observe("kms_keys", "nas/app", 400, 3)  # lower: not recorded
    book.observe("kms_clients", "client.a", 9, 2)
    book.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open(path, "a", encoding="utf-8") as f:
        f.write("kms_keys\tnas/app\t99")  # a line torn by a crash
    again = CounterBook(path)
    assert again.held("kms_keys", "nas/app") == (500, 4)
    assert again.held("kms_clients", "client.a") == (9, 2)
    with pytest.raises(TamperedRecord):
        again.check("kms_keys", "nas/app", 450, 5)
    again.close()


def test_a_record_read_again_is_verified_once_and_other_bytes_every_time() -> None:
    """The verified-envelope memo: the CA reads ca/intermediate before every issuance."""
    from unittest import mock

    from edgekms.sealed import VERIFIED_MEMO

    seal = RecordSeal("ca", KEYS["ca"], PUBLIC)
    value = seal.seal("kms_keys", "ca/intermediate", b"record")
    with mock.patch.object(seal, "_verify", wraps=seal._verify) as verify:
        for revision in (1, 1, 1):
            assert seal.open("kms_keys", "ca/intermediate", value, revision) == b"record"
        assert verify.call_count == 1
        # One byte changed: verified afresh, and refused.
        forged = bytearray(value)
        forged[-1] ^= 1
        with pytest.raises(TamperedRecord):
            seal.open("kms_keys", "ca/intermediate", bytes(forged), 2)
        with pytest.raises(TamperedRecord):
            seal.open("kms_keys", "ca/intermediate", bytes(forged), 2)
        assert verify.call_count == 3
        # The same bytes under another key are not the memo's.
        with pytest.raises(TamperedRecord):
            seal.open("kms_keys", "ca/root", value)
    # Bounded however many records pass through.
    for i in range(VERIFIED_MEMO * 3):
        seal.open("kms_ca", f"cert.{i:X}", seal.seal("kms_ca", f"cert.{i:X}", b"x"))
    assert len(seal._verified) == VERIFIED_MEMO
