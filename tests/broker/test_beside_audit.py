"""broker.audit_service.beside_audit: a write a handler starts beside the call's audit
record is finished before settle() returns, i.e. before the caller is answered, on
success and on failure alike (pure logic: no writer, so only the side writes run)."""

from __future__ import annotations

import asyncio

from broker.audit_service import AuditScope, beside_audit
from edgekms.errors import InvalidArgument


async def _write(done: list[str], name: str) -> None:
    await asyncio.sleep(0.05)
    done.append(name)


async def test_settle_waits_for_the_writes_beside_it() -> None:
    done: list[str] = []
    scope = AuditScope.for_request(None, "IssueCertificate", object())
    token = scope.bind()
    try:
        await beside_audit(_write(done, "answer"))
        assert done == []  # started, not awaited by the handler
        assert await scope.settle(None) is None
        assert done == ["answer"]
        await beside_audit(_write(done, "again"))
        err = InvalidArgument("x.y", "refused")
        assert await scope.settle(err) is err
        assert done == ["answer", "again"]
    finally:
        AuditScope.unbind(token)


async def test_outside_a_call_the_write_is_awaited() -> None:
    done: list[str] = []
    await beside_audit(_write(done, "alone"))
    assert done == ["alone"]
