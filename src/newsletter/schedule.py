"""When schedules fire: cron expressions and readable shorthands, in an IANA timezone.

``daily at 08:00``, ``weekdays at 07:30``, ``weekly on monday at 08:00``,
``monthly on the first tuesday [at 09:00]``, ``monthly on day 15 [at 09:00]``,
``every 10 minutes`` (also seconds and hours), or five cron fields (``0 8 * * mon``).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

ORDINALS = {"first": "1st", "second": "2nd", "third": "3rd", "fourth": "4th", "fifth": "5th", "last": "last"}
_AT = r"(?:\s+at\s+(?P<hour>\d{1,2}):(?P<minute>\d{2}))?"
_DAY = r"(?P<day>mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|seconds?|m|min|minutes?|h|hours?|d|days?)?\s*$")


def parse_duration(value: str | int | float) -> timedelta:
    """``90``, ``"90s"``, ``"15m"``, ``"3h"``, ``"1d"``."""
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r} (write e.g. 90s, 15m, 3h or 1d)")
    unit = (match.group(2) or "s")[0]
    return timedelta(seconds=float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def format_duration(value: timedelta) -> str:
    """A duration as schedules.yaml writes it, in its largest whole unit: ``3h``, ``90s``."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (use an IANA name such as Europe/Lisbon)") from None


def parse_when(text: str, tz: tzinfo | str = "UTC") -> BaseTrigger:
    """A trigger for ``when:``; ValueError with the accepted forms when it cannot be read."""
    # APScheduler takes 40 ms to import: a config without when: (sent from cron) never needs it.
    from apscheduler.triggers.interval import IntervalTrigger

    from .wallclock import WallClockTrigger

    tzi = zone(tz) if isinstance(tz, str) else tz
    assert isinstance(tzi, ZoneInfo)
    spec = " ".join(text.lower().split())

    def at(m: re.Match[str]) -> dict[str, str]:
        hour, minute = int(m.group("hour") or 8), int(m.group("minute") or 0)
        if hour > 23 or minute > 59:
            raise ValueError(f"{text!r}: no such time of day")
        return {"hour": str(hour), "minute": str(minute), "second": "0"}

    if m := re.fullmatch(r"every (\d+) (second|minute|hour|day)s?", spec):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"{text!r}: the interval must be positive")
        # Counted from a fixed start, not from when the daemon started: every daemon on one
        # database then has the same due times (each fires once across them: ``fires``).
        return IntervalTrigger(seconds=seconds, timezone=tzi, start_date=datetime(2000, 1, 1, tzinfo=tzi))
    if m := re.fullmatch(r"(?:daily|every day)" + _AT, spec):
        return WallClockTrigger(tzi, **at(m))
    if m := re.fullmatch(r"weekdays" + _AT, spec):
        return WallClockTrigger(tzi, day_of_week="mon-fri", **at(m))
    if m := re.fullmatch(r"weekly on " + _DAY + _AT, spec):
        return WallClockTrigger(tzi, day_of_week=m.group("day"), **at(m))
    if m := re.fullmatch(r"monthly on the (first|second|third|fourth|fifth|last) " + _DAY + _AT, spec):
        day = f"{ORDINALS[m.group(1)]} {m.group('day')}"
        return WallClockTrigger(tzi, day=day, **at(m))
    if m := re.fullmatch(r"monthly on day (\d{1,2})" + _AT, spec):
        if not 1 <= int(m.group(1)) <= 31:
            raise ValueError(f"{text!r}: no such day of the month")
        return WallClockTrigger(tzi, day=m.group(1), **at(m))
    fields = spec.split()
    if len(fields) == 5 and re.fullmatch(r"[\d*/,\-a-z]+", spec.replace(" ", "")):
        minute, hour, day, month, dow = fields
        try:
            return WallClockTrigger(tzi, minute=minute, hour=hour, day=day, month=month, day_of_week=dow)
        except ValueError as exc:
            raise ValueError(f"{text!r}: bad cron expression: {exc}") from None
    raise ValueError(
        f"cannot read {text!r}; write 'daily at 08:00', 'weekdays at 07:30', 'weekly on monday at"
        " 08:00', 'monthly on the first tuesday', 'monthly on day 15 at 09:00', 'every 10 minutes'"
        " or five cron fields such as '0 8 * * mon'"
    )


def fire_times(trigger: BaseTrigger, start: datetime, end: datetime, limit: int = 1000) -> list[datetime]:
    """Fire times in (start, end], computed without sleeping."""
    times: list[datetime] = []
    prev: datetime | None = None
    now = start + timedelta(microseconds=1)
    while len(times) < limit:
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None or nxt > end:
            break
        times.append(nxt)
        prev, now = nxt, nxt + timedelta(microseconds=1)
    return times


def missed_run(
    trigger: BaseTrigger, last_run: datetime | None, now: datetime, grace: timedelta
) -> tuple[datetime | None, datetime | None]:
    """(a fire time to catch up now, the latest one too old to catch up).

    A fire time that passed while nothing ran is caught up when it is at most ``grace`` old;
    an older one is only reported, so a daemon down for a week does not send a stale digest.
    """
    if last_run is None:
        return None, None
    recent = fire_times(trigger, max(last_run, now - grace), now, limit=1)
    stale = fire_times(trigger, last_run, min(now - grace, now), limit=100_000) if not recent else []
    return (recent[0] if recent else None), (stale[-1] if stale else None)
