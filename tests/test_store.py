"""The store behind its interface: numbered migrations, an older database opened as it was,
and the policy the pipeline now hands in (history, dead lock holders, targets back on)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from newsletter import locks
from newsletter.errors import StoreError
from newsletter.feeds import first_fetch_history
from newsletter.model import (
    DeliveryCounts,
    DeliveryStatus,
    FeedEntry,
    FetchResult,
    FetchStatus,
    IssueStatus,
    ListSource,
    PendingPost,
    PostCounts,
    PostKind,
    PostStatus,
    Subscriber,
    SubscriberCounts,
    SubscriberRow,
)
from newsletter.storage import Storage, SubscriberStaging
from newsletter.store import Store
from newsletter.store.migrate import load, statements

# The schema as the version before numbered migrations wrote it, verbatim: on every open it ran
# this, then added feeds.ttl when it was missing.
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feeds (
    url TEXT PRIMARY KEY,
    fetch_url TEXT, etag TEXT, last_modified TEXT, title TEXT, link TEXT,
    last_checked TEXT, last_ok TEXT, last_status TEXT, last_error TEXT,
    consecutive_errors INTEGER NOT NULL DEFAULT 0, error_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feed_url TEXT NOT NULL, key TEXT NOT NULL,
    title TEXT NOT NULL, link TEXT NOT NULL, summary_html TEXT NOT NULL, author TEXT NOT NULL,
    published TEXT NOT NULL, first_seen TEXT NOT NULL, image_url TEXT NOT NULL,
    categories TEXT NOT NULL,
    backlog INTEGER NOT NULL DEFAULT 0,  -- history seen on a feed's first fetch; never mailed
    UNIQUE (feed_url, key)
);
CREATE TABLE IF NOT EXISTS issues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule TEXT NOT NULL, number INTEGER NOT NULL, created_at TEXT NOT NULL,
    status TEXT NOT NULL,             -- sending | complete
    entry_watermark INTEGER NOT NULL, -- entries up to this id were considered for this issue
    entry_ids TEXT NOT NULL, subject TEXT NOT NULL,
    payload TEXT NOT NULL,            -- the rendered issue, so a resumed send is identical
    UNIQUE (schedule, number)
);
CREATE TABLE IF NOT EXISTS deliveries (
    issue_id INTEGER NOT NULL REFERENCES issues(id),
    recipient TEXT NOT NULL,          -- lower-cased address
    status TEXT NOT NULL,             -- pending | sent | failed | skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (issue_id, recipient)
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (issue_id, status);
CREATE TABLE IF NOT EXISTS suppressions (
    list_name TEXT NOT NULL, address TEXT NOT NULL,  -- lower-cased
    created_at TEXT NOT NULL, source TEXT NOT NULL,   -- e.g. one-click, page, cli
    PRIMARY KEY (list_name, address)
);
CREATE TABLE IF NOT EXISTS posts (       -- the ledger of webhook posts, as deliveries is of email
    target TEXT NOT NULL, item_id TEXT NOT NULL, schedule TEXT NOT NULL,
    kind TEXT NOT NULL, ref INTEGER NOT NULL,  -- article: entries.id; issue: issues.id
    status TEXT NOT NULL,                      -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
    location TEXT NOT NULL DEFAULT '',         -- where the target says it landed
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (target, item_id)
);
CREATE TABLE IF NOT EXISTS targets (     -- webhook targets switched off (410 Gone, bad credentials)
    name TEXT PRIMARY KEY, reason TEXT NOT NULL, fingerprint TEXT NOT NULL, disabled_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriber_lists (  -- the checked copy of subscribers/NAME.csv
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,             -- fingerprint of the file it was read from
    generation INTEGER NOT NULL, problems TEXT NOT NULL, loaded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS subscribers (
    list_name TEXT NOT NULL, generation INTEGER NOT NULL,
    key TEXT NOT NULL,                -- lower-cased address, as in deliveries.recipient
    email TEXT NOT NULL, raw TEXT NOT NULL, name TEXT NOT NULL, fields TEXT NOT NULL,
    line INTEGER NOT NULL,
    PRIMARY KEY (list_name, generation, key)
);
CREATE INDEX IF NOT EXISTS subscribers_raw ON subscribers (list_name, generation, raw);
CREATE INDEX IF NOT EXISTS subscribers_line ON subscribers (list_name, generation, line);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, acquired_at TEXT NOT NULL, expires_at TEXT NOT NULL
);
"""
LEGACY_TTL = "ALTER TABLE feeds ADD COLUMN ttl INTEGER"


