"""record_alongside (broker/audit_service.py): a unary Sign's audit entry is stored while
the signature is made, and the answer waits for both. Pure logic: a stand-in writer whose
append the test controls, inside a real AuditScope."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.audit_service import AuditScope, record_alongside
from edgekms.errors import DeadlineExceeded, Unavailable


class Writer:
    """Stands in for AuditWriter.append: records each entry, optionally waits for `gate`
    or fails with `error` first."""

    def __init__(self, gate: asyncio.Event | None = None, error: Exception | None = None):
        self.gate = gate
        self.error = error
        self.entries: list[tuple[str, dict[str, str]]] = []
        self.started = asyncio.Event()

    async def append(self, action: str, outcome: str, **fields: Any) -> None:
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.entries.append((outcome, dict(fields["details"])))


async def _in_scope(writer: Writer, work: Any) -> tuple[AuditScope, Any]:
    scope = AuditScope.for_request(writer, "Sign", None)  # type: ignore[arg-type]
    token = scope.bind()
    try:
        return scope, await record_alongside(work, "the signature")
    finally:
        AuditScope.unbind(token)


async def test_the_entry_is_written_while_the_work_runs() -> None:
    # The work finishes only once the entry has started, and the entry only once the work
    # has: done one after the other, this would never finish.
    work_done = asyncio.Event()
    writer = Writer(gate=work_done)

    async def sign() -> bytes:
        await asyncio.wait_for(writer.started.wait(), 5)
        work_done.set()
        return b"signature"

    scope, result = await asyncio.wait_for(_in_scope(writer, sign()), 10)
    assert result == b"signature"
    assert writer.entries == [("ok", {})] and scope.recorded


async def test_the_answer_waits_for_the_entry() -> None:
    release = asyncio.Event()
    writer = Writer(gate=release)

    async def sign() -> bytes:
        return b"signature"

    task = asyncio.ensure_future(_in_scope(writer, sign()))
    await asyncio.wait_for(writer.started.wait(), 5)
    for _ in range(20):  # the signature is long done; the entry is not
        await asyncio.sleep(0)
    assert not task.done()
    release.set()
    _, result = await asyncio.wait_for(task, 5)
    assert result == b"signature"


async def test_an_unstorable_entry_drops_the_signature() -> None:
    writer = Writer(error=Unavailable("audit.unavailable", "the log is gone"))

    async def sign() -> bytes:
        return b"signature"

    with pytest.raises(Unavailable) as caught:
        await _in_scope(writer, sign())
    assert caught.value.reason == "audit.unavailable"


async def test_a_failed_signature_waits_for_the_decision_entry_then_settles_a_second() -> None:
    release = asyncio.Event()
    writer = Writer(gate=release)

    async def sign() -> bytes:
        raise DeadlineExceeded("provider.deadline", "no answer")

    scope = AuditScope.for_request(writer, "Sign", None)  # type: ignore[arg-type]
    token = scope.bind()
    try:
        task = asyncio.ensure_future(record_alongside(sign(), "the signature"))
        await asyncio.wait_for(writer.started.wait(), 5)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()  # the failure must chain after the "ok"
        release.set()
        with pytest.raises(DeadlineExceeded) as caught:
            await asyncio.wait_for(task, 5)
        # What the rpc wrapper does next with the error:
        assert await scope.settle(caught.value) is caught.value
    finally:
        AuditScope.unbind(token)
    assert writer.entries == [
        ("ok", {}),
        ("provider.deadline", {"after": "ok recorded before the signature"}),
    ]


async def test_without_a_writer_the_work_is_simply_awaited() -> None:
    async def sign() -> bytes:
        return b"signature"

    assert await record_alongside(sign(), "the signature") == b"signature"  # no scope
    scope = AuditScope.for_request(None, "Sign", None)
    token = scope.bind()
    try:
        assert await record_alongside(sign(), "the signature") == b"signature"
    finally:
        AuditScope.unbind(token)
    assert not scope.recorded


async def test_a_cancelled_caller_leaves_its_entry_to_finish() -> None:
    release = asyncio.Event()
    writer = Writer(gate=release)
    never = asyncio.Event()

    async def sign() -> bytes:
        await never.wait()
        return b"signature"

    task = asyncio.ensure_future(_in_scope(writer, sign()))
    await asyncio.wait_for(writer.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(100):
        if writer.entries:
            break
        await asyncio.sleep(0.01)
    assert writer.entries == [("ok", {})]  # the decision is on record all the same


async def test_a_cancelled_callers_failed_entry_is_logged_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    writer = Writer(gate=release, error=Unavailable("audit.unavailable", "the log is gone"))
    never = asyncio.Event()

    async def sign() -> bytes:
        await never.wait()
        return b"signature"

    task = asyncio.ensure_future(_in_scope(writer, sign()))
    await asyncio.wait_for(writer.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(100):
        if any("cancelled call failed" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    [record] = [r for r in caplog.records if "cancelled call failed" in r.getMessage()]
    assert record.fields == {"reason": "audit.unavailable"}  # type: ignore[attr-defined]
