"""Slow down whoever keeps failing authentication or authorization at the broker.

A client (by name once its certificate is readable, by certificate fingerprint before)
that collects `max_failures` refusals (UNAUTHENTICATED or PERMISSION_DENIED) within
`window` seconds is refused with RESOURCE_EXHAUSTED "auth.throttled" for a backoff that
doubles with every further lockout (capped), without its request being looked at. A
successful request does not clear the count: interleaving good requests must not buy an
attacker more guesses. Counts live in this broker's memory only; replicas each keep
their own, which at worst multiplies the budget by the number of replicas.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgekms.errors import ResourceExhausted
from edgekms.logs import fields

log = logging.getLogger(__name__)

MAX_TRACKED = 4096


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    lockouts: int = 0


class FailureThrottle:
    """Per-subject failure counter with exponential backoff."""

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 60.0,
        backoff: float = 5.0,
        max_backoff: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window <= 0 or backoff <= 0:
            raise ValueError("max_failures, window and backoff must be positive")
        self.max_failures = max_failures
        self.window = window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._states: dict[str, _State] = {}

    def _prune(self, state: _State, now: float) -> None:
        while state.failures and state.failures[0] <= now - self.window:
            state.failures.popleft()

    def check(self, subject: str) -> None:
        """Raise ResourceExhausted("auth.throttled") while `subject` is backing off."""
        state = self._states.get(subject)
        if state is None:
            return
        now = self._clock()
        if state.blocked_until > now:
            retry = max(1, math.ceil(state.blocked_until - now))
            raise ResourceExhausted(
                "auth.throttled",
                f"too many refused requests; try again in {retry} s",
                {"retry_after_seconds": str(retry), "subject": subject},
            )

    def failed(self, subject: str) -> None:
        """Count one refusal; start a backoff when the window holds max_failures."""
        now = self._clock()
        state = self._states.get(subject)
        if state is None:
            if len(self._states) >= MAX_TRACKED:
                self._evict(now)
            state = self._states[subject] = _State()
        self._prune(state, now)
        if state.lockouts and now > state.blocked_until + self.max_backoff:
            state.lockouts = 0  # long quiet since the last backoff: start over gently
        state.failures.append(now)
        if len(state.failures) >= self.max_failures:
            delay = min(self.max_backoff, self.backoff * 2**state.lockouts)
            state.lockouts += 1
            state.blocked_until = now + delay
            state.failures.clear()
            log.warning(
                "client throttled",
                extra=fields(subject=subject, seconds=delay, lockouts=state.lockouts),
            )

    def failures(self, subject: str) -> int:
        state = self._states.get(subject)
        if state is None:
            return 0
        self._prune(state, self._clock())
        return len(state.failures)

    def _evict(self, now: float) -> None:
        """Bounded memory: forget subjects that are neither blocked nor recently failing."""
        for subject, state in list(self._states.items()):
            self._prune(state, now)
            if not state.failures and state.blocked_until <= now:
                del self._states[subject]
        while len(self._states) >= MAX_TRACKED:
            self._states.pop(next(iter(self._states)))
