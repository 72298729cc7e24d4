"""One pace for an HTTP sender: at most so many posts a second, and a pause a target asked for.

Webhook targets announce when their bucket is empty (``X-RateLimit-*``, ``RateLimit-*``) or
ask for about one message a second (Slack); both wait here. (The SMTP sender's connections
share ``quota.Pacer`` instead: rates in several units, a day's quota, backoff.) Only the
standard library, so the HTTP layer stays light.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Turns for one sender instance (one thread: a run builds its own sender)."""

    def __init__(
        self,
        per_second: float | None = None,
        *,
        max_wait: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self.max_wait = max_wait  # no single wait is longer, whatever a target asked for
        self.clock = clock
        self.sleep = sleep
        self.not_before = 0.0  # clock() time before which nothing goes out

    def wait(self) -> None:
        """Wait for this turn and take it: the next one is ``interval`` after it."""
        now = self.clock()
        delay = self.not_before - now
        if self.max_wait is not None:
            delay = min(delay, self.max_wait)
        if delay > 0:
            self.sleep(delay)
            now += delay
        if self.interval:
            self.not_before = now + self.interval

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now (or longer, if an earlier hold says so)."""
        self.not_before = max(self.not_before, self.clock() + seconds)
