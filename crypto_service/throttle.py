"""Keep the TPM out of dictionary-attack lockout: refuse guesses before the TPM sees them.

A TPM counts wrong auth values (0x98E) for every DA-protected key together and, at
`max_tries`, locks them all out (0x921) until it forgives one failure per recovery
interval. Anyone able to ask for signatures could run it into lockout and deny service
to every key. The AuthGuard counts "tpm.auth_failed" answers per key and in total within
a window; at `max_failures` for one key, or `max_total` for the provider (both below
the TPM's max_tries), further attempts on the keys that failed are answered
ResourceExhausted("auth.throttled", retry_after_seconds) here, without a TPM command.
A lockout the TPM reports anyway ("tpm.lockout") blocks the key for the time it names.

Limits: a provider may expose `auth_fail_limits() -> (max_tries, recovery_seconds)`;
the guard then allows max_tries - 1 failures per recovery window. Otherwise the
defaults fit a TPM's factory setting (3 tries, 1000 s). The counts live in the service
process; another program sharing the TPM can still spend the TPM's budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

from edgekms.errors import KMSError, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIES = 3
DEFAULT_RECOVERY = 1000.0


class AuthGuard:
    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_TRIES - 1,
        window: float = DEFAULT_RECOVERY,
        max_total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window <= 0:
            raise ValueError("max_failures and window must be positive")
        self.max_failures = max_failures
        self.max_total = max_total if max_total is not None else max_failures
        self.window = window
        self._clock = clock
        self._per_key: dict[bytes, deque[float]] = {}
        self._total: deque[float] = deque()
        self._blocked: dict[bytes, float] = {}

    @classmethod
    def for_tpm(cls, max_tries: int, recovery_seconds: float) -> AuthGuard:
        """Stay one failure below the TPM's own limit, forgetting as fast as it forgives."""
        budget = max(1, max_tries - 1)
        # The TPM forgives one failure per interval: a full budget drains in budget*interval.
        window = max(1.0, recovery_seconds * budget)
        return cls(max_failures=budget, window=window, max_total=budget)

    @classmethod
    def for_provider(cls, provider: object) -> AuthGuard:
        limits = getattr(provider, "auth_fail_limits", None)
        if callable(limits):
            try:
                max_tries, recovery = limits()
                return cls.for_tpm(int(max_tries), float(recovery))
            except Exception:
                log.warning("event=auth_limits_unreadable; using the TPM factory defaults")
        return cls()

    def _prune(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def _refuse(self, key_id: bytes, until: float, now: float) -> ResourceExhausted:
        retry = max(1, math.ceil(until - now))
        log.warning("event=auth_throttled key_id=%s retry_after=%d", key_id.hex(), retry)
        return ResourceExhausted(
            "auth.throttled",
            f"too many wrong auth values for this key; the TPM is spared, retry in {retry} s",
            {"retry_after_seconds": str(retry), "key_id": key_id.hex()},
        )

    def check(self, key_id: bytes) -> None:
        """Raise ResourceExhausted instead of letting a likely-wrong guess reach the TPM."""
        now = self._clock()
        blocked = self._blocked.get(key_id, 0.0)
        if blocked > now:
            raise self._refuse(key_id, blocked, now)
        times = self._per_key.get(key_id)
        if times is None:
            return  # never failed: not known to be DA-protected
        self._prune(times, now)
        self._prune(self._total, now)
        if len(times) >= self.max_failures:
            raise self._refuse(key_id, times[0] + self.window, now)
        if len(self._total) >= self.max_total:
            raise self._refuse(key_id, self._total[0] + self.window, now)

    def observe(self, key_id: bytes, err: KMSError) -> None:
        """Learn from the provider's answer to an attempt that was let through."""
        now = self._clock()
        if err.reason == "tpm.auth_failed":
            self._per_key.setdefault(key_id, deque()).append(now)
            self._total.append(now)
        elif err.reason == "tpm.lockout":
            try:
                wait = float(err.details.get("retry_after_seconds", "0"))
            except ValueError:
                wait = 0.0
            self._blocked[key_id] = now + max(wait, 1.0)
            self._per_key.setdefault(key_id, deque())