@pytest.fixture
def store(state_url: str) -> Iterator[Store]:
    """A new store on each backend in turn (``state_url``: tests/pg.py)."""
    with Store(state_url, busy_timeout=1) as opened:
        yield opened


def raw_rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    """What the database itself holds, past the store's conversions, on either backend."""
    found = store.execute(sql).fetchall()
    return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in found]


def applied(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def entry(n: int, day: int | None = None) -> FeedEntry:
    published = datetime(2026, 1, day, tzinfo=UTC) if day else None
    return FeedEntry(f"id:{n}", f"Post {n}", f"https://blog.test/{n}", f"<p>{n}</p>", published=published)


def add_list(store: Store, name: str, emails: list[str]) -> None:
    def read(staging: SubscriberStaging) -> list[str]:
        for line, email in enumerate(emails, start=2):
            assert staging.add(SubscriberRow(Subscriber(email), email, line)) is None
        return []

    store.replace_subscribers(name, "test:1", False, read)


# -- migrations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_both_backends_have_the_same_migrations_by_number_and_name(backend: str) -> None:
    assert [(m.number, m.name) for m in load(backend)] == [(m.number, m.name) for m in load("sqlite")]
    first = load(backend)[0].sql
    assert first.count("CREATE TABLE") == LEGACY_SCHEMA.count("CREATE TABLE")


def test_sqlite_migrations_are_numbered_without_a_gap_and_split_into_statements() -> None:
    migrations = load("sqlite")
    assert [m.number for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    first = list(statements(migrations[0].sql))
    assert all(sqlite3.complete_statement(s + ";") for s in first)
    assert sum(s.startswith("CREATE TABLE") for s in first) == LEGACY_SCHEMA.count("CREATE TABLE")


def test_a_new_sqlite_database_gets_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(f"sqlite:///{path}").close()
    everything = [m.number for m in load("sqlite")]
    assert applied(path) == everything
    assert "ttl" in columns(path, "feeds")
    Store(f"sqlite:///{path}").close()  # opening again applies nothing twice
    assert applied(path) == everything


@pytest.mark.parametrize("with_ttl", [True, False], ids=["previous-version", "before-ttl"])
def test_a_sqlite_database_made_before_numbered_migrations_opens_and_works(
    tmp_path: Path, with_ttl: bool
) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(LEGACY_SCHEMA)
    if with_ttl:
        db.execute(LEGACY_TTL)
    # Some state of every kind the old version kept.
    db.executescript(
        """
        INSERT INTO meta VALUES ('unsubscribe', 'old-secret');
        INSERT INTO feeds (url, title, last_ok, last_status)
            VALUES ('https://a.test/f', 'A', '2026-01-01', 'ok');
        INSERT INTO entries (feed_url, key, title, link, summary_html, author, published, first_seen,
            image_url, categories) VALUES ('https://a.test/f', 'id:1', 'Old post', 'https://a.test/1',
            '<p>x</p>', '', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', '', '[]');
        INSERT INTO issues (schedule, number, created_at, status, entry_watermark, entry_ids, subject,
            payload) VALUES ('weekly', 1, '2026-01-02T00:00:00+00:00', 'sending', 1, '[1]', 'Issue 1', '{}');
        INSERT INTO subscriber_lists VALUES ('readers', '1:abc', 1, '[]', '2026-01-01T00:00:00+00:00');
        INSERT INTO subscribers VALUES ('readers', 1, 'ann@example.com', 'ann@example.com',
            'ann@example.com', 'Ann', '{}', 2);
        INSERT INTO deliveries (issue_id, recipient, status, updated_at)
            VALUES (1, 'ann@example.com', 'pending', '2026-01-02T00:00:00+00:00');
        """
    )
    if with_ttl:
        db.execute("UPDATE feeds SET ttl = 90")
    db.commit()
    db.close()

    with Store(f"sqlite:///{path}") as store:
        assert applied(path) == [m.number for m in load("sqlite")]
        assert store.secret("unsubscribe") == "old-secret"
        [feed] = store.feeds()
        assert (feed.title, feed.last_status, feed.ttl) == ("A", FetchStatus.OK, 90 if with_ttl else None)
        [issue] = store.unfinished_issues("weekly")
        assert (issue.number, issue.status, issue.subject) == (1, IssueStatus.SENDING, "Issue 1")
        [pending] = store.pending(issue.id, "readers")
        assert pending.subscriber == Subscriber("ann@example.com", "Ann")
        assert store.subscriber_source("readers") == ListSource("1:abc", [])
        # and it is written to as before
        store.record_delivery(issue.id, "ann@example.com", DeliveryStatus.SENT)
        assert store.finish_issue_if_done(issue.id)
        assert store.delivery_counts(issue.id) == DeliveryCounts(sent=1)
        result = FetchResult("https://a.test/f", FetchStatus.OK, [entry(1), entry(2)], ttl=30)
        assert store.record_fetch(result, history={0, 1}) == 1  # not a first fetch: nothing is history
        assert store.feeds()[0].ttl == 30


def test_a_sqlite_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future', '2030-01-01')")
    with pytest.raises(StoreError, match="schema 999") as caught:
        Store(f"sqlite:///{path}")
    assert "upgrade" in caught.value.hint


# -- the interface -------------------------------------------------------------------------------


def test_each_store_is_a_storage(store: Store) -> None:
    wanted = {n for n in dir(Storage) if not n.startswith("_")}
    assert wanted <= {n for n in dir(store) if callable(getattr(store, n))}


def test_statuses_are_stored_as_their_plain_values(store: Store) -> None:
    add_list(store, "readers", ["ann@example.com", "bob@example.com"])
    issue = store.create_issue(
        "weekly", watermark=0, entry_ids=[], subject="S", payload={}, list_name="readers"
    )
    store.record_delivery(issue.id, "ann@example.com", DeliveryStatus.FAILED, "550 no")
    store.skip_delivery(issue.id, "bob@example.com", "unsubscribed")
    rows = dict(raw_rows(store, "SELECT recipient, status FROM deliveries"))
    assert rows == {"ann@example.com": "failed", "bob@example.com": "skipped"}
    assert all(type(v) is str for v in rows.values())
    assert store.delivery_counts(issue.id) == DeliveryCounts(failed=1, skipped=1)
    assert store.finish_issue_if_done(issue.id)
    assert store.issue_by_id(issue.id).status == IssueStatus.COMPLETE == "complete"  # type: ignore[union-attr]
    assert store.subscriber_counts("readers") == SubscriberCounts(total=2, active=2)


def test_posts_come_back_as_model_rows(store: Store) -> None:
    assert store.queue_post("hook", "nl_a", "weekly", PostKind.ARTICLE, 7) == 1
    assert store.queue_post("hook", "nl_a", "weekly", PostKind.ARTICLE, 7) == 0
    store.queue_post("hook", "nl_i", "weekly", PostKind.ISSUE, 1)
    assert store.pending_posts("hook", "weekly") == [
        PendingPost("nl_a", PostKind.ARTICLE, 7, 0),
        PendingPost("nl_i", PostKind.ISSUE, 1, 0),
    ]
    store.record_post("hook", "nl_a", PostStatus.SENT, location="https://x.test/1")
    assert store.post_counts("hook", "weekly") == PostCounts(sent=1, pending=1)


def test_reading_a_disabled_target_changes_nothing(store: Store) -> None:
    store.disable_target("hook", "410 Gone", "fp1")
    for _ in range(2):  # reading it twice finds it twice, whatever the fingerprint
        found = store.disabled_target("hook")
        assert found is not None and (found.reason, found.fingerprint) == ("410 Gone", "fp1")
    store.enable_target("hook")
    assert store.disabled_target("hook") is None


def test_history_is_the_callers_choice_and_only_on_a_first_fetch(store: Store) -> None:
    url = "https://a.test/f"
    entries = [entry(1, 3), entry(2, 2), entry(3, 1)]
    history = first_fetch_history(entries, newest=1, days=None)
    assert history == {1, 2}
    assert store.record_fetch(FetchResult(url, FetchStatus.OK, entries), history) == 1
    assert [e.title for e in store.new_entries([url], 0, store.max_entry_id(), 10)] == ["Post 1"]
    later = [entry(4, 4), *entries]
    assert store.record_fetch(FetchResult(url, FetchStatus.OK, later), {0}) == 1  # no longer first
    assert [e.title for e in store.new_entries([url], 0, store.max_entry_id(), 10)] == ["Post 4", "Post 1"]


def test_first_fetch_history_by_age() -> None:
    old, new = datetime.now(UTC) - timedelta(days=30), datetime.now(UTC) - timedelta(hours=1)
    entries = [
        FeedEntry("a", "a", "", "", published=new),
        FeedEntry("b", "b", "", "", published=old),
        FeedEntry("c", "c", "", ""),  # undated: not known to be old
    ]
    assert first_fetch_history(entries, newest=0, days=7) == {1}


# -- locks: who is alive is decided outside the store -------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_of_a_dead_process_is_taken_over_and_a_live_one_waited_for(store: Store) -> None:
    dead = f"{locks.HOST}:{dead_pid()}:0000"
    assert store.acquire_lock("schedule:w", dead, 60) is None
    # The store alone does not look at pids: only the caller's word takes a live lock over.
    assert store.acquire_lock("schedule:w", "me", 60) == dead
    assert not locks.alive(dead)
    assert locks.acquire(store, "schedule:w", "me", 60) is None
    # A holder that is alive (this very process) keeps it; so does one on another machine.
    assert locks.acquire(store, "schedule:w", locks.lock_owner(), 60) == "me"
    store.release_lock("schedule:w", "me")
    elsewhere = "other-host.invalid:1:0000"
    assert store.acquire_lock("schedule:x", elsewhere, 60) is None
    assert locks.alive(elsewhere)
    assert locks.acquire(store, "schedule:x", "me", 60) == elsewhere
    # Taking over names the holder found dead: if someone else got there first, it stays theirs.
    assert store.acquire_lock("schedule:x", "me", 60, dead="not-the-holder") == elsewhere
    # Same hostname, another boot or PID namespace (a twin VM, a container): not looked up here.
    twin = f"{locks.shown_host(locks.HOST)}#00000000.1:{dead_pid()}:0000"
    assert locks.alive(twin) or "#" not in locks.HOST


def test_an_expired_lock_is_free(store: Store) -> None:
    assert store.acquire_lock("schedule:w", "other-host.invalid:1:0000", -1) is None
    assert store.acquire_lock("schedule:w", "me", 60) is None


def test_a_nul_in_a_feeds_text_is_stored_on_either_backend(store: Store) -> None:
    # PostgreSQL text refuses NUL, SQLite keeps it: one hostile id must not stop every fetch.
    url = "https://a.test/nul"
    hostile = FeedEntry("id:a\x00b", "Post\x00 1", "https://blog.test/1", "<p>1</p>")
    assert store.record_fetch(FetchResult(url, FetchStatus.OK, [hostile, entry(2)])) == 2
    titles = [e.title.replace("\x00", "") for e in store.new_entries([url], 0, store.max_entry_id(), 10)]
    assert sorted(titles) == ["Post 1", "Post 2"]
    # Seen again, it is the same entry, not a new one.
    assert store.record_fetch(FetchResult(url, FetchStatus.OK, [hostile])) == 0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://news:S3CRET@127.0.0.1/db",  # another driver's spelling
        "host=127.0.0.1 user=news password=S3CRET dbname=db",  # libpq's key=value form
        "postgresql://news:S3CRET@[::1/db",  # a URL libpq cannot read, whose message quotes it
        "mysql://news:S3CRET@127.0.0.1/db",
    ],
)
def test_a_database_url_the_store_cannot_use_never_shows_its_password(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store(url, busy_timeout=1)
    said = f"{caught.value} {caught.value.hint}"
    assert "S3CRET" not in said and said.strip()


def test_an_sqlite_too_old_for_the_grouped_writes_is_named_and_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python linked against an SQLite before 3.35 (no UPDATE ... RETURNING): not on this
    # machine, so the version it reports is what stands in for it.
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    path = tmp_path / "state.db"
    with pytest.raises(StoreError, match=r"SQLite 3\.31\.1 is too old \(3\.35 or newer") as caught:
        Store(f"sqlite:///{path}")
    assert "newer SQLite" in (caught.value.hint or "")
    assert not path.exists()
