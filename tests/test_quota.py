"""A sender's quotas: per second, minute, hour and rolling day, and slowing down when told to.

The clocks are injected: time moves only when a thread sleeps, so every test runs in
milliseconds and asserts what was decided, never how long it took."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel, ValidationError

from newsletter.quota import (
    DAY,
    MAX_HOLD,
    Pacer,
    QuotaReached,
    RateLimit,
    Rates,
    day_resumes_at,
    rates,
)

T0 = datetime(2026, 12, 1, 13, 20, tzinfo=UTC)
H = datetime(2026, 12, 1, 13, tzinfo=UTC)


class FakeTime:
    """Monotonic seconds that move only by sleeping. A thread that sleeps ``d`` wakes ``d``
    after the time it last read; the clock is the latest time any thread reached. What a
    thread last read when ``acquire`` returned is the time its turn was stamped with."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()
        self.seen: dict[int, float] = {}
        self.sleeps: list[float] = []

    def clock(self) -> float:
        with self.lock:
            self.seen[threading.get_ident()] = self.now
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            start = self.seen.get(threading.get_ident(), self.now)
            self.now = max(self.now, start + seconds)

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now)

    def turn(self) -> float:
        return self.seen[threading.get_ident()]

    def pacer(self, limits: Rates | None, **kw: object) -> Pacer:
        return Pacer(limits, clock=self.clock, wall=self.wall, sleep=self.sleep, **kw)  # type: ignore[arg-type]


# -- Rates --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (14, Rates(per_second=14)),
        (0.5, Rates(per_second=0.5)),
        ("14", Rates(per_second=14)),  # from ${VAR}
        ({"per_second": 14, "per_day": 50000}, Rates(per_second=14, per_day=50000)),
        ({"per_minute": 600}, Rates(per_minute=600)),
        ({"per_hour": 1000, "per_day": 10000}, Rates(per_hour=1000, per_day=10000)),
        (Rates(per_day=200), Rates(per_day=200)),
    ],
)
def test_rates_read_a_number_as_per_second_and_a_mapping_by_window(value: object, expected: Rates) -> None:
    assert rates(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be more than 0 messages per second, not 0"),
        (-3, "must be more than 0 messages per second"),
        (True, "expected messages per second, or a mapping"),
        ("fast", "not 'fast'"),
        ([14], "not list"),
        ({}, "give at least one of per_second, per_minute, per_hour, per_day"),
        ({"per_week": 5}, "unknown key 'per_week' (known: per_second, per_minute, per_hour, per_day)"),
        ({"per_minute": 0}, "per_minute: Input should be greater than 0"),
        ({"per_day": 1.5}, "per_day: Input should be a valid integer"),
        ({"per_second": "x"}, "per_second: Input should be a valid number"),
    ],
)
def test_bad_rates_say_what_is_wrong(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        rates(value)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_an_options_field_takes_a_number_or_a_mapping_and_names_its_key() -> None:
    class Options(BaseModel):
        rate_limit: RateLimit = None

    assert Options().rate_limit is None
    assert Options(rate_limit=5).rate_limit == Rates(per_second=5)  # type: ignore[arg-type]
    assert Options(rate_limit={"per_hour": 100}).rate_limit == Rates(per_hour=100)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as caught:
        Options(rate_limit={"per_hour": -1})  # type: ignore[arg-type]
    [error] = caught.value.errors()
    assert error["loc"] == ("rate_limit",)
    assert "per_hour: Input should be greater than 0" in error["msg"]


# -- the windows --------------------------------------------------------------------------------


def test_per_second_spaces_turns_a_burst_of_one() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=4))
    turns = []
    for _ in range(5):
        assert pacer.acquire()
        turns.append(fake.turn())
    assert turns == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fake.sleeps == [0.25] * 4
    assert pacer.rate == 4


def test_no_rates_never_waits() -> None:
    fake = FakeTime()
    pacer = fake.pacer(None)
    for _ in range(100):
        assert pacer.acquire()
    assert fake.sleeps == [] and pacer.rate is None


