"""A sender's quotas: messages per second, minute, hour and rolling day, shared by its threads.

Providers state their limits in several units at once: Amazon SES a per-second rate and a
24-hour quota, Google's relay 10,000 recipients a day, others so many a minute or an hour.
``Rates`` holds them; one ``Pacer`` per sender instance hands out turns to all of its
connection threads, so eight connections together keep to the one account's limits.

The windows
    ``per_second`` spaces messages ``1/rate`` apart, a burst of one. ``per_minute`` and
    ``per_hour`` are sliding windows over the turns given, kept in memory: a run that starts
    again starts them empty, which is safe since they are short. ``per_day`` is a rolling 24
    hours and must survive a restart, so it counts from the store's hourly buckets
    (``Storage.sent_since``) handed in at construction as ``history``, plus what this pacer
    saw sent since. A bucket counts until 25 h after the start of its hour: every message in
    it has then left the 24 h, so the quota never reopens early (at most an hour late).

Waiting, and when not to
    ``acquire`` sleeps for a short wait (never holding the lock, so the other threads go on
    and see a ``stop``). A day quota used up, or a minute or hour window whose wait is longer
    than ``max_wait``, raises ``QuotaReached`` with ``until``: the caller stops the run and
    resumes then, rather than holding connections open for an hour. A turn is a reservation
    on the day quota until ``sent()`` (it went out) or ``release()`` (it did not): eight
    threads in flight cannot overrun the day by eight.

When the server says "slower" (AIMD)
    SES answers an overrun with "454 Throttling failure: Maximum sending rate exceeded" and
    asks to retry, slower; other relays say 421 or 452. Sending on at the same rate is
    refused again, and every connection retrying at once is refused together. So, as TCP
    does with congestion: ``throttled()`` halves the rate (multiplicative decrease; with no
    ``per_second`` set, half the rate seen over the last 10 s) and holds every thread for a
    backoff of 1, 2, 4 ... up to 60 s, with jitter, while refusals repeat. Refusals reported
    during a hold are the same burst (other connections' messages already in flight): they
    neither halve again nor lengthen the backoff. Each ``ok()`` adds back a step of the rate
    (additive increase; ``steps`` successes climb from zero to the configured rate, and with
    none configured to the rate seen when throttling began, after which there is no limit
    again), and a ``quiet`` spell without refusals resets the backoff to 1 s.
"""

from __future__ import annotations

import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

DAY = timedelta(hours=24)
HOUR = timedelta(hours=1)
MAX_HOLD = 60.0  # seconds: the longest hold after a refusal
MIN_RATE = 1.0  # msg/s: halving stops here; slower than that, patience decides
OBSERVE = 10.0  # seconds of turns over which the rate "seen" is measured


