"""Issue 21, item 1: the archiver keeps each writer's stream to its window, archiving and
checkpointing before it purges, and StreamProof proves the window from the newest
checkpoint and the archives with the window from entry 1; a tampered, missing or forged
piece is found with its typed kind. A real nats-server; the checkpoint key here is a
software P-256 key (the token's signing is the stack test's,
tests/e2e/test_audit_retention.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NATS

from broker.archiver import Archiver
from broker.keys import archive_status
from broker.metrics import AuditChainCheck
from edgekms.audit import (
    MIN_STREAM_BYTES,
    AuditWriter,
    ChainReport,
    ChainVerifier,
    StreamLimit,
    parse_message,
    writer_stream,
)
from edgekms.errors import ResourceExhausted, Unavailable
from edgekms.metrics import ServiceMetrics
from edgekms.retention import (
    CHECKPOINT_SUFFIX,
    SEGMENT_SUFFIX,
    TMP_SUFFIX,
    Checkpoint,
    RetentionPolicy,
    StreamProof,
    checkpoint_files,
    checkpoint_name,
    key_id,
    newest_checkpoint,
    segment_name,
)
from tests.audit.helpers import stored
from tests.conftest import SLOWDOWN

STREAM = writer_stream("test")
# The smallest stream a writer may have, and a window of half of it.
LIMIT = StreamLimit(MIN_STREAM_BYTES, 100_000)
POLICY = RetentionPolicy(window_fraction=0.5, max_age_s=0, segment_bytes=32 * 1024, interval_s=0.2)


class SoftSigner:
    """A P-256 key in memory standing in for the token: what is under test here is what
    gets signed and checked, not where the key lives."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def public_der(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def trusted(self) -> dict[str, ec.EllipticCurvePublicKey]:
        return {key_id(self.public_der()): self.key.public_key()}

    async def key_id(self) -> str:
        return key_id(self.public_der())

    async def public_key_der(self) -> bytes:
        return self.public_der()

    async def sign(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        return self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


async def _fill_past_window(writer: AuditWriter, js_bytes_goal: int) -> int:
    """Append entries one by one until the stream holds `js_bytes_goal` bytes."""
    n = 0
    while (await writer.js.stream_info(STREAM)).state.bytes < js_bytes_goal:
        await writer.append("Sign", "ok", client="alice", role="signer", target=f"key{n}")
        n += 1
    return n


async def _prove(
    nc: NATS, signer: SoftSigner, archive: Path | None, checkpoints: Path | None = None
) -> tuple[ChainReport, StreamProof]:
    """What `kmsctl audit verify [--archive]` does for one stream, with the newest
    checkpoint read from `checkpoints` (the broker's archive dir) as TailAudit hands it."""
    js = nc.jetstream()
    info = await js.stream_info(STREAM)
    proof = StreamProof(ChainVerifier(), signer.trusted(), archive)
    newest = newest_checkpoint(checkpoints, STREAM) if checkpoints is not None else b""
    state = info.state
    proof.begin(STREAM, state.first_seq, state.last_seq, state.messages, newest)
    for seq, raw, subject in await stored(js, STREAM):
        proof.feed(seq, raw, subject)
    proof.end(state.last_seq)
    return proof.verifier.finish(), proof


async def _archived_stack(nc: NATS, tmp_path: Path) -> tuple[AuditWriter, Archiver, SoftSigner]:
    js = nc.jetstream()
    writer = AuditWriter(js, "test", limit=LIMIT)
    await writer.ensure_stream()
    signer = SoftSigner()
    archiver = Archiver(js, tmp_path / "archive", signer, POLICY)
    await _fill_past_window(writer, int(LIMIT.max_bytes * 0.75))
    return writer, archiver, signer


async def test_past_the_window_records_are_archived_checkpointed_and_pruned(
    nc: NATS, tmp_path: Path
) -> None:
    writer, archiver, signer = await _archived_stack(nc, tmp_path)
    archiver.audit = writer  # each purge recorded in the (here: the same) writer's chain
    js = nc.jetstream()
    before = await js.stream_info(STREAM)
    archived = await archiver.round()
    after = await js.stream_info(STREAM)
    assert archived[STREAM] > 0
    assert archiver.archived_messages == archived[STREAM] and archiver.last_ok_at is not None
    # The window: at most half the stream's limit stays; the oldest went, in order.
    assert after.state.bytes <= LIMIT.max_bytes * POLICY.window_fraction
    assert after.state.first_seq == archived[STREAM] + 1
    # Nothing but one `audit.purge` record per segment was added meanwhile.
    assert after.state.last_seq == before.state.last_seq + archiver.archived_segments
    purges = [
        entry
        for _, raw, _ in await stored(js, STREAM)
        for entry in parse_message(raw)
        if entry["action"] == "audit.purge"
    ]
    assert len(purges) == archiver.archived_segments
    assert (
        purges[0]["target"] == STREAM and int(purges[-1]["details"]["through"]) == archived[STREAM]
    )
    segments = sorted((tmp_path / "archive" / STREAM).glob(f"*{SEGMENT_SUFFIX}"))
    checkpoints = checkpoint_files(tmp_path / "archive", STREAM)
    assert len(segments) == len(checkpoints) >= 2  # 32 KiB segments
    newest = Checkpoint.from_json(checkpoints[-1].read_bytes())
    newest.verify(signer.trusted())
    assert newest.last_seq == after.state.first_seq - 1
    # Compressed: JSON entries shrink several times over in gzip.
    raw = sum(len(gzip.decompress(p.read_bytes())) for p in segments)
    assert sum(p.stat().st_size for p in segments) * 3 < raw
    # The writer chains on across the purge, and both proofs hold.
    await writer.append("Sign", "ok", client="alice", role="signer", target="after")
    report, _ = await _prove(nc, signer, None, tmp_path / "archive")
    assert report.ok, report.to_dict()
    report, proof = await _prove(nc, signer, tmp_path / "archive", tmp_path / "archive")
    assert report.ok, report.to_dict()
    assert proof.segments == len(segments)
    assert report.messages == (await js.stream_info(STREAM)).state.last_seq
    # A second round with nothing beyond the window archives nothing.
    assert (await archiver.round())[STREAM] == 0


async def test_a_window_without_its_checkpoint_or_with_a_forged_one_does_not_verify(
    nc: NATS, tmp_path: Path
) -> None:
    _, archiver, signer = await _archived_stack(nc, tmp_path)
    await archiver.round()
    report, _ = await _prove(nc, signer, None, None)
    assert [p.kind for p in report.problems] == ["checkpoint_missing"], report.to_dict()
    # A checkpoint altered after signing (its hash moved), and one signed by another key.
    newest = checkpoint_files(tmp_path / "archive", STREAM)[-1]
    genuine = Checkpoint.from_json(newest.read_bytes())
    newest.write_bytes(dataclasses.replace(genuine, hash="0" * 64).to_json())
    report, _ = await _prove(nc, signer, None, tmp_path / "archive")
    assert report.problems[0].kind == "checkpoint_invalid", report.to_dict()
    other = SoftSigner()
    forged = dataclasses.replace(genuine, key=await other.key_id())
    forged = dataclasses.replace(forged, signature=(await other.sign(forged.digest())).hex())
    newest.write_bytes(forged.to_json())
    report, _ = await _prove(nc, signer, None, tmp_path / "archive")
    assert report.problems[0].kind == "checkpoint_invalid", report.to_dict()
    assert "not the internal CA's" in report.problems[0].message
    newest.write_bytes(b"{not json")
    report, _ = await _prove(nc, signer, None, tmp_path / "archive")
    assert report.problems[0].kind == "checkpoint_invalid", report.to_dict()


async def test_a_tampered_or_missing_segment_is_found(nc: NATS, tmp_path: Path) -> None:
    _, archiver, signer = await _archived_stack(nc, tmp_path)
    await archiver.round()
    archive = tmp_path / "archive"
    segments = sorted((archive / STREAM).glob(f"*{SEGMENT_SUFFIX}"))
    # One entry rewritten inside a segment, recompressed: the bytes are not the signed ones.
    copy = tmp_path / "copy"
    shutil.copytree(archive, copy)
    target = copy / STREAM / segments[0].name
    text = gzip.decompress(target.read_bytes()).replace(b"alice", b"mallo", 1)
    target.write_bytes(gzip.compress(text))
    report, _ = await _prove(nc, signer, copy, archive)
    assert report.problems[0].kind == "archive_tampered", report.to_dict()
    assert segments[0].name in report.problems[0].message
    # The tamperer also re-signs nothing: changing the checkpoint's sha256 breaks it.
    cp_path = copy / STREAM / segments[0].name.replace(SEGMENT_SUFFIX, CHECKPOINT_SUFFIX)
    cp = json.loads(cp_path.read_bytes())
    cp["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    cp_path.write_text(json.dumps(cp))
    report, _ = await _prove(nc, signer, copy, archive)
    assert report.problems[0].kind == "checkpoint_invalid", report.to_dict()
    # A segment and its checkpoint gone: the sequences they held are missing.
    shutil.rmtree(copy)
    shutil.copytree(archive, copy)
    middle = segments[1]
    (copy / STREAM / middle.name).unlink()
    (copy / STREAM / middle.name.replace(SEGMENT_SUFFIX, CHECKPOINT_SUFFIX)).unlink()
    report, _ = await _prove(nc, signer, copy, archive)
    assert report.problems[0].kind == "missing", report.to_dict()
    # Only the segment file gone, its checkpoint kept.
    shutil.rmtree(copy)
    shutil.copytree(archive, copy)
    (copy / STREAM / middle.name).unlink()
    report, _ = await _prove(nc, signer, copy, archive)
    assert report.problems[0].kind == "segment_missing", report.to_dict()
    # The last segments gone: the window no longer follows the archive.
    shutil.rmtree(copy)
    shutil.copytree(archive, copy)
    last = segments[-1]
    (copy / STREAM / last.name).unlink()
    (copy / STREAM / last.name.replace(SEGMENT_SUFFIX, CHECKPOINT_SUFFIX)).unlink()
    report, _ = await _prove(nc, signer, copy, archive)
    assert report.problems[0].kind == "segment_missing", report.to_dict()
    # The untouched archive still proves whole.
    report, _ = await _prove(nc, signer, archive, archive)
    assert report.ok, report.to_dict()


async def test_a_round_cut_off_after_its_checkpoint_purges_only_what_it_covers(
    nc: NATS, tmp_path: Path
) -> None:
    """The broker killed between the checkpoint and the purge: the next round purges up
    to the checkpoint and no further, and the overlap still verifies."""
    _, archiver, signer = await _archived_stack(nc, tmp_path)
    js = nc.jetstream()
    purges: list[int] = []

    async def no_purge(stream: str, through: int) -> None:
        purges.append(through)
        raise asyncio.CancelledError  # the process dies here

    real_purge = archiver._purge
    archiver._purge = no_purge  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await archiver.archive_stream(STREAM)
    assert (await js.stream_info(STREAM)).state.first_seq == 1
    # Checkpointed, not purged: both proofs hold over the overlap.
    report, _ = await _prove(nc, signer, None, tmp_path / "archive")
    assert report.ok, report.to_dict()
    report, _ = await _prove(nc, signer, tmp_path / "archive", tmp_path / "archive")
    assert report.ok, report.to_dict()
    archiver._purge = real_purge  # type: ignore[method-assign]
    await archiver.round()
    info = await js.stream_info(STREAM)
    assert info.state.first_seq > purges[0] + 1
    report, _ = await _prove(nc, signer, tmp_path / "archive", tmp_path / "archive")
    assert report.ok, report.to_dict()


async def test_entries_older_than_the_age_bound_are_archived_though_the_window_has_room(
    nc: NATS, tmp_path: Path
) -> None:
    js = nc.jetstream()
    writer = AuditWriter(js, "test", limit=LIMIT)
    await writer.ensure_stream()
    for i in range(5):
        await writer.append("Sign", "ok", target=f"old{i}")
    await asyncio.sleep(1.2)  # the entries must be older than the bound: time must pass
    await writer.append("Sign", "ok", target="new")
    archiver = Archiver(
        js, tmp_path / "archive", SoftSigner(), dataclasses.replace(POLICY, max_age_s=1.0)
    )
    assert (await archiver.round())[STREAM] == 5
    assert (await js.stream_info(STREAM)).state.first_seq == 6


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs for the archive: room for a few segments only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=60, check=True)


async def test_a_full_archive_disk_purges_nothing_refuses_with_audit_full_and_recovers(
    nc: NATS, small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 21, item 3: the archive's file system fills; the round fails typed
    (audit.archive_no_space) leaving no partial file and purging nothing; the stream
    fills to its limit and appends are refused (audit.full), none dropped; once space
    returns the archiver catches up and appends go on."""
    js = nc.jetstream()
    writer = AuditWriter(js, "test", limit=LIMIT)
    await writer.ensure_stream()
    signer = SoftSigner()
    archive = small_fs / "archive"
    archiver = Archiver(js, archive, signer, POLICY)
    filler = small_fs / "filler"
    with pytest.raises(OSError) as no_space, filler.open("wb") as out:  # all 256 KiB
        for _ in range(1024):
            out.write(b"\0" * 1024)
            out.flush()
    assert no_space.value.errno == errno.ENOSPC
    await _fill_past_window(writer, int(LIMIT.max_bytes * 0.75))
    with pytest.raises(ResourceExhausted) as refused:
        await archiver.round()
    assert refused.value.reason == "audit.archive_no_space"
    # kmsctl status says so, as a warning (the records are safe in the stream).
    line = archive_status(archiver)
    assert line.ok and line.detail.startswith("warning, archiving behind: audit.archive_no_space")
    assert (await js.stream_info(STREAM)).state.first_seq == 1  # nothing purged
    leftovers = [p.name for p in archive.rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith(TMP_SUFFIX) or n.endswith(SEGMENT_SUFFIX)]
    # Archiving is behind: the stream fills up and appends are refused, not dropped.
    appended = 0
    with pytest.raises(ResourceExhausted) as full:
        for _ in range(10_000):
            await writer.append("Sign", "ok", target="pressure")
            appended += 1
    assert full.value.reason == "audit.full"
    last = (await js.stream_info(STREAM)).state.last_seq
    # Space returns: the next round archives down to the window and appends go on.
    filler.unlink()
    deadline = asyncio.get_running_loop().time() + 60 * SLOWDOWN
    while True:
        try:
            await archiver.round()
            break
        except ResourceExhausted:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    info = await js.stream_info(STREAM)
    assert info.state.bytes <= LIMIT.max_bytes * POLICY.window_fraction
    assert not archive_status(archiver).detail.startswith("warning")
    await writer.append("Sign", "ok", target="after")
    report, _ = await _prove(nc, signer, archive, archive)
    assert report.ok, report.to_dict()
    assert report.messages == last + 1


async def test_a_checkpoint_planted_in_the_archive_dir_purges_nothing(
    nc: NATS, tmp_path: Path
) -> None:
    """Whoever can write the archive dir but not sign in the token plants a checkpoint
    "covering" the whole stream, hoping the archiver's catch-up purge removes entries
    never archived: refused (audit.archive_failed), nothing purged."""
    _, archiver, signer = await _archived_stack(nc, tmp_path)
    js = nc.jetstream()
    last = (await js.stream_info(STREAM)).state.last_seq
    folder = tmp_path / "archive" / STREAM
    folder.mkdir(parents=True)
    segment = folder / segment_name(1, last - 1)
    segment.write_bytes(gzip.compress(b""))
    other = SoftSigner()
    forged = Checkpoint(
        stream=STREAM,
        writer="test",
        first_seq=1,
        last_seq=last - 1,
        hash="0" * 64,
        messages=last - 1,
        time="2026-01-01T00:00:00.000000Z",
        segment=segment.name,
        sha256=hashlib.sha256(segment.read_bytes()).hexdigest(),
        key=await other.key_id(),
    )
    forged = dataclasses.replace(forged, signature=(await other.sign(forged.digest())).hex())
    (folder / checkpoint_name(1, last - 1)).write_bytes(forged.to_json())
    with pytest.raises(Unavailable) as refused:
        await archiver.round()
    assert refused.value.reason == "audit.archive_failed"
    info = await js.stream_info(STREAM)
    assert (info.state.first_seq, info.state.last_seq) == (1, last)
    # The same with the genuine key but another segment's bytes: refused as well.
    genuine = dataclasses.replace(forged, key=await signer.key_id(), sha256="1" * 64)
    genuine = dataclasses.replace(genuine, signature=(await signer.sign(genuine.digest())).hex())
    (folder / checkpoint_name(1, last - 1)).write_bytes(genuine.to_json())
    with pytest.raises(Unavailable):
        await archiver.round()
    assert (await js.stream_info(STREAM)).state.first_seq == 1


def _sample(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"service": "broker", **labels})


async def test_the_brokers_chain_check_starts_a_pruned_stream_at_its_checkpoint(
    nc: NATS, tmp_path: Path
) -> None:
    """The broker's periodic chain check (edgekms_audit_chain_ok) after a restart on a
    pruned stream: it starts at the window, linked to the newest checkpoint, and stays
    whole; before, it read the purged entries as missing. A tampered first entry of the
    window, or a checkpoint that does not verify, still turns it to 0."""
    writer, archiver, signer = await _archived_stack(nc, tmp_path)
    js = nc.jetstream()
    await archiver.round()
    info = (await js.stream_info(STREAM)).state
    assert info.first_seq > 1
    metrics = ServiceMetrics("broker")
    check = AuditChainCheck(js, metrics, archiver)  # a broker just restarted
    await check.run_once()
    assert _sample(metrics, "edgekms_audit_chain_ok") == 1, check.verifier.report.to_dict()
    assert _sample(metrics, "edgekms_audit_chain_entries", stream=STREAM) == info.messages
    # Appends after the purge, and a later pass, keep it whole.
    await writer.append("Sign", "ok", client="alice", role="signer", target="after")
    await check.run_once()
    assert _sample(metrics, "edgekms_audit_chain_ok") == 1, check.verifier.report.to_dict()
    # A broker that does not archive (another one does) starts unlinked, and whole.
    other = ServiceMetrics("broker")
    await AuditChainCheck(js, other).run_once()
    assert _sample(other, "edgekms_audit_chain_ok") == 1

    # The newest checkpoint altered after signing: the purge it vouched for is not.
    newest = checkpoint_files(tmp_path / "archive", STREAM)[-1]
    genuine = Checkpoint.from_json(newest.read_bytes())
    newest.write_bytes(dataclasses.replace(genuine, hash="0" * 64).to_json())
    forged = ServiceMetrics("broker")
    check = AuditChainCheck(js, forged, archiver)
    await check.run_once()
    assert _sample(forged, "edgekms_audit_chain_ok") == 0
    assert [p.kind for p in check.verifier.report.problems] == ["checkpoint_invalid"]
    # Signed, but with another head than the window's first entry links to.
    moved = dataclasses.replace(genuine, hash="1" * 64)
    moved = dataclasses.replace(moved, signature=(await signer.sign(moved.digest())).hex())
    newest.write_bytes(moved.to_json())
    relinked = ServiceMetrics("broker")
    check = AuditChainCheck(js, relinked, archiver)
    await check.run_once()
    assert _sample(relinked, "edgekms_audit_chain_ok") == 0
    assert [p.kind for p in check.verifier.report.problems] == ["prev_mismatch"]


async def test_stream_fill_and_archiver_state_are_metrics(nc: NATS, tmp_path: Path) -> None:
    """Issue 21, item 3: a metric well before the window's limit. Each stream's bytes,
    messages, limits and fill ratio (what `kmsctl status` warns on from 0.8), and whether
    the archiver's last round went well."""
    writer, archiver, _ = await _archived_stack(nc, tmp_path)
    js = nc.jetstream()
    metrics = ServiceMetrics("broker")
    check = AuditChainCheck(js, metrics, archiver)
    await check.run_once()
    state = (await js.stream_info(STREAM)).state
    labels = {"stream": STREAM}
    assert _sample(metrics, "edgekms_audit_stream_bytes", **labels) == state.bytes
    assert _sample(metrics, "edgekms_audit_stream_max_bytes", **labels) == LIMIT.max_bytes
    assert _sample(metrics, "edgekms_audit_stream_messages", **labels) == state.messages
    assert _sample(metrics, "edgekms_audit_stream_max_messages", **labels) == LIMIT.max_msgs
    filled = _sample(metrics, "edgekms_audit_stream_fill_ratio", **labels)
    assert filled is not None and filled >= 0.75
    assert filled == pytest.approx(state.bytes / LIMIT.max_bytes)
    # No round yet: not failing, never succeeded.
    assert _sample(metrics, "edgekms_audit_archive_ok") == 1
    assert _sample(metrics, "edgekms_audit_archive_last_success_timestamp_seconds") == 0
    await archiver.round()
    await check.run_once()
    filled = _sample(metrics, "edgekms_audit_stream_fill_ratio", **labels)
    assert filled is not None and filled <= POLICY.window_fraction
    ok_at = _sample(metrics, "edgekms_audit_archive_last_success_timestamp_seconds")
    assert ok_at is not None and ok_at == archiver.last_ok_at
    # A round that fails (its archive dir is a file now): 0 until one goes well again.
    shutil.move(tmp_path / "archive", tmp_path / "moved")
    (tmp_path / "archive").write_bytes(b"not a directory")
    await _fill_past_window(writer, int(LIMIT.max_bytes * 0.75))
    with pytest.raises(Unavailable):
        await archiver.round()
    await check.run_once()
    assert _sample(metrics, "edgekms_audit_archive_ok") == 0
    (tmp_path / "archive").unlink()
    shutil.move(tmp_path / "moved", tmp_path / "archive")
    await archiver.round()
    await check.run_once()
    assert _sample(metrics, "edgekms_audit_archive_ok") == 1
    assert (_sample(metrics, "edgekms_audit_archive_last_success_timestamp_seconds") or 0) > ok_at
