"""A sender's hourly counts in the store: what its daily quota reads back after a restart."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from newsletter.model import DeliveryStatus
from newsletter.quota import DAY, Pacer, QuotaReached, Rates
from newsletter.store import Store
from newsletter.store.migrate import load, statements

T0 = datetime(2026, 12, 1, 13, 20, tzinfo=UTC)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(state_url: str) -> Iterator[Store]:
    """A new store on each backend in turn (``state_url``: tests/pg.py)."""
    with Store(state_url, busy_timeout=1) as opened:
        yield opened


def test_counts_go_into_utc_hour_buckets_oldest_first(store: Store) -> None:
    store.count_sent("ses", T0)
    store.count_sent("ses", T0 + timedelta(minutes=30), 4)  # 13:50
    store.count_sent("ses", T0 + timedelta(minutes=45))  # 14:05
    store.count_sent("ses", T0 - timedelta(days=200))  # long ago
    store.count_sent("other", T0, 7)
    assert store.sent_since("ses", T0 - timedelta(minutes=15)) == [
        (datetime(2026, 12, 1, 13, tzinfo=UTC), 5),
        (datetime(2026, 12, 1, 14, tzinfo=UTC), 1),
    ]
    assert store.sent_since("other", T0) == [(datetime(2026, 12, 1, 13, tzinfo=UTC), 7)]
    assert store.sent_since("nobody", T0) == []


def test_a_time_in_another_timezone_lands_in_its_utc_hour(store: Store) -> None:
    store.count_sent("ses", datetime(2026, 12, 1, 15, 5, tzinfo=ZoneInfo("Europe/Berlin")))  # 14:05 UTC
    assert store.sent_since("ses", T0) == [(datetime(2026, 12, 1, 14, tzinfo=UTC), 1)]


def test_a_time_without_timezone_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone"):
        store.count_sent("ses", datetime(2026, 12, 1, 13))


def test_a_count_commits_and_rolls_back_with_its_transaction(store: Store) -> None:
    issue = store.create_issue("weekly", watermark=0, entry_ids=[], subject="s", payload={}, list_name=None)
    with pytest.raises(RuntimeError), store.transaction():
        store.count_sent("ses", T0)
        raise RuntimeError("the ledger write failed")
    assert store.sent_since("ses", T0) == []
    with store.transaction():
        store.count_sent("ses", T0)
        store.record_delivery(issue.id, "ann@example.com", DeliveryStatus.SENT)
    assert store.sent_since("ses", T0) == [(datetime(2026, 12, 1, 13, tzinfo=UTC), 1)]


def test_counts_survive_reopening_the_database_and_old_hours_can_be_dropped(state_url: str) -> None:
    with Store(state_url) as store:
        for hours in range(30):
            store.count_sent("ses", T0 - timedelta(hours=hours), 10)
    with Store(state_url) as store:
        day = store.sent_since("ses", T0 - DAY)
        assert len(day) == 25 and sum(n for _, n in day) == 250  # 13:00 yesterday to 13:00 today
        assert store.forget_usage(T0 - DAY) == 5
        assert store.sent_since("ses", T0 - timedelta(days=3)) == day


def test_a_pacer_made_from_the_store_stops_at_the_daily_quota_after_a_restart(state_url: str) -> None:
    with Store(state_url) as store:
        store.count_sent("ses", T0 - timedelta(hours=3), 8)
    with Store(state_url) as store:
        pacer = Pacer(Rates(per_day=10), history=store.sent_since("ses", T0 - DAY), wall=lambda: T0)
        for _ in range(2):
            assert pacer.acquire()
            pacer.sent()
        with pytest.raises(QuotaReached) as caught:
            pacer.acquire()
        # The 8 sent in the 10:00 hour leave the rolling day at 11:00 tomorrow.
        assert caught.value.until == datetime(2026, 12, 2, 11, tzinfo=UTC)


def test_a_process_counts_while_another_holds_its_count_uncommitted(pg_database: str) -> None:
    # Every commit of a send counts its messages. A process frozen between its count and its
    # commit (SIGSTOP, a paused VM) must not hold up the others' commits: their leases run
    # out while they wait, and what they had on the wire goes twice.
    other = (
        "import sys; from datetime import datetime, UTC; from newsletter.store import Store\n"
        "with Store(sys.argv[1], busy_timeout=1) as store:\n"
        "    with store.transaction(serial=False):\n"
        "        store.count_sent('ses', datetime(2026, 12, 1, 13, 30, tzinfo=UTC), 5)\n"
    )
    with Store(pg_database) as store:
        with store.transaction(serial=False):
            store.count_sent("ses", T0, 2)
            done = subprocess.run(
                [sys.executable, "-c", other, pg_database], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
        assert store.sent_since("ses", T0) == [(datetime(2026, 12, 1, 13, tzinfo=UTC), 7)]


def sqlite_at(path: Path, version: int, *then: str) -> None:
    """A SQLite state file as a version with migrations up to ``version`` left it, then the
    statements ``then``."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    for m in load("sqlite")[:version]:
        for statement in statements(m.sql):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, '2026-01-01')", (m.number, m.name))
    for statement in then:
        db.execute(statement)
    db.close()


def test_counts_made_before_migration_5_still_count(path: Path) -> None:
    sqlite_at(path, 4, "INSERT INTO sender_usage (sender, hour, sent) VALUES ('ses', '2026-12-01T13', 40)")

    with Store(f"sqlite:///{path}") as store:
        store.count_sent("ses", T0, 2)
        assert store.sent_since("ses", T0) == [(datetime(2026, 12, 1, 13, tzinfo=UTC), 42)]


def test_migration_3_applies_on_a_sqlite_database_at_migration_2(path: Path) -> None:
    sqlite_at(path, 2, "INSERT INTO meta VALUES ('unsubscribe', 'kept')")

    with Store(f"sqlite:///{path}") as store:
        assert store.secret("unsubscribe") == "kept"
        store.count_sent("ses", T0, 3)
        assert store.sent_since("ses", T0) == [(datetime(2026, 12, 1, 13, tzinfo=UTC), 3)]
    with sqlite3.connect(path) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions[:3] == [1, 2, 3]