class Rates(BaseModel):
    """How fast a provider lets one account send; at least one of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_second: float | None = Field(None, gt=0)
    per_minute: int | None = Field(None, gt=0)
    per_hour: int | None = Field(None, gt=0)
    per_day: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_at_least(self) -> Rates:
        if all(v is None for v in (self.per_second, self.per_minute, self.per_hour, self.per_day)):
            raise ValueError("give at least one of per_second, per_minute, per_hour, per_day")
        return self


_EXPECTED = "expected messages per second, or a mapping such as {per_second: 14, per_day: 50000}"


def rates(value: float | str | dict[str, Any] | Rates | None) -> Rates | None:
    """``rate_limit`` as written: a number is messages per second (what it always meant), a
    mapping names the windows (``{per_second: 14, per_day: 50000}``)."""
    if value is None or isinstance(value, Rates):
        return value
    if isinstance(value, bool):
        raise ValueError(_EXPECTED)
    if isinstance(value, str):  # a number from ${VAR} arrives as text
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{_EXPECTED}, not {value!r}") from None
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"must be more than 0 messages per second, not {value}")
        return Rates(per_second=float(value))
    if isinstance(value, dict):
        try:
            return Rates.model_validate(value)
        except ValidationError as exc:
            raise ValueError("; ".join(_problem(e) for e in exc.errors())) from None
    raise ValueError(f"{_EXPECTED}, not {type(value).__name__}")


def _problem(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r} (known: per_second, per_minute, per_hour, per_day)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


# For an options model: ``rate_limit: RateLimit = None`` takes a number or a mapping.
RateLimit = Annotated[Rates | None, BeforeValidator(rates)]

Period = Literal["day", "hour", "minute"]
_LABEL = {"day": "daily", "hour": "hourly", "minute": "per-minute"}


class QuotaReached(Exception):
    """Nothing more may be sent through this sender before ``until`` (UTC)."""

    def __init__(self, period: Period, limit: int, until: datetime) -> None:
        self.period, self.limit, self.until = period, limit, until.astimezone(UTC)
        stamp = "%Y-%m-%d %H:%M" if self.until.second == 0 else "%Y-%m-%d %H:%M:%S"
        super().__init__(
            f"{_LABEL[period]} quota of {limit} reached; goes on at {self.until.strftime(stamp)} UTC"
        )


def _hour(when: datetime) -> datetime:
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    return when.replace(minute=0, second=0, microsecond=0)


def day_used(buckets: Iterable[tuple[datetime, int]], now: datetime) -> int:
    """Messages in the rolling 24 h before ``now``, from hour buckets (start of hour, count)."""
    return sum(n for hour, n in buckets if hour + DAY + HOUR > now)


def day_resumes_at(buckets: Iterable[tuple[datetime, int]], per_day: int, now: datetime) -> datetime | None:
    """When one more message fits in ``per_day`` again: None if it fits now, else the time
    enough of the oldest buckets have aged out (a bucket counts until 25 h after its hour
    began, when all of it is surely past the 24 h)."""
    live = sorted((hour, n) for hour, n in buckets if hour + DAY + HOUR > now)
    used = sum(n for _, n in live)
    for hour, n in live:
        if used < per_day:
            break
        used -= n
        if used < per_day:
            return hour + DAY + HOUR
    return None if used < per_day else now + DAY + HOUR  # quota of 0 cannot be: Rates refuses it


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Pacer:
    """Turns for every thread of one sender instance, under its ``Rates`` (see the module).

    ``history``: the store's hour buckets of this sender for the last day, as
    ``store.sent_since(name, now - quota.DAY)`` returns them; read once here, on the thread
    that owns the store. ``clock`` (monotonic seconds) times the second, minute and hour
    windows and the holds; ``wall`` (aware UTC now) the day; ``sleep`` waits (default: a
    real sleep, cut short by ``stop``); ``random`` jitters the holds.
    """

    def __init__(
        self,
        rates: Rates | None,
        *,
        history: Iterable[tuple[datetime, int]] = (),
        max_wait: float = 300.0,
        quiet: float = 60.0,
        steps: int = 100,
        max_hold: float = MAX_HOLD,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], None] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.rates = rates
        self.max_wait, self.quiet, self.steps = max_wait, quiet, steps
        self._clock, self._wall, self._sleep, self._random = clock, wall, sleep, random
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # a reservation was settled
        self._base = rates.per_second if rates else None
        self._rate = self._base  # the effective msg/s; None: no spacing
        self._target = self._base  # what ok() climbs back to
        self._last: float | None = None  # clock() of the last turn
        self._minute: deque[float] = deque()
        self._hour: deque[float] = deque()
        self._recent: deque[float] = deque()  # turns of the last OBSERVE seconds
        self._hold_until = float("-inf")
        self.max_hold = max_hold
        self._backoff = min(1.0, max_hold)
        self._last_refusal: float | None = None
        self._day: dict[datetime, int] = {}
        for hour, n in history:
            self._day[_hour(hour)] = self._day.get(_hour(hour), 0) + n
        self._reserved = 0

    @property
    def counts_days(self) -> bool:
        """Whether it keeps a day quota (and so wants the store's count, ``recount``)."""
        return self.rates is not None and self.rates.per_day is not None

    def recount(self, history: Iterable[tuple[datetime, int]]) -> None:
        """The store's hour buckets again, as other processes sending through the same
        sender wrote them too: the day quota is the sum of all of them, not this process's
        alone. Messages accepted here and not yet written are not in it; they are few (those
        on the connections), and the next recount has them."""
        day: dict[datetime, int] = {}
        for hour, n in history:
            day[_hour(hour)] = day.get(_hour(hour), 0) + n
        with self._lock:
            self._day = day

    # -- what status shows -------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """The messages per second now allowed (lowered after refusals); None: no limit."""
        with self._lock:
            return self._rate

    @property
    def sent_today(self) -> int:
        """Messages in the rolling 24 h: the store's history and what was sent since (under a
        day quota; without one, the history alone)."""
        with self._lock:
            return day_used(self._day.items(), self._wall())

    def day_reached(self) -> QuotaReached | None:
        """The day's quota, if it is used up now (counting turns on the way): until when."""
        rates = self.rates
        if rates is None or rates.per_day is None:
            return None
        with self._lock:
            wall = self._wall()
            buckets = [*self._day.items(), (_hour(wall), self._reserved)]
            until = day_resumes_at(buckets, rates.per_day, wall)
        return None if until is None else QuotaReached("day", rates.per_day, until)

    # -- turns ---------------------------------------------------------------------------------

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for a turn under every rate and take it: True. False, with no turn taken, once
        ``stop`` is set. ``QuotaReached`` if the day's quota is used up, or a minute or hour
        window would keep it waiting longer than ``max_wait``."""
        settling_since: float | None = None
        while True:
            if stop is not None and stop.is_set():
                return False
            with self._lock:
                # Turns taken but not yet settled may fill the day: wait for them to settle,
                # though not for ever (a caller that never settles must not hang the rest).
                unsettled_ok = settling_since is None or self._clock() - settling_since < self.max_wait
                wait = self._turn(unsettled_ok)
                if wait is None:
                    return True
                if wait == 0:
                    settling_since = self._clock() if settling_since is None else settling_since
                    self._settled.wait(0.1)
                    continue
            if self._sleep is not None:
                self._sleep(wait)
            elif stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)

    def turn(self) -> float | None:
        """``acquire`` for a caller that never waits: the turn taken (None), or how long until
        one may be free (0: once a turn on the way settles), none taken. Raises as ``acquire``
        does. Its caller settles every turn (a turn on the way is answered or given back)."""
        with self._lock:
            return self._turn(unsettled_ok=True)

    def _turn(self, unsettled_ok: bool) -> float | None:
        """Under the lock: take a turn (None), or how long to wait (0: until a turn in flight
        settles). The turn is stamped with the last clock() read here."""
        rates = self.rates
        if rates is not None and rates.per_day is not None:
            wall = self._wall()
            used = day_used(self._day.items(), wall)
            if used + self._reserved >= rates.per_day:
                if used < rates.per_day and unsettled_ok:
                    return 0.0
                # As if the turns in flight went out now: the earliest the quota can reopen.
                buckets = [*self._day.items(), (_hour(wall), self._reserved)]
                until = day_resumes_at(buckets, rates.per_day, wall) or wall
                raise QuotaReached("day", rates.per_day, until)
        now = self._clock()
        waits = [self._hold_until - now]
        if self._rate is not None and self._last is not None:
            waits.append(self._last + 1.0 / self._rate - now)
        windows: list[tuple[Period, deque[float], int, float]] = []
        if rates is not None and rates.per_minute is not None:
            windows.append(("minute", self._minute, rates.per_minute, 60.0))
        if rates is not None and rates.per_hour is not None:
            windows.append(("hour", self._hour, rates.per_hour, 3600.0))
        for period, window, limit, span in windows:
            while window and window[0] <= now - span:
                window.popleft()
            if len(window) >= limit:
                wait = window[-limit] + span - now
                if wait > self.max_wait:
                    raise QuotaReached(period, limit, self._wall() + timedelta(seconds=wait))
                waits.append(wait)
        wait = max(waits)
        if wait > 0:
            return wait
        self._last = now
        for _, window, _, _ in windows:
            window.append(now)
        self._recent.append(now)
        while self._recent[0] <= now - OBSERVE:
            self._recent.popleft()
        if rates is not None and rates.per_day is not None:
            self._reserved += 1
        return None

    def sent(self, n: int = 1) -> None:
        """``n`` messages went out: they count against the day (the caller also writes them
        to the store with ``count_sent``), and settle their turns' reservations."""
        with self._lock:
            self._count(n)

    def accepted(self) -> None:
        """``sent()`` and ``ok()`` of one message the server took, under one lock: it runs
        once a message."""
        with self._lock:
            self._count(1)
            self._climb()

    def _count(self, n: int) -> None:
        if self.rates is not None and self.rates.per_day is not None:
            # Only a day quota needs the count (the store keeps its own for ``status``): a
            # wall-clock read a message less for every other sender.
            hour = _hour(self._wall())
            self._day[hour] = self._day.get(hour, 0) + n
        self._settle(n)

    def release(self, n: int = 1) -> None:
        """``n`` turns taken were not used (the message was refused, the connection lost)."""
        with self._lock:
            self._settle(n)

    def _settle(self, n: int) -> None:
        self._reserved = max(0, self._reserved - n)
        self._settled.notify_all()
        if len(self._day) > 26:  # keep the day's buckets, no more
            horizon = self._wall() - DAY - HOUR
            self._day = {h: c for h, c in self._day.items() if h > horizon}

    # -- what the server says --------------------------------------------------------------------

    def throttled(self) -> float:
        """A server refused for sending too fast: halve the rate and hold every thread; the
        hold, in seconds. During a hold, only what is left of it (the same burst)."""
        with self._lock:
            now = self._clock()
            if now < self._hold_until:
                return self._hold_until - now
            if self._last_refusal is not None and now - self._last_refusal >= self.quiet:
                self._backoff = min(1.0, self.max_hold)
            current = self._rate if self._rate is not None else self._observed(now)
            if self._target is None:
                self._target = current
            self._rate = max(min(MIN_RATE, current), current / 2)
            hold = self._backoff * (0.75 + 0.25 * self._random())
            self._backoff = min(self._backoff * 2, self.max_hold)
            self._hold_until = now + hold
            self._last_refusal = now
            return hold

    def ok(self) -> None:
        """A message was accepted: climb a step back towards the configured rate."""
        with self._lock:
            self._climb()

    def _climb(self) -> None:
        if self._last_refusal is None and self._rate == self._target:
            return  # never refused, or climbed all the way back: nothing to do
        now = self._clock()
        if self._last_refusal is not None and now - self._last_refusal >= self.quiet:
            self._backoff = min(1.0, self.max_hold)
        if self._rate is None or self._target is None or self._rate >= self._target:
            return
        self._rate += self._target / self.steps
        if self._rate >= self._target:
            # Back where it was: the configured rate, or no limit at all if none was set.
            self._rate = self._target = self._base

    def _observed(self, now: float) -> float:
        """Messages per second over the last OBSERVE seconds of turns (1 if there were none)."""
        recent = [t for t in self._recent if t > now - OBSERVE]
        if not recent:
            return 1.0
        return max(MIN_RATE, len(recent) / max(now - recent[0], 0.1))
