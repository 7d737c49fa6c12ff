"""The rate limiter behind repeated warnings and failure logs."""

from __future__ import annotations

import math

import pytest

from dp_grad_callbacks.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_event_allowed():
    assert RateLimiter(60.0, clock=FakeClock()).allow() == 0


def test_events_within_interval_suppressed():
    clock = FakeClock()
    limiter = RateLimiter(60.0, clock=clock)
    limiter.allow()

    clock.now += 59.9
    assert limiter.allow() is None
    assert limiter.allow() is None


def test_event_after_interval_reports_suppressed():
    clock = FakeClock()
    limiter = RateLimiter(60.0, clock=clock)
    limiter.allow()
    for _ in range(3):
        limiter.allow()

    clock.now += 60.0
    assert limiter.allow() == 3
    clock.now += 60.0
    assert limiter.allow() == 0


def test_zero_interval_allows_all():
    limiter = RateLimiter(0.0, clock=FakeClock())
    assert [limiter.allow() for _ in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("interval", [-1.0, math.nan, math.inf, "60", None])
def test_invalid_interval_raises(interval):
    with pytest.raises(ValueError, match="interval must be a finite non-negative number"):
        RateLimiter(interval)
