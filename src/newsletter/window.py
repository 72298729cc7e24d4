"""Send windows: the hours of the week in which a schedule may send, in its timezone.

``weekdays 08:00-18:00``, ``daily 09:00-17:30``, ``mon-fri 08:00-18:00``,
``sat,sun 10:00-12:00``, ``weekends 10:00-16:00``, ``mon,wed,fri 22:00-06:00`` (a window
whose end is not after its start runs past midnight: it belongs to the day it opens on), and
several joined by ``;``. ``00:00-24:00`` is the whole day.

Times are read on the local wall clock, as ``when:`` is. Each day's window becomes one
stretch of real time, so the nights clocks change neither lose it nor give it twice: a time
the clock skips (02:30 on a spring night in Berlin) opens at the jump, or closes an hour
later on the wall clock; a time it shows twice (02:30 on an autumn night) is its first.
Every time handed in must carry its timezone; arithmetic is done in UTC.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_GROUPS = {
    "daily": frozenset(range(7)),
    "everyday": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
    "weekend": frozenset({5, 6}),
}
_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_PART = re.compile(r"^(?P<days>\S+(?:\s*,\s*\S+)*)\s+(?P<start>\S+)\s*-\s*(?P<end>\S+)$")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")
EXAMPLE = "e.g. 'weekdays 08:00-18:00' or 'mon-fri 09:00-17:30; sat 10:00-12:00'"
_WEEK = timedelta(days=7)


@dataclass(frozen=True)
class Rule:
    """One part of a window: on ``days`` (0 = Monday), from ``start`` to ``end`` minutes after
    that day's midnight; ``end`` past 1440 runs into the next day."""

    days: frozenset[int]
    start: int
    end: int


class SendWindow:
    """When sending is allowed. Every method takes timezone-aware datetimes and gives UTC
    ones, on which arithmetic is real time (show them with ``.astimezone(window.tz)``)."""

    def __init__(self, rules: list[Rule], tz: tzinfo = UTC, text: str = "") -> None:
        if not rules:
            raise ValueError(f"a send window needs at least one part ({EXAMPLE})")
        self.rules = tuple(rules)
        self.tz = tz
        self.text = text or "; ".join(_describe(r) for r in rules)
        self.always_open = _covers_week(self.rules)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"SendWindow({self.text!r}, {getattr(self.tz, 'key', self.tz)})"

    def is_open(self, at: datetime) -> bool:
        start, end = next(self._spans(at))
        return start <= at < end

    def next_open(self, at: datetime) -> datetime:
        """``at`` itself if the window is open then, else when it next opens."""
        start, _ = next(self._spans(at))
        return at if start <= at else start

    def closes(self, at: datetime) -> datetime | None:
        """When the window open at ``at`` closes (windows that touch count as one); None when
        it is closed at ``at``, or never closes (``always_open``)."""
        start, end = next(self._spans(at))
        return end if start <= at and end != _NEVER else None

    def open_seconds_between(self, a: datetime, b: datetime) -> float:
        """Seconds of open window from ``a`` to ``b``."""
        total = 0.0
        for start, end in self._spans(a):
            if start >= b:
                break
            total += (min(end, b) - max(start, a)).total_seconds()
        return max(total, 0.0)

    def finish_at(self, start: datetime, seconds_of_sending: float) -> datetime:
        """When ``seconds_of_sending`` of sending, begun at ``start``, ends if it only goes on
        while the window is open: for an estimate, N messages at R a second is N / R."""
        left = timedelta(seconds=max(seconds_of_sending, 0.0))
        if not left:
            return start
        for begin, end in self._spans(start):
            begin = max(begin, start)
            if end - begin >= left:
                return begin + left
            left -= end - begin
        raise AssertionError("unreachable: the stretches go on without end")

    def _spans(self, at: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The open stretches (UTC, those that touch merged) from the one ``at`` is in, or
        the next, onwards without end."""
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"a time with its timezone is needed, not {at.isoformat()}")
        at = at.astimezone(UTC)
        if self.always_open:
            yield at - _WEEK, _NEVER
            return
        current: tuple[datetime, datetime] | None = None
        # From the day before: an overnight window opened yesterday may still be open.
        day = at.astimezone(self.tz).date() - timedelta(days=1)
        while True:
            for start, end in self._day(day):
                if current is not None and start <= current[1]:
                    current = (current[0], max(current[1], end))
                    continue
                if current is not None and current[1] > at:
                    yield current
                current = (start, end)
            day += timedelta(days=1)

    def _day(self, day: date) -> list[tuple[datetime, datetime]]:
        """The stretches of rules that open on ``day`` (local), in UTC, by start."""
        midnight = datetime.combine(day, time())
        found = []
        for rule in self.rules:
            if day.weekday() in rule.days:
                start = _instant(midnight + timedelta(minutes=rule.start), self.tz, opening=True)
                end = _instant(midnight + timedelta(minutes=rule.end), self.tz, opening=False)
                found.append((start, max(end, start)))
        return sorted(found)


_NEVER = datetime.max.replace(tzinfo=UTC)


def _instant(wall: datetime, tz: tzinfo, *, opening: bool) -> datetime:
    """The UTC instant a local wall-clock time names. One the clock shows twice is the first
    (fold=0). One the clock skips: an opening is the jump itself (the clock is past it from
    then on), a closing is that time plus the skip (fold=0), so a window inside the skipped
    hour moves an hour later instead of vanishing."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if not opening or first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # Skipped: the jump lies between the readings with the offset after and the one before;
    # clocks change on a whole second.
    low = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    high = int(first.timestamp())
    while high - low > 1:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= wall:
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)


