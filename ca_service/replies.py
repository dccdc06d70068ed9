"""Where the CA's answers may go: only to the caller's inbox.

Whoever sends a request names the subject its answer is published on, and the CA's bus
grant may publish on its own bucket's subjects ($KV.kms_ca.>) and, with allow_responses,
on any reply subject: a caller naming `$KV.<bucket>.<key>` as its reply (a compromised
fleet device, across its leaf connection) would have the CA write its answer into that
key. Every client of the CA asks with an inbox (`_INBOX...`: edgekms.busauth.inbox_prefix,
nats.py's default, a fleet device's `_INBOX_<id>`), so anything else is dropped
unanswered and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgekms.busauth import INBOX_ROOT
from edgekms.logs import fields

log = logging.getLogger(__name__)


def reply_subject(req: Any) -> str:
    """The reply subject of a nats.micro request (its message's; micro keeps it private)."""
    return str(getattr(getattr(req, "_msg", None), "reply", "") or "")


def inbox_only(
    handle: Callable[[Any], Awaitable[None]], prefix: str = INBOX_ROOT
) -> Callable[[Any], Awaitable[None]]:
    """`handle`, for requests whose reply subject is under `prefix`; others dropped."""

    async def guarded(req: Any) -> None:
        reply = reply_subject(req)
        if not reply.startswith(prefix):
            log.warning(
                "request with a reply subject outside the inboxes dropped",
                extra=fields(subject=str(req.subject)[:120], reply=reply[:120]),
            )
            return
        await handle(req)

    return guarded


__all__ = ["inbox_only", "reply_subject"]
