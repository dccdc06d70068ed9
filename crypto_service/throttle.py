"""Keep the TPM out of dictionary-attack lockout: refuse guesses before the TPM sees them.

A TPM counts wrong auth values (0x98E) for every DA-protected key together and, at
`max_tries`, locks them all out (0x921) until it forgives one failure per recovery
interval. Anyone able to ask for signatures could run it into lockout and deny service
to every key. The AuthGuard counts "tpm.auth_failed" answers per key and in total within
a window; at `max_failures` for one key, or `max_total` for the provider (both below
the TPM's max_tries), further attempts on the keys that failed are answered
ResourceExhausted("auth.throttled", retry_after_seconds) here, without a TPM command.
A lockout the TPM reports anyway ("tpm.lockout") blocks the key for the time it names.

Persistence: the TPM's failure counter survives a restart of the service, so the
guard's counts must too, or a kill -9 after two failures would hand a fresh budget to
whoever guesses next (and the next guess would lock the TPM out). With `state_path`
(kms-crypto uses `<tpm2.state_dir>/auth-guard.json`) every failure and lockout is written
to that file (tmp, fsync, rename; 0600) before the answer leaves the service, and read
back at start. Times in it are wall-clock seconds, since a monotonic clock restarts with
the machine; entries older than the window are dropped when it is written, so the file
holds at most a few entries per key that failed recently. An unreadable file is logged
and treated as empty (the TPM's own counter still stops a guesser at max_tries).

Limits: a provider may expose `auth_fail_limits() -> (max_tries, recovery_seconds)`;
the guard then allows max_tries - 1 failures per recovery window. Otherwise the
defaults fit a TPM's factory setting (3 tries, 1000 s). Another program sharing the TPM
can still spend the TPM's budget, and a key that never failed is not known to be
DA-protected, so its first wrong guess still reaches the TPM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekms.errors import KMSError, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIES = 3
DEFAULT_RECOVERY = 1000.0
STATE_VERSION = 1
STATE_FILE = "auth-guard.json"


class AuthGuard:
    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_TRIES - 1,
        window: float = DEFAULT_RECOVERY,
        max_total: int | None = None,
        clock: Callable[[], float] = time.time,
        state_path: Path | None = None,
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
        self.state_path = state_path
        if state_path is not None:
            self._load()

    @classmethod
    def for_tpm(
        cls, max_tries: int, recovery_seconds: float, state_path: Path | None = None
    ) -> AuthGuard:
        """Stay one failure below the TPM's own limit, forgetting as fast as it forgives."""
        budget = max(1, max_tries - 1)
        # The TPM forgives one failure per interval: a full budget drains in budget*interval.
        window = max(1.0, recovery_seconds * budget)
        return cls(max_failures=budget, window=window, max_total=budget, state_path=state_path)

    @classmethod
    def for_provider(cls, provider: object, state_path: Path | None = None) -> AuthGuard:
        limits = getattr(provider, "auth_fail_limits", None)
        if callable(limits):
            try:
                max_tries, recovery = limits()
                return cls.for_tpm(int(max_tries), float(recovery), state_path)
            except Exception:
                log.warning("event=auth_limits_unreadable using=%s", "the TPM factory defaults")
        return cls(state_path=state_path)

    # ---- the state file --------------------------------------------------------------

    def _load(self) -> None:
        assert self.state_path is not None
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("event=auth_guard_state_unreadable error=%s", exc.strerror or exc)
            return
        try:
            data = json.loads(raw)
            if data.get("version") != STATE_VERSION:
                raise ValueError("unknown version")
            now = self._clock()
            failures = sorted(
                (float(at), bytes.fromhex(key)) for key, at in data.get("failures", [])
            )
            blocked = {bytes.fromhex(k): float(v) for k, v in data.get("blocked", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("event=auth_guard_state_invalid error=%s", exc)
            return
        for at, key in failures:
            if at > now - self.window:
                self._per_key.setdefault(key, deque()).append(at)
                self._total.append(at)
        for key, until in blocked.items():
            if until > now:
                self._blocked[key] = until
                self._per_key.setdefault(key, deque())
        if self._total or self._blocked:
            log.info(
                "event=auth_guard_restored failures=%d blocked=%d",
                len(self._total),
                len(self._blocked),
            )

    def _save(self) -> None:
        if self.state_path is None:
            return
        now = self._clock()
        failures: list[list[Any]] = []
        for key, times in self._per_key.items():
            self._prune(times, now)
            failures.extend([key.hex(), at] for at in times)
        self._prune(self._total, now)
        blocked = {k.hex(): v for k, v in self._blocked.items() if v > now}
        data = {"version": STATE_VERSION, "failures": failures, "blocked": blocked}
        directory = self.state_path.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.state_path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(data, sort_keys=True).encode())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

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
        else:
            return
        try:
            self._save()
        except OSError as exc:
            # The count in memory still holds; only a restart before the next good write
            # would forget it. Refusing the answer would not un-count the TPM's failure.
            log.error("event=auth_guard_state_write_failed error=%s", exc.strerror or exc)
