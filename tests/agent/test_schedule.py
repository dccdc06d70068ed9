"""When items are due: renewal point, CRL refresh, backoff with jitter (pure)."""

from __future__ import annotations

import random

import pytest

from agent.schedule import backoff_delay, crl_refresh_time, renewal_time, retry_time


def test_renewal_at_two_thirds_from_not_before() -> None:
    assert renewal_time(1000.0, 1000.0 + 90 * 86400, 2 / 3) == pytest.approx(1000 + 60 * 86400)
    assert renewal_time(0.0, 300.0, 0.25) == 75.0


def test_crl_refresh_at_half_the_time_left_within_bounds() -> None:
    assert crl_refresh_time(0.0, 7 * 86400.0, 5, 3600) == 3600  # at least hourly
    assert crl_refresh_time(0.0, 120.0, 5, 3600) == 60.0  # half of what is left
    assert crl_refresh_time(0.0, 4.0, 5, 3600) == 5.0  # never hammering
    assert crl_refresh_time(100.0, 50.0, 5, 3600) == 105.0  # already past: soon


@pytest.mark.parametrize("failures", [1, 2, 3, 4, 10, 60])
def test_backoff_grows_doubling_within_equal_jitter(failures: int) -> None:
    rng = random.Random(failures)
    step = min(600.0, 5.0 * 2 ** (failures - 1))
    for _ in range(200):
        delay = backoff_delay(failures, 5.0, 600.0, rng)
        assert step / 2 <= delay <= step


def test_backoff_is_jittered() -> None:
    rng = random.Random(7)
    assert len({round(backoff_delay(3, 5.0, 600.0, rng), 6) for _ in range(20)}) > 10


def test_retry_never_waits_past_a_quarter_of_the_time_left() -> None:
    rng = random.Random(1)
    # 10 failures: a 600 s step, but the certificate ends in 400 s: at most 100 s.
    assert retry_time(0.0, 10, 5.0, 600.0, deadline=400.0, rng=rng) <= 100.0
    # ... yet never sooner than the first step.
    assert retry_time(0.0, 10, 5.0, 600.0, deadline=8.0, rng=rng) >= 5.0 - 1e-9