def _covers_week(rules: tuple[Rule, ...]) -> bool:
    """Whether the rules leave no minute of the wall-clock week closed."""
    week = 7 * 1440
    spans = [(d * 1440 + r.start, d * 1440 + r.end) for r in rules for d in r.days]
    # Sunday's overnight window covers the start of Monday.
    spans += [(start - week, end - week) for start, end in spans if end > week]
    reached = 0
    for start, end in sorted(spans):
        if start > reached:
            return False
        reached = max(reached, end)
    return reached >= week


def _describe(rule: Rule) -> str:
    days = ",".join(DAYS[d] for d in sorted(rule.days))
    return f"{days} {_clock(rule.start)}-{_clock(rule.end % 1440 or 1440)}"


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _zone(tz: tzinfo | str) -> tzinfo:
    if not isinstance(tz, str):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {tz!r} (use an IANA name such as Europe/Lisbon)") from None


def _day(word: str, part: str) -> int:
    word = word.strip()
    for i, (short, full) in enumerate(zip(DAYS, _FULL, strict=True)):
        if len(word) >= 3 and full.startswith(word):
            return i
        if word == short:
            return i
    raise ValueError(
        f"unknown day {word!r} in {part!r} (days: mon, tue, wed, thu, fri, sat, sun, weekdays,"
        f" weekends, daily; {EXAMPLE})"
    )


def _days(text: str, part: str) -> frozenset[int]:
    found: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if item in _GROUPS:
            found |= _GROUPS[item]
        elif "-" in item:
            first, _, last = item.partition("-")
            a, b = _day(first, part), _day(last, part)
            # mon-fri, and fri-mon around the weekend
            found |= {(a + i) % 7 for i in range(((b - a) % 7) + 1)}
        else:
            found.add(_day(item, part))
    return frozenset(found)


def _minutes(text: str, part: str, *, end: bool) -> int:
    match = _TIME.match(text)
    hours, minutes = (int(match[1]), int(match[2])) if match else (-1, -1)
    if not match or minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        last = " (24:00 only as an end)" if match and hours == 24 else ""
        raise ValueError(f"bad time {text!r} in {part!r}: write HH:MM from 00:00 to 23:59{last}; {EXAMPLE}")
    return hours * 60 + minutes


def parse_window(text: str, tz: tzinfo | str = UTC) -> SendWindow:
    """A send window from its text, in ``tz``; ValueError naming what is wrong otherwise."""
    zone = _zone(tz)
    rules = []
    parts = [p.strip() for p in text.lower().split(";")]
    if not any(parts):
        raise ValueError(f"empty send window ({EXAMPLE})")
    for part in parts:
        if not part:
            continue  # a stray ';' at the end
        match = _PART.match(part)
        if not match:
            raise ValueError(f"cannot read {part!r}: write days, then HH:MM-HH:MM; {EXAMPLE}")
        days = _days(re.sub(r"\s+", "", match["days"]), part)
        start = _minutes(match["start"], part, end=False)
        end = _minutes(match["end"], part, end=True)
        if end == start:
            raise ValueError(f"{part!r} opens and closes at once; the whole day is 00:00-24:00")
        if end <= start:
            end += 1440  # overnight: it closes the next day
        rules.append(Rule(days, start, end))
    return SendWindow(rules, zone, "; ".join(p for p in parts if p))
