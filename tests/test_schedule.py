"""When schedules fire, computed without sleeping: shorthands, cron, timezones, DST, misfires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from newsletter.schedule import fire_times, format_duration, missed_run, parse_duration, parse_when

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def local(times: list[datetime], tz: ZoneInfo) -> list[str]:
    return [t.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z") for t in times]


def nxt(when: str, tz: str, start: datetime, n: int = 3) -> list[str]:
    trigger = parse_when(when, tz)
    return local(fire_times(trigger, start, start + timedelta(days=120), limit=n), ZoneInfo(tz))


START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # a Thursday


@pytest.mark.parametrize(
    ("when", "tz", "expected"),
    [
        (
            "daily at 08:00",
            "UTC",
            ["Fri 2026-11-27 08:00 UTC", "Sat 2026-11-28 08:00 UTC", "Sun 2026-11-29 08:00 UTC"],
        ),
        (
            "Daily  at 8:05",
            "Europe/Lisbon",
            ["Fri 2026-11-27 08:05 WET", "Sat 2026-11-28 08:05 WET", "Sun 2026-11-29 08:05 WET"],
        ),
        (
            "weekdays at 07:30",
            "UTC",
            ["Fri 2026-11-27 07:30 UTC", "Mon 2026-11-30 07:30 UTC", "Tue 2026-12-01 07:30 UTC"],
        ),
        (
            "weekly on monday at 08:00",
            "America/New_York",
            ["Mon 2026-11-30 08:00 EST", "Mon 2026-12-07 08:00 EST", "Mon 2026-12-14 08:00 EST"],
        ),
        (
            "weekly on fri at 17:45",
            "Asia/Tokyo",
            ["Fri 2026-11-27 17:45 JST", "Fri 2026-12-04 17:45 JST", "Fri 2026-12-11 17:45 JST"],
        ),
        (
            "monthly on the first tuesday",
            "UTC",
            ["Tue 2026-12-01 08:00 UTC", "Tue 2027-01-05 08:00 UTC", "Tue 2027-02-02 08:00 UTC"],
        ),
        (
            "monthly on the last friday at 16:00",
            "UTC",
            ["Fri 2026-11-27 16:00 UTC", "Fri 2026-12-25 16:00 UTC", "Fri 2027-01-29 16:00 UTC"],
        ),
        (
            "monthly on day 15 at 09:00",
            "UTC",
            ["Tue 2026-12-15 09:00 UTC", "Fri 2027-01-15 09:00 UTC", "Mon 2027-02-15 09:00 UTC"],
        ),
        (
            "0 8 * * mon",
            "UTC",
            ["Mon 2026-11-30 08:00 UTC", "Mon 2026-12-07 08:00 UTC", "Mon 2026-12-14 08:00 UTC"],
        ),
        (
            "30 6 1,15 * *",
            "UTC",
            ["Tue 2026-12-01 06:30 UTC", "Tue 2026-12-15 06:30 UTC", "Fri 2027-01-01 06:30 UTC"],
        ),
    ],
)
def test_shorthands_and_cron(when: str, tz: str, expected: list[str]) -> None:
    assert nxt(when, tz, START) == expected


def test_every_n_units_is_an_interval() -> None:
    trigger = parse_when("every 10 minutes")
    first = trigger.get_next_fire_time(None, datetime.now(UTC))
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    assert first is not None and second is not None
    assert second - first == timedelta(minutes=10)


@pytest.mark.parametrize(
    "bad",
    ["dialy at 08:00", "daily at 25:00", "weekly on funday", "monthly on day 40", "* * *", "every 0 minutes"],
)
def test_unreadable_rules_say_what_is_accepted(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_when(bad)
    assert repr(bad) in str(info.value) or "interval" in str(info.value)


def test_unknown_timezone() -> None:
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        parse_when("daily at 08:00", "Mars/Olympus")


def test_spring_forward_fires_once_on_the_short_night() -> None:
    # 29 March 2026: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist.
    start = datetime(2026, 3, 27, 12, 0, tzinfo=BERLIN)
    times = fire_times(parse_when("daily at 02:30", "Europe/Berlin"), start, start + timedelta(days=4))
    assert local(times, BERLIN) == [
        "Sat 2026-03-28 02:30 CET",
        "Sun 2026-03-29 03:30 CEST",  # an hour later on the wall clock, still once
        "Mon 2026-03-30 02:30 CEST",
        "Tue 2026-03-31 02:30 CEST",
    ]


def test_fall_back_fires_once_on_the_long_night() -> None:
    # 25 October 2026: Berlin clocks go back from 03:00 to 02:00; 02:30 happens twice.
    start = datetime(2026, 10, 23, 12, 0, tzinfo=BERLIN)
    times = fire_times(parse_when("daily at 02:30", "Europe/Berlin"), start, start + timedelta(days=4))
    assert local(times, BERLIN) == [
        "Sat 2026-10-24 02:30 CEST",
        "Sun 2026-10-25 02:30 CEST",
        "Mon 2026-10-26 02:30 CET",
        "Tue 2026-10-27 02:30 CET",
    ]
    assert times[2] - times[1] == timedelta(hours=25)


def test_a_weekly_send_keeps_its_local_hour_across_dst() -> None:
    start = datetime(2026, 10, 20, tzinfo=UTC)
    times = fire_times(
        parse_when("weekly on monday at 08:00", "America/New_York"), start, start + timedelta(days=21)
    )
    assert local(times, NEW_YORK) == [
        "Mon 2026-10-26 08:00 EDT",
        "Mon 2026-11-02 08:00 EST",
        "Mon 2026-11-09 08:00 EST",
    ]
    assert [t.hour for t in times] == [12, 13, 13]  # in UTC the hour moves, on the wall it does not


def test_missed_run_within_grace_is_caught_up_once_and_older_ones_are_skipped() -> None:
    trigger = parse_when("daily at 08:00")
    now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    yesterday = datetime(2026, 11, 25, 8, 0, 5, tzinfo=UTC)
    # Down since just after yesterday's run; today's 08:00 passed two hours ago.
    assert missed_run(trigger, yesterday, now, timedelta(hours=3)) == (
        datetime(2026, 11, 26, 8, 0, tzinfo=UTC),
        None,
    )
    # With one hour of grace it is too old: skipped, and reported.
    assert missed_run(trigger, yesterday, now, timedelta(hours=1)) == (
        None,
        datetime(2026, 11, 26, 8, 0, tzinfo=UTC),
    )
    # Nothing missed when the last run came after the fire time.
    assert missed_run(trigger, datetime(2026, 11, 26, 8, 0, 3, tzinfo=UTC), now, timedelta(hours=3)) == (
        None,
        None,
    )
    # A schedule that never ran has nothing to catch up.
    assert missed_run(trigger, None, now, timedelta(hours=3)) == (None, None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90), ("90s", 90), ("15m", 900), ("3h", 10800), ("1d", 86400), ("2 hours", 7200)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(90, "90s"), (900, "15m"), (5400, "90m"), (10800, "3h"), (86400, "1d"), (1.5, "1.5s")],
)
def test_durations_are_shown_as_the_file_writes_them(seconds: float, text: str) -> None:
    assert format_duration(timedelta(seconds=seconds)) == text
    assert parse_duration(text) == timedelta(seconds=seconds)
