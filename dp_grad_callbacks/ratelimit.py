"""Rate limiting for log messages that a problem can repeat at every training step."""

from __future__ import annotations

import math
import time
from typing import Callable


class RateLimiter:
    """Allow an event at most once per interval and count the events suppressed in between.

    Args:
        interval: Minimum number of seconds between two allowed events. The first event
            is always allowed.
        clock: Monotonic clock that returns seconds.

    Raises:
        ValueError: If ``interval`` is negative or not finite.

    Example:
        >>> ticks = iter([0.0, 1.0, 2.0, 61.0])
        >>> limiter = RateLimiter(60.0, clock=lambda: next(ticks))
        >>> [limiter.allow() for _ in range(4)]
        [0, None, None, 2]
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval >= 0):
            raise ValueError(
                f"interval must be a finite non-negative number of seconds, got {interval!r}"
            )

        self.interval = float(interval)
        self._clock = clock
        self._next_allowed = -math.inf
        self._suppressed = 0

    def allow(self) -> int | None:
        """Record one event and decide whether the caller may log it.

        Returns:
            ``None`` when the event comes less than ``interval`` seconds after the last
            allowed one, and the caller should stay silent. Otherwise the number of events
            suppressed since the last allowed one, for the caller's message.
        """
        now = self._clock()
        if now < self._next_allowed:
            self._suppressed += 1
            return None

        suppressed = self._suppressed
        self._suppressed = 0
        self._next_allowed = now + self.interval
        return suppressed
