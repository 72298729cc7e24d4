"""When a send may go on, and when it will be done: send windows, day quotas, the rate seen.

The delivery loop asks ``WindowHold`` before each message whether the schedule's window is
still open; a run that stops for a window or a quota leaves a note in the store (``note_pause``)
so that ``status`` and the daemon's log can say when it goes on; ``expected_finish`` turns
what is pending, the rate seen and the limits into a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta

from .storage import Storage
from .window import SendWindow


class WindowHold:
    """``hold`` for the delivery loop: "" while the window is open, else why and until when.

    It runs per message, so the end of the open window is worked out once and compared.
    """

    def __init__(self, window: SendWindow | None, clock: Callable[[], datetime]) -> None:
        self.window = window
        self.clock = clock
        self.open_until: datetime | None = None

    def __call__(self) -> str:
        if self.window is None or self.window.always_open:
            return ""
        at = self.clock()
        if self.open_until is not None and at < self.open_until:
            return ""
        if self.window.is_open(at):
            self.open_until = self.window.closes(at)
            return ""
        self.open_until = None
        resume = self.window.next_open(at).astimezone(self.window.tz)
        return f"outside the send window ({self.window}); goes on at {resume:%Y-%m-%d %H:%M %Z}"


def _key(schedule: str) -> str:
    return f"paused:{schedule}"


def note_pause(store: Storage, schedule: str, reason: str) -> None:
    """Why the schedule's last send stopped with messages pending ("" when it did not)."""
    store.set_meta(_key(schedule), reason)


def pause_note(store: Storage, schedule: str) -> str:
    return store.meta(_key(schedule)) or ""


def expected_finish(
    now: datetime,
    pending: int,
    rate: float | None,
    *,
    window: SendWindow | None = None,
    per_day: int | None = None,
    sent_today: int = 0,
) -> datetime | None:
    """When ``pending`` messages will be out at ``rate`` msg/s, sending only inside
    ``window`` and at most ``per_day`` in a rolling day. None when there is no rate to go by."""
    if pending <= 0:
        return now
    if not rate or rate <= 0:
        return None
    start = now
    if per_day and sent_today + pending > per_day:
        # What does not fit in today's quota goes a day later, a quota at a time.
        left_today = max(0, per_day - sent_today)
        days = math.ceil((pending - left_today) / per_day)
        start = now + timedelta(days=days)
        pending = (pending - left_today) % per_day or per_day
    seconds = pending / rate
    if window is not None and not window.always_open:
        return window.finish_at(start, seconds)
    return start + timedelta(seconds=seconds)
