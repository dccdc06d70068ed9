"""When each item is due: pure arithmetic on times, so it is tested without clocks.

* A certificate is renewed at `renew_at` (two thirds by default) of its whole lifetime,
  counted from notBefore: a 90-day certificate 30 days before it ends, a 5-minute one
  100 s before, whatever the CA's backdating.
* A CRL file is fetched again at half the time its earliest nextUpdate leaves, at most
  `max_interval` apart (a revocation reaches the file within that) and at least
  `min_interval` apart (a CA that keeps serving a CRL about to end is not hammered).
* After a failure an item is tried again after an exponential backoff with jitter,
  so a fleet that lost its KMS at the same moment does not come back in lockstep; but a
  certificate is never left past its own renewal point for the whole backoff once that
  point is near the end (the next try is at most a quarter of the time left away).
"""

from __future__ import annotations

import random


def renewal_time(not_before: float, not_after: float, renew_at: float) -> float:
    """Epoch seconds at which a certificate valid not_before..not_after is renewed."""
    return not_before + (not_after - not_before) * renew_at


def crl_refresh_time(
    now: float, next_update: float, min_interval: float, max_interval: float
) -> float:
    """Epoch seconds of the next fetch for a CRL file whose earliest nextUpdate is given."""
    wait = (next_update - now) / 2
    return now + min(max(wait, min_interval), max_interval)


def backoff_delay(
    failures: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Seconds before try number `failures` + 1: initial * 2^(failures-1), capped at
    `maximum`, then drawn uniformly from its upper half ("equal jitter": never less than
    half the step, so the backoff still grows)."""
    step: float = min(maximum, initial * float(2 ** max(0, min(failures - 1, 30))))
    draw: float = (rng or random.Random()).random()
    return step / 2 + draw * step / 2


def retry_time(
    now: float,
    failures: int,
    initial: float,
    maximum: float,
    deadline: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """When to try again after `failures` failures in a row. With a `deadline` (a
    certificate's notAfter) the wait is at most a quarter of what is left before it,
    and at least `initial`."""
    delay = backoff_delay(failures, initial, maximum, rng)
    if deadline is not None and deadline > now:
        delay = min(delay, max(initial, (deadline - now) / 4))
    return now + delay
