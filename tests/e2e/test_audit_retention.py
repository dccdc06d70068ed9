"""Issue 21 on a live `kmsctl up`: the broker's stream is given 512 KiB, signs run past
it, the broker's archiver archives and prunes (checkpoints signed in the token with the
internal CA's key), every Sign is still recorded, and `kmsctl audit verify` proves the
window and, with --archive, archives and window end to end; a tampered segment and a
forged checkpoint are found."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekms.errors import ResourceExhausted
from edgekms.retention import SEGMENT_SUFFIX, Checkpoint, checkpoint_files
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(600)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
STREAM = "KMS_AUDIT_BROKER"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    running = start_stack(
        tmp_path_factory.mktemp("retention") / "data",
        "--audit-limit",
        "broker=512KiB",
        "--audit-archive-interval",
        "1",
    )
    try:
        yield running
    finally:
        assert stop_stack(running) == 0


def _kmsctl(stack: KmsStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMSCTL, *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=300 * SLOWDOWN,
    )


def _verify(stack: KmsStack, *args: str) -> tuple[int, dict[str, object]]:
    result = _kmsctl(stack, "audit", "verify", "-o", "json", *args)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def _sign_past_the_window(stack: KmsStack, at_least: int, checkpoints: int) -> int:
    """Signs until `at_least` went through and the archiver wrote `checkpoints`."""
    archive = stack.data_dir / "audit-archive"
    signed = 0
    with stack.client() as client:
        name = f"retention/key{time.monotonic_ns()}"
        client.create_key(name, "ec-p256")
        deadline = time.monotonic() + 300 * SLOWDOWN
        # Past the stream's 512 KiB of Sign entries (about 450 bytes each) and more:
        # without the archiver the stream would be full and Signs refused.
        refused = 0
        while signed < at_least or len(checkpoint_files(archive, STREAM)) < checkpoints:
            assert time.monotonic() < deadline, (signed, refused, list(archive.rglob("*")))
            try:
                assert client.sign(name, b"entry %d" % signed)
            except ResourceExhausted as exc:
                # The documented policy when archiving falls behind (a busy CI machine
                # can outsign a 1 s archiver on 512 KiB): refused, never dropped. The
                # archiver must catch up and the same Sign then go through.
                assert exc.reason == "audit.full", exc
                refused += 1
                time.sleep(0.05)
                continue
            signed += 1
    return signed


def test_signing_past_the_limit_is_archived_pruned_and_proven(stack: KmsStack) -> None:
    archive = stack.data_dir / "audit-archive"
    signed = _sign_past_the_window(stack, 2000, 3)
    checkpoints = [Checkpoint.from_json(p.read_bytes()) for p in checkpoint_files(archive, STREAM)]
    assert checkpoints[0].first_seq == 1
    # Segments of a size worth a file: past the window it archives down to 3/4 of it.
    assert len(checkpoints) < signed / 100, (len(checkpoints), signed)
    code, report = _verify(stack)
    assert code == 0, report
    status = json.loads(_kmsctl(stack, "status", "-o", "json").stdout)
    lines = {c["name"]: c for c in status["components"]}
    assert lines["audit/archive"]["ok"] and str(archive) in lines["audit/archive"]["detail"]
    assert not str(lines["audit/broker"]["detail"]).startswith(("warning", "FULL"))
    assert report["problem_count"] == 0
    streams = report["streams"]
    assert isinstance(streams, dict) and streams[STREAM] > checkpoints[-1].last_seq
    assert report["checkpoints"][STREAM] >= checkpoints[-1].last_seq  # type: ignore[index]
    code, whole = _verify(stack, "--archive", str(archive))
    assert code == 0, whole
    # The archiver goes on meanwhile: at least the segments listed before.
    assert int(whole["archived_segments"]) >= len(checkpoints)  # type: ignore[call-overload]
    # End to end: every Sign is an entry, in the archive or in the window.
    assert int(whole["entries"]) >= signed  # type: ignore[call-overload]
    text = _kmsctl(stack, "audit", "verify", "--archive", str(archive))
    assert text.returncode == 0 and "archived segment(s)" in text.stdout, text.stdout

    # A copy shipped away and altered: one entry's outcome rewritten in a segment.
    copy = stack.data_dir.parent / "shipped"
    shutil.copytree(archive, copy)
    import gzip

    segment = sorted((copy / STREAM).glob(f"*{SEGMENT_SUFFIX}"))[0]
    genuine_text = gzip.decompress(segment.read_bytes())
    # Compact entries (format 3) store the outcome as "o", escaped inside each line's raw.
    data = genuine_text.replace(b'\\"o\\":\\"ok\\"', b'\\"o\\":\\"no\\"', 1)
    assert data != genuine_text and len(data) == len(genuine_text)
    segment.write_bytes(gzip.compress(data))
    code, broken = _verify(stack, "--archive", str(copy))
    assert code == 1
    assert broken["first_problem"]["kind"] == "archive_tampered", broken  # type: ignore[index]

    # The broker's newest checkpoint replaced by one whose hash was moved: refused.
    newest = checkpoint_files(archive, STREAM)[-1]
    genuine = newest.read_bytes()
    body = json.loads(genuine)
    body["hash"] = "0" * 64
    try:
        newest.write_text(json.dumps(body, sort_keys=True, separators=(",", ":")))
        code, forged = _verify(stack)
        assert code == 1
        assert forged["first_problem"]["kind"] == "checkpoint_invalid", forged  # type: ignore[index]
    finally:
        newest.write_bytes(genuine)
    code, report = _verify(stack)
    assert code == 0, report


def _scrape(stack: KmsStack) -> dict[str, float]:
    """The broker's /metrics as {series with labels: value}."""
    import urllib.request

    url = str(dict(stack.state()["metrics"])["broker"])  # type: ignore[call-overload]
    with urllib.request.urlopen(url, timeout=10 * SLOWDOWN) as answer:  # noqa: S310 - loopback
        text = answer.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def test_a_restarted_broker_checks_the_pruned_chain_whole_and_reports_the_fill(
    stack: KmsStack,
) -> None:
    """Issue 21, item 3's metric, and the broker's chain check across a restart: the
    stream was pruned before this broker started, so its check begins at the window
    from the newest checkpoint (it used to read the archived entries as missing and
    report the chain broken). The fill stays near the window and the archiver is ok."""
    _sign_past_the_window(stack, 200, 1)
    assert stop_stack(stack) == 0
    restarted = start_stack(
        stack.data_dir, "--audit-limit", "broker=512KiB", "--audit-archive-interval", "1"
    )
    try:
        _sign_past_the_window(restarted, 300, 1)
        chain_ok = 'edgekms_audit_chain_ok{service="broker"}'
        fill = f'edgekms_audit_stream_fill_ratio{{service="broker",stream="{STREAM}"}}'
        archive_ok = 'edgekms_audit_archive_ok{service="broker"}'
        checked = 'edgekms_audit_last_verification_timestamp_seconds{service="broker"}'
        deadline = time.monotonic() + 120 * SLOWDOWN
        while True:
            scraped = _scrape(restarted)
            if scraped.get(checked, 0) > 0 and archive_ok in scraped:
                break
            assert time.monotonic() < deadline, scraped
            time.sleep(0.5)
        assert scraped[chain_ok] == 1, scraped
        assert 0 < scraped[fill] < 0.8, scraped
        assert scraped[archive_ok] == 1, scraped
        code, report = _verify(restarted)
        assert code == 0, report
    finally:
        assert stop_stack(restarted) == 0
