"""Anti-replay nonces (RFC 8555 6.5): each is handed out once and accepted once.

Kept in memory, bounded: at most `capacity` unused nonces (the oldest are forgotten
first) and each lives `lifetime` seconds. A nonce that was forgotten, used already, made
by another CA replica or before a restart is simply a bad nonce; the answer carries a
fresh one and every ACME client retries with it (RFC 8555 6.5: badNonce). So a flood of
newNonce requests costs a fixed amount of memory and never locks a client out.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict

from ca_service.acme.problems import BadNonce

DEFAULT_CAPACITY = 50_000
DEFAULT_LIFETIME = 3600.0


class NoncePool:
    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, lifetime: float = DEFAULT_LIFETIME
    ) -> None:
        self.capacity = capacity
        self.lifetime = lifetime
        self._issued: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._issued)

    def new(self) -> str:
        nonce = secrets.token_urlsafe(16)
        now = time.monotonic()
        self._issued[nonce] = now
        while len(self._issued) > self.capacity:
            self._issued.popitem(last=False)
        self._expire(now)
        return nonce

    def _expire(self, now: float) -> None:
        while self._issued:
            oldest, at = next(iter(self._issued.items()))
            if now - at <= self.lifetime:
                return
            del self._issued[oldest]

    def consume(self, nonce: object) -> None:
        """Accept `nonce` once; BadNonce if it is missing, unknown, used or expired."""
        if not isinstance(nonce, str) or not nonce:
            raise BadNonce("acme.nonce_missing", "the protected header needs a nonce")
        at = self._issued.pop(nonce, None)
        if at is None:
            raise BadNonce("acme.nonce_unknown", "unknown or already used nonce: take a new one")
        if time.monotonic() - at > self.lifetime:
            raise BadNonce("acme.nonce_expired", "the nonce has expired: take a new one")
