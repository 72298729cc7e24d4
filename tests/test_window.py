"""Send windows: what they accept, when they are open, and the nights clocks change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from newsletter.config import load_config
from newsletter.errors import ConfigError
from newsletter.window import SendWindow, parse_window

BERLIN = ZoneInfo("Europe/Berlin")
LISBON = ZoneInfo("Europe/Lisbon")
# The week of Monday 2026-12-07; EU clocks go forward on 2026-03-29 and back on 2026-10-25.
DAYS = {"mon": 7, "tue": 8, "wed": 9, "thu": 10, "fri": 11, "sat": 12, "sun": 13}


def local(text: str, tz: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    """'mon 08:00' in the week above, or an ISO date and time, in ``tz``."""
    day, _, clock = text.partition(" ")
    if day in DAYS:
        text = f"2026-12-{DAYS[day]:02d}T{clock}"
    return datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "open_at", "closed_at"),
    [
        ("weekdays 08:00-18:00", ["mon 08:00", "fri 17:59"], ["mon 07:59", "mon 18:00", "sat 12:00"]),
        ("daily 09:00-17:30", ["sun 09:00", "wed 17:29"], ["sun 17:30", "tue 08:59"]),
        ("mon-fri 08:00-18:00", ["tue 12:00"], ["sun 12:00"]),
        ("Mon-Wed, Fri 08:00 - 18:00", ["wed 12:00", "fri 12:00"], ["thu 12:00"]),
        ("fri-mon 10:00-11:00", ["sat 10:30", "mon 10:30"], ["tue 10:30", "thu 10:30"]),
        ("sat,sun 10:00-12:00", ["sat 10:00", "sun 11:59"], ["fri 11:00", "sun 12:00"]),
        ("weekends 10:00-16:00", ["sun 15:00"], ["mon 12:00"]),
        (
            "monday,wednesday,friday 22:00-06:00",
            ["mon 23:00", "tue 05:59", "sat 03:00"],
            ["tue 06:00", "tue 23:00", "mon 03:00"],
        ),
        ("thurs 8:00-9:00", ["thu 08:30"], ["wed 08:30"]),
        ("weekdays 08:00-12:00; sat 10:00-12:00;", ["sat 11:00", "mon 09:00"], ["sun 11:00"]),
        ("daily 00:00-24:00", ["mon 00:00", "sun 23:59"], []),
    ],
)
def test_windows_are_read_as_written(text: str, open_at: list[str], closed_at: list[str]) -> None:
    window = parse_window(text, BERLIN)
    assert [window.is_open(local(t)) for t in open_at] == [True] * len(open_at)
    assert [window.is_open(local(t)) for t in closed_at] == [False] * len(closed_at)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty send window (e.g. 'weekdays 08:00-18:00'"),
        (" ; ", "empty send window"),
        ("weekdays", "cannot read 'weekdays': write days, then HH:MM-HH:MM; e.g. 'weekdays 08:00-18:00'"),
        ("08:00-18:00", "cannot read '08:00-18:00'"),
        ("mnday 08:00-18:00", "unknown day 'mnday' in 'mnday 08:00-18:00' (days: mon, tue"),
        ("mo-fr 08:00-18:00", "unknown day 'mo'"),
        ("mon-fri 8-18", "bad time '8' in 'mon-fri 8-18': write HH:MM from 00:00 to 23:59"),
        ("mon 25:00-26:00", "bad time '25:00'"),
        ("mon 08:60-09:00", "bad time '08:60'"),
        ("mon 24:00-02:00", "(24:00 only as an end)"),
        ("mon 08:00-08:00", "'mon 08:00-08:00' opens and closes at once; the whole day is 00:00-24:00"),
        ("weekdays 08:00-18:00; sat 10-12", "bad time '10' in 'sat 10-12'"),
    ],
)
def test_a_bad_window_says_what_is_wrong_and_shows_an_example(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_window(text)
    assert message in str(caught.value)
    assert "e.g. 'weekdays 08:00-18:00'" in str(caught.value) or "00:00-24:00" in str(caught.value)


def test_an_unknown_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        parse_window("daily 08:00-18:00", "Mars/Olympus")


def test_a_time_without_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        parse_window("daily 08:00-18:00").is_open(datetime(2026, 12, 7, 9))


# -- when it opens and closes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "at", "next_open", "closes"),
    [
        ("mon-fri 08:00-18:00", "mon 12:00", "mon 12:00", "mon 18:00"),
        ("mon-fri 08:00-18:00", "mon 18:00", "tue 08:00", None),
        ("mon-fri 08:00-18:00", "fri 19:00", "2026-12-14T08:00", None),
        ("mon-fri 08:00-18:00", "sat 12:00", "2026-12-14T08:00", None),
        ("mon,wed,fri 22:00-06:00", "tue 03:00", "tue 03:00", "tue 06:00"),
        ("mon,wed,fri 22:00-06:00", "tue 23:00", "wed 22:00", None),
        ("mon,wed,fri 22:00-06:00", "sat 05:00", "sat 05:00", "sat 06:00"),
        ("mon,wed,fri 22:00-06:00", "sun 03:00", "2026-12-14T22:00", None),
        ("mon,wed,fri 22:00-06:00", "mon 03:00", "mon 22:00", None),  # Sunday has no night
        ("weekends 10:00-16:00", "sat 09:59", "sat 10:00", None),
        ("weekends 10:00-16:00", "sun 16:00", "2026-12-19T10:00", None),
        # windows that touch are one: it closes at the end of the last
        ("weekdays 08:00-12:00; weekdays 12:00-18:00", "mon 11:00", "mon 11:00", "mon 18:00"),
        ("daily 22:00-24:00; daily 00:00-02:00", "mon 23:00", "mon 23:00", "tue 02:00"),
        ("sun 20:00-04:00; mon 04:00-05:00", "sun 21:00", "sun 21:00", "2026-12-14T05:00"),
        ("daily 00:00-24:00", "wed 13:00", "wed 13:00", None),  # never closes
    ],
)
def test_next_open_and_closes(text: str, at: str, next_open: str, closes: str | None) -> None:
    window = parse_window(text, BERLIN)
    assert window.next_open(local(at)) == local(next_open)
    assert window.closes(local(at)) == (local(closes) if closes else None)
    assert window.is_open(local(at)) == (window.next_open(local(at)) == local(at))


def test_a_window_covering_the_week_is_always_open() -> None:
    assert parse_window("daily 00:00-24:00").always_open
    assert parse_window("daily 00:00-12:00; daily 12:00-24:00").always_open
    assert parse_window("daily 12:00-12:01; daily 12:01-12:00").always_open
    assert not parse_window("daily 00:00-23:59").always_open
    assert not parse_window("mon-sat 00:00-24:00").always_open


# -- the nights clocks change --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tz", "day", "stretches"),
    [
        # Berlin forward 02:00 -> 03:00: the night is an hour shorter, and there once
        ("daily 22:00-06:00", BERLIN, "2026-03-28", [("2026-03-28T21:00", "2026-03-29T04:00")]),
        # Berlin back 03:00 -> 02:00: an hour longer, and still once
        ("daily 22:00-06:00", BERLIN, "2026-10-24", [("2026-10-24T20:00", "2026-10-25T05:00")]),
        # opening at a skipped time: at the jump
        ("daily 02:30-03:30", BERLIN, "2026-03-29", [("2026-03-29T01:00", "2026-03-29T01:30")]),
        # inside the skipped hour: an hour later, not gone
        ("daily 02:15-02:45", BERLIN, "2026-03-29", [("2026-03-29T01:00", "2026-03-29T01:45")]),
        # a time shown twice: from the first 02:30 to the (one) 03:30
        ("daily 02:30-03:30", BERLIN, "2026-10-25", [("2026-10-25T00:30", "2026-10-25T02:30")]),
        # inside the repeated hour: the first pass only
        ("daily 02:15-02:45", BERLIN, "2026-10-25", [("2026-10-25T00:15", "2026-10-25T00:45")]),
        # Lisbon forward 01:00 -> 02:00 and back 02:00 -> 01:00
        ("sun 01:00-03:00", LISBON, "2026-03-29", [("2026-03-29T01:00", "2026-03-29T02:00")]),
        ("sun 01:00-03:00", LISBON, "2026-10-25", [("2026-10-25T00:00", "2026-10-25T03:00")]),
        ("daily 00:00-24:00; mon 01:00-02:00", LISBON, "2026-03-29", None),
        ("sun 00:00-24:00", LISBON, "2026-03-29", [("2026-03-29T00:00", "2026-03-29T23:00")]),
        ("sun 00:00-24:00", LISBON, "2026-10-25", [("2026-10-24T23:00", "2026-10-26T00:00")]),
    ],
)
def test_a_window_on_a_night_clocks_change_neither_vanishes_nor_doubles(
    text: str, tz: ZoneInfo, day: str, stretches: list[tuple[str, str]] | None
) -> None:
    window = parse_window(text, tz)
    first, last = local(f"{day}T00:00", tz), local(f"{day}T00:00", tz) + timedelta(days=1, hours=1)
    at = first - timedelta(days=1)
    if stretches is None:
        assert window.always_open and window.open_seconds_between(first, last) == 25 * 3600
        return
    found = []  # the stretches that open on ``day``
    while (opened := window.next_open(at)) < last:
        closes = window.closes(opened)
        assert closes is not None
        if opened >= first:
            found.append((opened.astimezone(UTC), closes.astimezone(UTC)))
        at = closes
    assert found == [(utc(a), utc(b)) for a, b in stretches]
    for a, b in found:  # is_open agrees with the stretches, inside and at both ends
        assert window.is_open(a) and window.is_open(b - timedelta(seconds=1)) and not window.is_open(b)


def test_is_open_in_the_repeated_hour_sees_only_the_first_pass() -> None:
    window = parse_window("daily 02:15-02:45", BERLIN)
    assert window.is_open(local("2026-10-25T02:20", fold=0))
    assert not window.is_open(local("2026-10-25T02:20", fold=1))


# -- how long sending takes inside windows -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "seconds", "finish"),
    [
        ("weekdays 09:00-17:00", "mon 09:30", 3600, "mon 10:30"),
        ("weekdays 09:00-17:00", "fri 16:00", 7200, "2026-12-14T10:00"),
        ("weekdays 09:00-17:00", "sat 12:00", 3600, "2026-12-14T10:00"),
        ("weekdays 09:00-17:00", "mon 09:00", 40 * 3600, "fri 17:00"),
        ("weekdays 09:00-17:00", "sun 12:00", 0, "sun 12:00"),
        ("daily 00:00-24:00", "sun 12:00", 90, "sun 12:01:30"),
        # the short spring night holds 7 h: the 8th is sent the next night
        ("daily 22:00-06:00", "2026-03-28T22:00", 8 * 3600, "2026-03-29T23:00"),
        ("daily 22:00-06:00", "2026-10-24T22:00", 8 * 3600, "2026-10-25T05:00"),
    ],
)
def test_finish_at_counts_only_open_time(text: str, start: str, seconds: float, finish: str) -> None:
    window = parse_window(text, BERLIN)
    done = window.finish_at(local(start), seconds)
    assert done.astimezone(UTC) == local(finish).astimezone(UTC)
    if seconds:
        assert window.open_seconds_between(local(start), done) == pytest.approx(seconds)


def test_open_seconds_between() -> None:
    window = parse_window("weekdays 09:00-17:00", BERLIN)
    assert window.open_seconds_between(local("mon 00:00"), local("2026-12-14T00:00")) == 40 * 3600
    assert window.open_seconds_between(local("mon 16:00"), local("tue 10:00")) == 2 * 3600
    assert window.open_seconds_between(local("tue 10:00"), local("mon 16:00")) == 0


# -- in schedules.yaml ---------------------------------------------------------------------------

CONFIG = """\
senders:
  mail: {{type: smtp, host: mail.example.net}}
schedules:
  weekly:
    feeds: [feeds/a.xml]
    subscribers: readers
    sender: mail
    from: News <news@example.net>
    unsubscribe_url: https://example.net/u/{{token}}
    {extra}
"""


def write(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "subscribers").mkdir(exist_ok=True)
    (tmp_path / "subscribers" / "readers.csv").write_text("email\nann@example.com\n")
    path = tmp_path / "schedules.yaml"
    path.write_text(CONFIG.format(extra=extra), encoding="utf-8")
    return path


def test_a_bad_send_window_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'send_window: "mnday 08:00-18:00"')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: schedules.weekly.send_window: Value error, unknown day 'mnday'" in str(caught.value)


def test_the_send_window_is_in_the_schedules_timezone(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "send_window: weekdays 08:00-18:00\n    timezone: Europe/Lisbon"))
    window = config.schedule("weekly").window(config.settings.timezone)
    assert isinstance(window, SendWindow) and window.tz == LISBON
    assert window.is_open(datetime(2026, 7, 6, 7, 30, tzinfo=UTC))  # 08:30 in Lisbon's summer
    assert load_config(write(tmp_path, "")).schedule("weekly").window("UTC") is None
