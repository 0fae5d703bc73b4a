"""Backoff between attempts to reach the server, per the client's ``RetryPolicy``."""

from __future__ import annotations

import random
import time

from .options import RetryPolicy


class Backoff:
    """The waits of one run of retries: call ``next_delay()`` after each failed attempt.

    ``next_delay()`` returns the seconds to wait before the next attempt, or None once the
    policy's ``give_up_after_s`` has passed since the first failure (time in seconds, monotonic).
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._attempt = 0
        self._started: float | None = None

    def next_delay(self) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        remaining = self._started + self._policy.give_up_after_s - now
        if remaining <= 0:
            return None
        p = self._policy
        delay = min(p.max_backoff_s, p.initial_backoff_s * p.multiplier**self._attempt)
        delay *= 1.0 - p.jitter * self._rng.random()
        self._attempt += 1
        return min(delay, remaining)
