"""A cron trigger that counts in local wall-clock time, so DST nights fire once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger


class WallClockTrigger(BaseTrigger):
    """A cron trigger that counts in local wall-clock time.

    APScheduler's CronTrigger, given a zoneinfo timezone, fires twice on the night clocks go
    back (02:30 happens twice) and can then keep returning a time in the past. Here the cron
    rules run on the wall clock read as if it were UTC, where no hour repeats or vanishes,
    and only the result is placed in the real timezone: a repeated hour fires once (the first
    time), a skipped hour fires once, an hour later on the wall clock.
    """

    def __init__(self, tz: ZoneInfo, **fields: str) -> None:
        self.tz = tz
        self.cron = CronTrigger(timezone=UTC, **fields)

    def _wall(self, when: datetime) -> datetime:
        return when.astimezone(self.tz).replace(tzinfo=UTC, fold=0)

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        prev = self._wall(previous_fire_time) if previous_fire_time else None
        wall_now = self._wall(now)
        if prev is not None and wall_now <= prev:
            wall_now = prev + timedelta(seconds=1)
        nxt = self.cron.get_next_fire_time(prev, wall_now)
        return None if nxt is None else nxt.replace(tzinfo=self.tz).astimezone(UTC)

    def __str__(self) -> str:
        return f"{self.cron} ({self.tz.key}, wall clock)"
