"""Request ids: a state-changing call retried with the same id is done once.

A client that lost an answer (broker killed, bus restarted, deadline passed) cannot know
whether its CreateKey or IssueCertificate happened; it retries with the same
request_id. The broker keeps one entry per (client, request_id) in the KV bucket
kms_requests (entries expire after a day):

1. claim: create-if-absent of the entry in state "in_progress", with a fingerprint of
   the method and request body;
2. do the work;
3. store the serialized response (state "done"), or, when the work failed, delete the
   claim: handlers leave nothing half-done on error, so doing it again is safe.

A retry finds the entry: "done" returns the stored response (same key, same serial);
"in_progress" answers Unavailable("request.in_progress"), retryable; a different body
under the same id is InvalidArgument("request.id_reused"). A claim carries a lease: the
caller's deadline (the broker never works on a request past it) plus LEASE_GRACE, or
`takeover_after` when the call has no deadline. A claim whose broker died before step 3
outlives its lease: the next retry takes it over (CAS on the revision, so only one
does) and does the work again. That is safe because the work is
itself safe to repeat: CreateKey answers key.exists for a name already made, and the
CA derives a certificate's serial from the request id, so a repeated issue finds the
record the first attempt stored instead of making a second certificate.

For IssueCertificate that is all the protection needed, so no claim is written
(`claim=False`, broker.ca_forward.SELF_DEDUPLICATING): the entry is read for a stored
answer, the work runs, and its answer is stored beside the audit record. The CA refuses
another request under a used id itself (request.id_reused).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from broker.audit_service import beside_audit
from broker.buckets import open_bucket
from edgekms.errors import InvalidArgument, KMSError, Unavailable
from edgekms.identity import Identity
from edgekms.logs import fields
from edgekms.subjects import IDEMPOTENCY_BUCKET

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEFAULT_TTL = 24 * 3600.0
# The lease of a claim whose call has no deadline: the slowest call (CA Init, RSA keys
# on a TPM) is bounded by 120 s, so a little more.
DEFAULT_TAKEOVER = 130.0
# Added to the caller's deadline: the broker's own bookkeeping after the work.
LEASE_GRACE = 2.0
MAX_REQUEST_ID = 128

IN_PROGRESS = "in_progress"
DONE = "done"


def _replayed(
    stored: bytes, response_type: type[M], method: str, client: str, request_id: str | None
) -> M:
    """The answer a settled call of the same id gave, for its retry."""
    response = response_type()
    response.ParseFromString(stored)
    named = {} if request_id is None else {"request_id": request_id}
    log.info("request replayed", extra=fields(method=method, client=client, **named))
    return response


def entry_key(client: str, request_id: str) -> str:
    """KV keys allow few characters; client names and ids may hold any: hash them."""
    return hashlib.sha256(f"{client}\0{request_id}".encode()).hexdigest()


def fingerprint(method: str, request: Message) -> str:
    body = request.SerializeToString(deterministic=True)
    return hashlib.sha256(method.encode() + b"\0" + body).hexdigest()


@dataclass
class Entry:
    state: str
    fingerprint: str
    method: str
    at: float
    owner: str
    until: float = 0.0
    response: bytes = b""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "state": self.state,
                "fingerprint": self.fingerprint,
                "method": self.method,
                "at": self.at,
                "owner": self.owner,
                "until": self.until,
                "response": base64.b64encode(self.response).decode(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        data = json.loads(raw)
        return cls(
            state=str(data["state"]),
            fingerprint=str(data["fingerprint"]),
            method=str(data["method"]),
            at=float(data["at"]),
            owner=str(data["owner"]),
            until=float(data.get("until", 0.0)),
            response=base64.b64decode(data.get("response", "")),
        )


def _unavailable(exc: Exception) -> KMSError:
    if isinstance(exc, KMSError):
        return exc
    return Unavailable("request.store_unavailable", f"request store: {type(exc).__name__}")


class IdempotencyStore:
    """(client, request_id) -> claim or stored response, in the kms_requests bucket."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        ttl: float = DEFAULT_TTL,
        takeover_after: float = DEFAULT_TAKEOVER,
        bucket: str = IDEMPOTENCY_BUCKET,
        clock: Callable[[], float] = time.time,
        replicas: int = 1,
    ):
        self._js = js
        self._replicas = replicas
        self._ttl = ttl
        self._bucket = bucket
        self.takeover_after = takeover_after
        self._clock = clock
        self._kv: KeyValue | None = None
        # Which broker process holds a claim: for the logs of a takeover.
        self.owner = secrets.token_hex(6)

    async def start(self) -> None:
        self._kv = await open_bucket(
            self._js,
            self._bucket,
            history=1,
            replicas=self._replicas,
            ttl=self._ttl,
            description="EdgeKMS request ids: claims and answers of state-changing calls",
        )

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "idempotency store not started"
        return self._kv

    async def _claim(self, key: str, entry: Entry) -> tuple[int, Entry | None]:
        """Create the claim; or return the entry already there (revision, entry)."""
        try:
            return await self.kv.create(key, entry.encode()), None
        except KeyWrongLastSequenceError:
            pass
        try:
            found = await self.kv.get(key)
        except KeyNotFoundError:
            # Released between our create and get: claim again on the next retry.
            raise Unavailable("request.in_progress", "the request is settling; retry") from None
        assert found.revision is not None
        return found.revision, Entry.decode(found.value or b"{}")

    async def run(
        self,
        identity: Identity,
        method: str,
        request: Message,
        response_type: type[M],
        work: Callable[[], Awaitable[M]],
        lease: float | None = None,
        claim: bool = True,
    ) -> M:
        """Do `work` once for this client's request id; without an id, just do it.
        `lease`: how long the work may take at most (the caller's remaining deadline).
        `claim=False` for work that decides duplicates itself (IssueCertificate: the CA
        derives the serial from the request id, stores it create-if-absent and refuses a
        different request under it): no claim is written, the entry is only read for a
        stored answer, and the answer is stored beside the call's audit record
        (broker.audit_service.beside_audit), both before the caller is answered."""
        request_id = str(getattr(request, "request_id", "") or "")
        if not request_id:
            return await work()
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(
                "request.id_invalid", f"a request id has at most {MAX_REQUEST_ID} characters"
            )
        key = entry_key(identity.client, request_id)
        if not claim:
            return await self._run_unclaimed(identity, key, method, request, response_type, work)
        now = self._clock()
        hold = self.takeover_after if lease is None else min(lease, self.takeover_after)
        mine = Entry(IN_PROGRESS, fingerprint(method, request), method, now, self.owner, now + hold)
        mine.until += LEASE_GRACE
        try:
            revision, found = await self._claim(key, mine)
            if found is not None:
                replay = self._settled(found, mine, method)
                if replay is not None:
                    return _replayed(replay, response_type, method, identity.client, request_id)
                # A stale claim: take it over, or lose the race to another retry.
                try:
                    revision = await self.kv.update(key, mine.encode(), last=revision)
                except KeyWrongLastSequenceError:
                    raise Unavailable(
                        "request.in_progress", "another retry took the request over"
                    ) from None
                log.warning(
                    "request taken over",
                    extra=fields(
                        method=method,
                        client=identity.client,
                        request_id=request_id,
                        previous_owner=found.owner,
                        age_s=round(mine.at - found.at, 1),
                    ),
                )
        except KMSError:
            raise
        except Exception as exc:
            raise _unavailable(exc) from None

        try:
            response = await work()
        except BaseException:
            await self._release(key, revision)
            raise
        done = Entry(DONE, mine.fingerprint, method, self._clock(), self.owner)
        done.response = response.SerializeToString()
        try:
            await self.kv.put(key, done.encode())
        except Exception as exc:
            # The work is done; a retry will find the claim and, once stale, redo the
            # work, which the work's own idempotence (see module doc) answers alike.
            log.warning(
                "request answer not stored",
                extra=fields(method=method, request_id=request_id, error=type(exc).__name__),
            )
        return response

    async def _run_unclaimed(
        self,
        identity: Identity,
        key: str,
        method: str,
        request: Message,
        response_type: type[M],
        work: Callable[[], Awaitable[M]],
    ) -> M:
        """One read instead of a claim write: an answer stored by an earlier attempt is
        replayed (and a different body refused) as with a claim; otherwise the work runs
        and its answer is stored while the audit record is written."""
        mine = Entry(IN_PROGRESS, fingerprint(method, request), method, self._clock(), self.owner)
        try:
            try:
                found = await self.kv.get(key)
            except KeyNotFoundError:
                found = None
            if found is not None and found.value:
                # A claim left by a claiming call of the same id (stale or not) is no
                # reason to wait: the work itself refuses a duplicate.
                entry = Entry.decode(found.value)
                if entry.fingerprint != mine.fingerprint or entry.state == DONE:
                    replay = self._settled(entry, mine, method)
                    if replay is not None:
                        return _replayed(replay, response_type, method, identity.client, None)
        except KMSError:
            raise
        except Exception as exc:
            raise _unavailable(exc) from None
        response = await work()
        done = Entry(DONE, mine.fingerprint, method, self._clock(), self.owner)
        done.response = response.SerializeToString()
        await beside_audit(self._store_answer(key, done, method))
        return response

    async def _store_answer(self, key: str, done: Entry, method: str) -> None:
        try:
            await self.kv.put(key, done.encode())
        except Exception as exc:
            # As in run(): a retry redoes the work, which answers alike.
            log.warning(
                "request answer not stored", extra=fields(method=method, error=type(exc).__name__)
            )

    def _settled(self, found: Entry, mine: Entry, method: str) -> bytes | None:
        """The stored answer, or None when a stale claim may be taken over; else raise."""
        if found.fingerprint != mine.fingerprint:
            raise InvalidArgument(
                "request.id_reused",
                f"request id already used for a different {found.method} request",
                {"method": found.method},
            )
        if found.state == DONE:
            return found.response
        age = mine.at - found.at
        if mine.at < (found.until or found.at + self.takeover_after):
            raise Unavailable(
                "request.in_progress",
                f"the first {method} with this request id is still running; retry",
                {"age_s": f"{age:.1f}"},
            )
        return None

    async def _release(self, key: str, revision: int) -> None:
        """The work failed and left nothing behind: forget the claim so a retry redoes it.
        If the bus is gone too, the claim goes stale and is taken over later."""
        try:
            await self.kv.delete(key, last=revision)
        except Exception as exc:  # best effort: a claim left behind goes stale
            log.info("request claim not released", extra=fields(error=type(exc).__name__))


Handler = Callable[[Any, Any, Any, Identity], Awaitable[Any]]


def idempotent(method: str, response_type: type[Message]) -> Callable[[Handler], Handler]:
    """Run a servicer handler through its service's `idempotency` store (if it has one),
    under the `rpc` wrapper so identity and role are settled first."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(self: Any, request: Any, context: Any, identity: Identity) -> Any:
            store: IdempotencyStore | None = getattr(self, "idempotency", None)
            if store is None:
                return await handler(self, request, context, identity)
            return await store.run(
                identity,
                method,
                request,
                response_type,
                lambda: handler(self, request, context, identity),
                lease=context.time_remaining(),
            )

        return run

    return wrap
