"""The broker records every decision, serves the log, and refuses to work unrecorded;
kmsctl tails it and names the first broken link. Real nats-server, SoftHSM, kms-crypto
and kms-broker processes throughout."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from edgekms import errors
from edgekms.audit import (
    AuditWriter,
    ChainVerifier,
    parse_entry,
    stored_form,
    stream_config,
    writer_stream,
)
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from tests.audit.helpers import rewrite, stored
from tests.e2e.conftest import Parts

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
BROKER = writer_stream("broker")


def _kmsctl(parts: Parts, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMSCTL, *args, "--config", str(parts.client_config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "EDGEKMS_DATA_DIR": str(parts.root)},
    )


def _entries(client: KMSClient, after: int) -> list[dict[str, Any]]:
    """The broker's entries after sequence `after`, TailAudit's own records left out."""
    out = []
    for item in client.tail_audit(after + 1, writer="broker"):
        if item.HasField("record"):
            entry = parse_entry(item.record.raw)
            if entry["action"] != "TailAudit":
                out.append(entry)
    return out


def _last_seq(client: KMSClient) -> int:
    for item in client.tail_audit(1, writer="broker"):
        if item.HasField("state"):
            return item.state.last_seq
    raise AssertionError("no state from TailAudit")


def _js(parts: Parts, action: Any) -> Any:
    async def run() -> Any:
        nc = await nats.connect(parts.nats.url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _verify_whole(client: KMSClient) -> int:
    verifier = ChainVerifier()
    last: int | None = None
    for item in client.tail_audit(1):
        if item.HasField("state"):
            if last is not None:
                verifier.end_stream(last)
            verifier.begin_stream(item.state.stream)
            last = item.state.last_seq
        else:
            verifier.feed(item.record.seq, item.record.raw)
    report = verifier.finish(last)
    assert report.ok, report.problems
    return report.entries


def test_every_decision_appends_one_entry(audit_parts: Parts) -> None:
    signer_only = pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KEY_OPERATION_SIGN])]
    )
    with audit_parts.client() as client:
        start = _last_seq(client)
        client.create_key("aud-web", "ec-p256", request_id="rq-create")
        client.sign("aud-web", b"hello")
        client.create_key("aud-locked", "ec-p256", policy=signer_only)
        with pytest.raises(errors.PermissionDenied):
            client.sign("aud-locked", b"hello")
        client.disable_key("aud-web", request_id="rq-disable")
        entries = _entries(client, start)
        whole = _verify_whole(client)
    assert [(e["action"], e["target"], e["outcome"]) for e in entries] == [
        ("CreateKey", "aud-web", "ok"),
        ("Sign", "aud-web", "ok"),
        ("CreateKey", "aud-locked", "ok"),
        ("Sign", "aud-locked", "authz.policy_denied"),
        ("DisableKey", "aud-web", "ok"),
    ]
    assert all(e["actor"] == {"client": "admin", "role": "admin"} for e in entries)
    assert all(e["writer"] == "broker" for e in entries)
    create, sign, _, denied, disable = entries
    assert create["request_id"] == "rq-create"
    assert create["details"]["provider"] == "hsm0"
    assert create["details"]["key_type"] == "key_type_ec_p256"
    assert sign["details"]["algorithm"].startswith("signature_algorithm_ecdsa")
    assert denied["details"]["algorithm"] == sign["details"]["algorithm"]
    assert disable["request_id"] == "rq-disable" and disable["details"]["state"] == "disabled"
    assert whole > start


def test_a_refused_change_is_one_entry_with_its_reason(audit_parts: Parts) -> None:
    """A change refused for the state it finds (a name in use, a destroyed key) is
    decided before anything is recorded: one entry, with the refusal as its outcome, not
    an "ok" followed by the refusal (issue 14, item 7)."""
    with audit_parts.client() as client:
        start = _last_seq(client)
        client.create_key("aud-once", "ec-p256")
        with pytest.raises(errors.AlreadyExists):
            client.create_key("aud-once", "ec-p256")
        client.destroy_key("aud-once")
        with pytest.raises(errors.FailedPrecondition) as destroyed:
            client.enable_key("aud-once")
        assert destroyed.value.reason == "key.destroyed"
        entries = _entries(client, start)
        _verify_whole(client)
    assert [(e["action"], e["target"], e["outcome"]) for e in entries] == [
        ("CreateKey", "aud-once", "ok"),
        ("CreateKey", "aud-once", "key.exists"),
        ("DestroyKey", "aud-once", "ok"),
        ("EnableKey", "aud-once", "key.destroyed"),
    ]
    assert not any("after" in e["details"] for e in entries)


def test_kmsctl_tail_n_prints_the_newest_entries(audit_parts: Parts) -> None:
    """`audit tail -n N` is tail(1)'s: the newest N, oldest of them first (it printed
    the oldest N). The two reads it makes are audited and are the newest of all."""
    with audit_parts.client() as client:
        client.create_key("aud-newest", "ec-p256")
    result = _kmsctl(audit_parts, "audit", "tail", "-n", "3", "-o", "json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line)["entry"] for line in result.stdout.splitlines()]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("CreateKey", "aud-newest"),
        ("TailAudit", ""),
        ("TailAudit", ""),
    ]
    text = _kmsctl(audit_parts, "audit", "tail", "-n", "1")
    assert text.returncode == 0 and "TailAudit" in text.stdout.splitlines()[-1]
    assert len(text.stdout.splitlines()) == 2  # the header and one entry


def test_kmsctl_tail_json_and_verify(audit_parts: Parts) -> None:
    with audit_parts.client() as client:
        client.list_keys()
    result = _kmsctl(audit_parts, "audit", "tail", "-o", "json", "--writer", "broker")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    seqs = [line["seq"] for line in lines]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 2
    assert any(line["entry"]["action"] == "ListKeys" for line in lines)
    assert {line["stream"] for line in lines} == {"KMS_AUDIT_BROKER"}
    text = _kmsctl(audit_parts, "audit", "tail", "--from", str(seqs[-1]), "--writer", "broker")
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    assert header.split()[:2] == ["WRITER", "SEQ"]
    # Numbers restart in each writer's stream: each line names its stream's writer.
    assert rows and all(row.split()[0] == "broker" for row in rows)
    assert rows[0].split()[1] == str(seqs[-1])
    verified = _kmsctl(audit_parts, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("audit chain whole:")
    as_json = json.loads(_kmsctl(audit_parts, "audit", "verify", "-o", "json").stdout)
    assert as_json["ok"] is True and as_json["first_problem"] is None
    assert as_json["entries"] >= as_json["streams"]["KMS_AUDIT_BROKER"] > len(seqs)


def test_kmsctl_tail_and_verify_expand_batches(audit_parts: Parts) -> None:
    """Group-committed batch messages: tail prints one line per entry, verify walks into
    them and counts entries, not messages."""

    async def burst(js: Any) -> list[Any]:
        writer = AuditWriter(js, "burst")
        await writer.ensure_stream()
        return list(
            await asyncio.gather(*(writer.append("Sign", "ok", target=f"b{i}") for i in range(40)))
        )

    appended = _js(audit_parts, burst)
    first = min(a.seq for a in appended)
    result = _kmsctl(
        audit_parts, "audit", "tail", "-o", "json", "--from", str(first), "--writer", "burst"
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    mine = [line for line in lines if line["entry"]["writer"] == "burst"]
    assert [(m["seq"], m["index"]) for m in mine] == [(a.seq, a.index) for a in appended]
    assert [m["entry"]["target"] for m in mine] == [f"b{i}" for i in range(40)]
    assert max(m["index"] for m in mine) > 0  # at least one message held several entries
    text = _kmsctl(audit_parts, "audit", "tail", "--from", str(first), "--writer", "burst")
    assert f"{appended[-1].seq}#{appended[-1].index}" in text.stdout
    as_json = json.loads(_kmsctl(audit_parts, "audit", "verify", "-o", "json").stdout)
    assert as_json["ok"] is True, as_json["problems"]
    assert as_json["entries"] > as_json["messages"]
    assert as_json["streams"]["KMS_AUDIT_BURST"] == max(a.seq for a in appended)
    # TailAudit's typed view holds every entry of a batch too, not only the raw bytes.
    with audit_parts.client() as client:
        typed = [
            (item.record.seq, index, entry.target)
            for item in client.tail_audit(first, writer="burst")
            if item.HasField("record")
            for index, entry in enumerate(item.record.entries)
            if entry.writer == "burst"
        ]
    assert typed == [(a.seq, a.index, f"b{i}") for i, a in enumerate(appended)]


class _Lines:
    """A child's stdout read line by line on a thread, so that the test can wait for
    each line with a deadline instead of guessing how long the child needs."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def next(self, timeout: float = 60.0) -> str | None:
        """The next line, or None once the child closed its output."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s") from None


def test_kmsctl_tail_follow_sees_new_entries(audit_parts: Parts) -> None:
    """`-f` keeps the call open and prints entries written after it started.

    The follower's first line is its own TailAudit entry, which the broker writes once
    the call is authorised; only after that line is read are three GetStatus calls
    made. Without following, the tail would end at the entries present when it began
    and close its output before they arrive."""
    with audit_parts.client() as client:
        start = _last_seq(client) + 1
    argv = [KMSCTL, "audit", "tail", "-f", "-o", "json", "--from", str(start), "--count", "4"]
    process = subprocess.Popen(
        [*argv, "--config", str(audit_parts.client_config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _Lines(process)
        first = lines.next()
        assert first is not None, "the tail ended before printing anything"
        started = json.loads(first)
        assert started["entry"]["action"] == "TailAudit"
        assert started["entry"]["details"]["follow"] == "true"
        with audit_parts.client() as client:
            for _ in range(3):
                client.status()
        later: list[dict[str, Any]] = []
        for _ in range(3):
            line = lines.next()
            assert line is not None, f"the tail stopped following after {1 + len(later)} lines"
            later.append(json.loads(line))
        process.wait(timeout=60)  # --count 4 reached: it ends by itself
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    assert started["seq"] == start
    assert [line["seq"] for line in later] == [start + 1, start + 2, start + 3]
    assert [line["entry"]["action"] for line in later] == ["GetStatus"] * 3


def test_signer_may_not_read_the_log(audit_parts: Parts) -> None:
    from tests.e2e.test_broker import _client_with, issue_client_cert

    stack: Any = SimpleNamespace(
        nats_url=audit_parts.nats.url,
        data_dir=audit_parts.root,
        broker=f"127.0.0.1:{audit_parts.broker_port}",
        # The parts run an open bus with unsealed records: no credentials, no seal.
        nats_options=lambda user="kmsctl": {},
        open_record=lambda bucket, key, value: value,
    )
    cert, key = issue_client_cert(stack, "reader", "signer")
    with audit_parts.client() as admin:
        start = _last_seq(admin)
    with _client_with(stack, cert, key) as client, pytest.raises(errors.PermissionDenied) as caught:
        list(client.tail_audit(1))
    assert caught.value.reason == "authz.role_denied"
    with audit_parts.client() as admin:
        denied = [e for e in _entries_all(admin, start) if e["actor"]["client"] == "reader"]
    assert [(e["action"], e["outcome"]) for e in denied] == [("TailAudit", "authz.role_denied")]


def _entries_all(client: KMSClient, after: int) -> list[dict[str, Any]]:
    return [
        parse_entry(item.record.raw)
        for item in client.tail_audit(after + 1, writer="broker")
        if item.HasField("record")
    ]


def test_verify_names_tampered_reordered_and_deleted_entries(parts: Parts) -> None:
    with parts.client() as client:
        client.create_key("t", "ec-p256")
        for _ in range(5):
            client.sign("t", b"x")
    assert _kmsctl(parts, "audit", "verify").returncode == 0

    async def tamper(js: Any) -> None:
        messages = [(raw, subject) for _, raw, subject in await stored(js, BROKER)]
        entry = parse_entry(messages[2][0])  # the long form, whatever the format stored
        entry["outcome"] = "authz.policy_denied"
        forged = json.dumps(stored_form(entry)).encode()
        await rewrite(
            js,
            [*messages[:2], (forged, messages[2][1]), *messages[3:]],
            "broker",
        )

    async def broker_stored(js: Any) -> list[tuple[int, bytes, str]]:
        return await stored(js, BROKER)

    original = _js(parts, broker_stored)
    _js(parts, tamper)
    result = _kmsctl(parts, "audit", "verify", "-o", "json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (
        report["first_problem"]["seq"] == 3 and report["first_problem"]["kind"] == "hash_mismatch"
    )

    async def restore(js: Any) -> None:
        now = [(raw, subject) for _, raw, subject in await stored(js, BROKER)]
        now[2] = (original[2][1], original[2][2])
        await rewrite(js, now, "broker")

    _js(parts, restore)
    assert _kmsctl(parts, "audit", "verify").returncode == 0

    async def swap(js: Any) -> None:
        now = [(raw, subject) for _, raw, subject in await stored(js, BROKER)]
        now[3], now[4] = now[4], now[3]
        await rewrite(js, now, "broker")

    _js(parts, swap)
    result = _kmsctl(parts, "audit", "verify")
    assert result.returncode == 1
    assert result.stdout.startswith("audit chain broken at entry KMS_AUDIT_BROKER 4:"), (
        result.stdout
    )
    assert "reordered" in result.stdout
    _js(parts, swap)  # swapping back restores the chain
    assert _kmsctl(parts, "audit", "verify").returncode == 0

    async def delete(js: Any) -> None:
        await js.delete_msg(BROKER, 6)

    _js(parts, delete)
    result = _kmsctl(parts, "audit", "verify")
    assert result.returncode == 1
    assert result.stdout.startswith("audit chain broken at entry KMS_AUDIT_BROKER 6:"), (
        result.stdout
    )
    assert "missing" in result.stdout


def test_unwritable_log_refuses_the_operation(parts: Parts) -> None:
    with parts.client(timeout=5) as client:
        client.create_key("fc", "ec-p256")
        assert client.sign("fc", b"before")

        async def drop(js: Any) -> None:
            await js.delete_stream(BROKER)

        _js(parts, drop)
        with pytest.raises(errors.Unavailable) as caught:
            client.sign("fc", b"unrecorded")
        assert caught.value.reason == "audit.unavailable"
        with pytest.raises(errors.Unavailable):
            client.disable_key("fc")
        with pytest.raises(errors.Unavailable):
            client.get_key("fc")

        async def recreate(js: Any) -> None:
            await js.add_stream(stream_config("broker"))

        _js(parts, recreate)
        assert client.get_key("fc").state == pb.KEY_STATE_ACTIVE  # the disable never happened
        assert client.sign("fc", b"after")
        _verify_whole(client)


def test_chain_survives_kill_9_of_every_component(parts: Parts) -> None:
    stop = threading.Event()
    outcomes: list[str] = []

    def busy() -> None:
        with parts.client(timeout=3) as client:
            while not stop.is_set():
                try:
                    client.sign("k9", b"load")
                    outcomes.append("ok")
                except errors.KMSError as exc:
                    outcomes.append(exc.reason)
                    time.sleep(0.05)

    with parts.client() as client:
        client.create_key("k9", "ec-p256")
    threads = [threading.Thread(target=busy) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        parts.stop("broker", signal.SIGKILL)
        parts.start_broker()
        time.sleep(1.0)
        parts.stop("crypto", signal.SIGKILL)
        time.sleep(0.5)
        parts.start_crypto()
        time.sleep(0.5)
        parts.nats.kill()
        parts.nats.start()
        deadline = time.monotonic() + 30
        seen = len(outcomes)
        while time.monotonic() < deadline and outcomes[seen:].count("ok") < 5:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert outcomes.count("ok") > 10
    with parts.client() as client:
        assert client.sign("k9", b"after")
    result = _kmsctl(parts, "audit", "verify", "-o", "json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, report["problems"]
    assert report["entries"] >= outcomes.count("ok")


def test_a_sign_that_fails_after_its_decision_is_recorded_twice(parts: Parts) -> None:
    """A unary Sign stores its "ok" entry while the token signs (broker/audit_service.py,
    record_alongside). When the signature then fails (here: no crypto service answers),
    the failure is a second entry chained after the first, naming it, and the caller
    gets the failure, not a signature."""
    with parts.client(timeout=10) as client:
        client.create_key("fa", "ec-p256")
        assert client.sign("fa", b"before")
        start = _last_seq(client)
        parts.stop("crypto")
        with pytest.raises(errors.KMSError) as caught:
            client.sign("fa", b"nobody signs")
        entries = [e for e in _entries(client, start) if e["action"] == "Sign"]
        _verify_whole(client)
    assert [(e["target"], e["outcome"]) for e in entries] == [
        ("fa", "ok"),
        ("fa", caught.value.reason),
    ]
    decided, failed = entries
    assert decided["request_id"] and decided["request_id"] == failed["request_id"]
    assert "after" not in decided["details"]
    assert failed["details"]["after"] == "ok recorded before the signature"
    assert caught.value.reason.startswith("provider.")