def test_per_minute_is_a_sliding_window() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_minute=3))
    turns = []
    for _ in range(7):
        pacer.acquire()
        turns.append(fake.turn())
    assert turns == [0, 0, 0, 60, 60, 60, 120]


def test_per_hour_and_per_minute_together() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_minute=2, per_hour=3), max_wait=3600)
    turns = []
    for _ in range(5):
        pacer.acquire()
        turns.append(fake.turn())
    assert turns == [0, 0, 60, 3600, 3600]


@pytest.mark.parametrize(
    ("limits", "period", "until", "message"),
    [
        (
            Rates(per_hour=2),
            "hour",
            T0 + timedelta(hours=1),
            "hourly quota of 2 reached; goes on at 2026-12-01 14:20 UTC",
        ),
        (
            Rates(per_minute=2),
            "minute",
            T0 + timedelta(seconds=60),
            "per-minute quota of 2 reached; goes on at 2026-12-01 13:21 UTC",
        ),
    ],
)
def test_a_wait_longer_than_max_wait_is_quota_reached_with_when(
    limits: Rates, period: str, until: datetime, message: str
) -> None:
    fake = FakeTime()
    pacer = fake.pacer(limits, max_wait=30)
    pacer.acquire()
    pacer.acquire()
    with pytest.raises(QuotaReached) as caught:
        pacer.acquire()
    assert (caught.value.period, caught.value.limit, caught.value.until) == (period, 2, until)
    assert str(caught.value) == message
    assert fake.sleeps == []  # it did not wait before saying so


# -- the day ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buckets", "per_day", "expected"),
    [
        ([], 10, None),
        ([(H - timedelta(hours=3), 9)], 10, None),
        ([(H - timedelta(hours=3), 10)], 10, H + timedelta(hours=22)),
        ([(H - timedelta(hours=20), 4), (H - timedelta(hours=2), 6)], 10, H + timedelta(hours=5)),
        # the 13:00 bucket of yesterday still counts at 13:20 (some of it is within 24 h) ...
        ([(H - DAY, 10)], 10, H + timedelta(hours=1)),
        # ... the 12:00 one no longer does
        ([(H - DAY - timedelta(hours=1), 100), (H - timedelta(hours=1), 3)], 10, None),
        ([(H - timedelta(hours=h), 3) for h in (10, 5, 1)], 5, H + timedelta(hours=20)),
        # unsorted, and over the quota: every bucket but the newest must age out
        ([(H, 50), (H - timedelta(hours=4), 1)], 10, H + timedelta(hours=25)),
    ],
)
def test_day_resumes_when_enough_hours_age_out(
    buckets: list[tuple[datetime, int]], per_day: int, expected: datetime | None
) -> None:
    assert day_resumes_at(buckets, per_day, T0) == expected


def test_the_day_quota_counts_history_and_what_is_sent() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_day=5), history=[(H - timedelta(hours=2), 3)])
    assert pacer.sent_today == 3
    for _ in range(2):
        assert pacer.acquire()
        pacer.sent()
    assert pacer.sent_today == 5
    with pytest.raises(QuotaReached) as caught:
        pacer.acquire()
    assert caught.value.until == datetime(2026, 12, 2, 12, tzinfo=UTC)
    assert str(caught.value) == "daily quota of 5 reached; goes on at 2026-12-02 12:00 UTC"


def test_turns_in_flight_hold_the_day_until_settled() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_day=3))
    assert pacer.acquire() and pacer.acquire() and pacer.acquire()  # three in flight
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(pacer.acquire()))
    waiter.start()
    pacer.release()  # one was refused: its turn is free again
    waiter.join(10)
    assert got == [True]
    pacer.sent(3)
    with pytest.raises(QuotaReached):
        pacer.acquire()


def test_turn_never_waits_it_says_how_long_or_why_not() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=4, per_day=3))
    assert pacer.turn() is None  # taken
    assert pacer.turn() == pytest.approx(0.25)  # the next in a quarter of a second, none taken
    fake.now += 0.25
    assert pacer.turn() is None and pacer.day_reached() is None
    fake.now += 0.25
    assert pacer.turn() is None  # three on the way: the day is full once they are answered
    fake.now += 0.25
    assert pacer.turn() == 0  # until one of them settles
    assert isinstance(pacer.day_reached(), QuotaReached)
    pacer.release()  # one was refused: its turn is free again
    assert pacer.day_reached() is None and pacer.turn() is None
    pacer.sent(3)
    fake.now += 0.25
    with pytest.raises(QuotaReached):
        pacer.turn()
    assert fake.sleeps == []  # nothing slept


def test_a_sender_without_a_day_quota_has_no_day_to_reach() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=1), history=[(H, 10**6)])
    assert pacer.day_reached() is None and pacer.turn() is None


def test_turns_never_settled_do_not_hang_the_others() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_day=2), max_wait=0)
    pacer.acquire()
    pacer.acquire()
    with pytest.raises(QuotaReached) as caught:
        pacer.acquire()
    # counted as if they went out now
    assert caught.value.until == datetime(2026, 12, 2, 14, tzinfo=UTC)


# -- slowing down when told to ----------------------------------------------------------------


def test_throttled_halves_the_rate_and_holds_every_turn() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=10), random=lambda: 1.0)
    pacer.acquire()
    assert pacer.throttled() == 1.0
    assert pacer.rate == 5
    assert pacer.throttled() == 1.0  # the same burst, from another connection: no second halving
    assert pacer.rate == 5
    pacer.acquire()
    assert fake.turn() == 1.0  # held
    pacer.acquire()
    assert fake.turn() == 1.2  # then spaced at 5/s


def test_the_hold_doubles_while_refusals_repeat_up_to_a_minute_with_jitter() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=1000), random=lambda: 0.0)
    holds = []
    for _ in range(9):
        holds.append(pacer.throttled())
        fake.sleep(holds[-1])  # the hold passes
        fake.clock()
    assert holds == [0.75 * b for b in (1, 2, 4, 8, 16, 32, MAX_HOLD, MAX_HOLD, MAX_HOLD)]
    assert pacer.rate == pytest.approx(1000 / 2**9)


def test_ok_climbs_back_to_the_configured_rate_and_a_quiet_spell_resets_the_hold() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=10), steps=10, quiet=60, random=lambda: 1.0)
    pacer.throttled()
    fake.sleep(1)
    pacer.throttled()
    assert pacer.rate == 2.5
    rates_seen = []
    for _ in range(10):
        pacer.ok()
        rates_seen.append(pacer.rate)
    assert rates_seen == [3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10, 10, 10]
    fake.clock()
    fake.sleep(120)
    pacer.ok()
    assert pacer.throttled() == 1.0  # the backoff started again


def test_with_no_rate_set_it_halves_the_rate_seen_and_later_lets_go() -> None:
    fake = FakeTime()
    pacer = fake.pacer(None, steps=4, random=lambda: 1.0)
    for _ in range(40):  # 40 in 2 s: 20 a second
        pacer.acquire()
        fake.sleep(0.05)
    pacer.throttled()
    assert pacer.rate == pytest.approx(10, rel=0.05)
    for _ in range(2):
        pacer.ok()
    assert pacer.rate is None  # back to no limit


# -- threads and stopping ---------------------------------------------------------------------


def test_eight_threads_never_exceed_any_window() -> None:
    fake = FakeTime()
    pacer = fake.pacer(Rates(per_second=20, per_minute=50))
    turns: list[float] = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(25):
            assert pacer.acquire()
            with lock:
                turns.append(fake.turn())
            pacer.ok()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    turns.sort()
    assert len(turns) == 200
    assert min(b - a for a, b in itertools.pairwise(turns)) >= 0.05 - 1e-9
    assert min(turns[i + 50] - turns[i] for i in range(len(turns) - 50)) >= 60 - 1e-9


def test_a_stop_ends_a_wait_without_taking_a_turn() -> None:
    pacer = Pacer(Rates(per_minute=1))  # the real clock and sleep
    assert pacer.acquire()
    stop = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(pacer.acquire(stop)))
    waiter.start()
    stop.set()
    waiter.join(10)
    assert got == [False]
    assert not pacer.acquire(stop)
