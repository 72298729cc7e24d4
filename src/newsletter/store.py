"""All state, behind one narrow interface: feeds, entries, issues and the delivery ledger.

Only this module speaks SQL. It is SQLite today (``sqlite:///path``); a PostgreSQL store for
several machines implements the same methods. Every delivery is committed the moment its
result is known, so a killed process loses at most the one message that was in flight.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import StoreError
from .feeds import FeedEntry, FeedState, FetchResult, clamp_ttl
from .files import create_private
from .subscribers import Subscriber

SCHEMA = """
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
# A new copy of a list is gathered here, in SQLite's temporary database: writing it takes no
# lock on the state database, however long reading and checking the file takes.
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS subscriber_staging (
    key TEXT PRIMARY KEY, email TEXT NOT NULL, raw TEXT NOT NULL, name TEXT NOT NULL,
    fields TEXT NOT NULL, line INTEGER NOT NULL
)
"""
# Columns added after the first release: (table, column, definition).
MIGRATIONS = [("feeds", "ttl", "INTEGER")]


def now() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds")


@dataclass
class StoredEntry:
    id: int
    feed_url: str
    title: str
    link: str
    summary_html: str
    author: str
    published: datetime
    image_url: str
    categories: list[str]
    first_seen: datetime


@dataclass
class Issue:
    id: int
    schedule: str
    number: int
    created_at: datetime
    status: str
    entry_ids: list[int]
    subject: str
    payload: dict[str, Any]


class Store:
    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        if not url.startswith("sqlite:///"):
            raise StoreError(
                f"unsupported database URL {url!r}",
                hint="only sqlite:///path is built in so far",
            )
        self.path = url[len("sqlite:///") :]
        try:
            # It holds every address and the unsubscribe secret: 0600 from its first byte on.
            if self.path != ":memory:" and not self.path.startswith("file:"):
                create_private(self.path)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the state database: {exc.strerror}") from None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so what is one
            # transaction is written down here and not left to the driver's guesses.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (not a power cut) and spares an
            # fsync per delivery.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            for table, column, definition in MIGRATIONS:
                columns = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from None
        self._depth = 0

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[None]:
        """One transaction (nested ones join the outer). ``write=False`` begins deferred: one
        snapshot to read and temporary tables to write, no lock held on the database."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self._execute("COMMIT")
        finally:
            self._depth = 0

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        """Run a whole pipeline and then forget it: what --dry-run and --to use."""
        self._execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        finally:
            self.db.execute("ROLLBACK")
            self._depth = 0

    def _execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, tuple(args))
        except sqlite3.OperationalError as exc:
            hint = "another newsletter process may hold it; try again" if "locked" in str(exc) else ""
            raise StoreError(f"{self.path}: {exc}", hint=hint) from None

    # -- meta -------------------------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A per-installation random secret, made on first use (used when none is in the env)."""
        with self.transaction():
            row = self._execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
            if row:
                return str(row["value"])
            value = secrets.token_urlsafe(32)
            self._execute("INSERT INTO meta (key, value) VALUES (?, ?)", (name, value))
            return value

    def meta(self, key: str) -> str | None:
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row["value"]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def last_run(self, schedule: str) -> datetime | None:
        value = self.meta(f"last_run:{schedule}")
        return datetime.fromisoformat(value) if value else None

    def set_last_run(self, schedule: str, when: datetime) -> None:
        self.set_meta(f"last_run:{schedule}", _iso(when))

    # -- webhook posts ---------------------------------------------------------------------------

    def queue_post(self, target: str, item_id: str, schedule: str, kind: str, ref: int) -> int:
        stamp = _iso(now())
        cur = self._execute(
            "INSERT INTO posts (target, item_id, schedule, kind, ref, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
            (target, item_id, schedule, kind, ref, stamp, stamp),
        )
        return cur.rowcount

    def pending_posts(self, target: str, schedule: str) -> list[tuple[str, str, int, int]]:
        """(item id, kind, ref, attempts) of posts still to make, oldest first."""
        rows = self._execute(
            "SELECT item_id, kind, ref, attempts FROM posts WHERE target = ? AND schedule = ?"
            " AND status = 'pending' ORDER BY rowid",
            (target, schedule),
        ).fetchall()
        return [(r["item_id"], r["kind"], r["ref"], r["attempts"]) for r in rows]

    def record_post(
        self, target: str, item_id: str, status: str, error: str = "", location: str = ""
    ) -> None:
        self._execute(
            "UPDATE posts SET status = ?, attempts = attempts + 1, last_error = ?, location = ?,"
            " updated_at = ? WHERE target = ? AND item_id = ?",
            (status, error, location, _iso(now()), target, item_id),
        )

    def post_counts(self, target: str, schedule: str) -> dict[str, int]:
        rows = self._execute(
            "SELECT status, COUNT(*) AS n FROM posts WHERE target = ? AND schedule = ? GROUP BY status",
            (target, schedule),
        ).fetchall()
        counts = {"sent": 0, "pending": 0, "failed": 0}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    def disable_target(self, name: str, reason: str, fingerprint: str) -> None:
        self._execute(
            "INSERT INTO targets (name, reason, fingerprint, disabled_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET reason = excluded.reason,"
            " fingerprint = excluded.fingerprint, disabled_at = excluded.disabled_at",
            (name, reason, fingerprint, _iso(now())),
        )

    def target_disabled(self, name: str, fingerprint: str) -> str | None:
        """Why the target is off, or None. A changed configuration switches it back on."""
        row = self._execute("SELECT reason, fingerprint FROM targets WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != fingerprint:
            self._execute("DELETE FROM targets WHERE name = ?", (name,))
            return None
        return str(row["reason"])

    def issue_by_id(self, issue_id: int) -> Issue | None:
        row = self._execute("SELECT * FROM issues WHERE id = ?", (issue_id,)).fetchone()
        return _issue(row) if row else None

    # -- suppressions: addresses that unsubscribed stay unsubscribed ----------------------------

    def suppress(self, list_name: str, address: str, source: str) -> bool:
        """Record an unsubscribe; False when the address was already suppressed."""
        cur = self._execute(
            "INSERT INTO suppressions (list_name, address, created_at, source) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (list_name, address.lower(), _iso(now()), source),
        )
        return cur.rowcount > 0

    # -- subscriber lists: subscribers/NAME.csv, checked once per change of the file ---------

    def subscriber_source(self, list_name: str) -> tuple[str, list[str]] | None:
        """(fingerprint of the file last read, the problems found in it), if it was read."""
        row = self._execute(
            "SELECT source, problems FROM subscriber_lists WHERE name = ?", (list_name,)
        ).fetchone()
        return (str(row["source"]), json.loads(row["problems"])) if row else None

    @contextmanager
    def replacing_subscribers(self, list_name: str, source: str, reuse: bool) -> Iterator[SubscriberWriter]:
        """Write a new copy of a list; it replaces the old one only when the block succeeds.

        The rows are staged first, holding no write lock, then moved in one short
        transaction. ``reuse``: an address checked for the previous copy is taken as it was.
        """
        self._execute(STAGING)
        self._execute("DELETE FROM temp.subscriber_staging")
        row = self._execute("SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,)).fetchone()
        writer = SubscriberWriter(self, list_name, int(row["generation"]) if row and reuse else None)
        try:
            with self.transaction(write=False):
                yield writer
            with self.transaction():
                row = self._execute(
                    "SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,)
                ).fetchone()
                new = (int(row["generation"]) if row else 0) + 1
                self._execute(
                    "DELETE FROM subscribers WHERE list_name = ? AND generation >= ?", (list_name, new)
                )
                self._execute(
                    "INSERT INTO subscribers (list_name, generation, key, email, raw, name, fields, line)"
                    " SELECT ?, ?, key, email, raw, name, fields, line FROM temp.subscriber_staging",
                    (list_name, new),
                )
                self._execute(
                    "INSERT INTO subscriber_lists (name, source, generation, problems, loaded_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET source = excluded.source,"
                    " generation = excluded.generation, problems = excluded.problems,"
                    " loaded_at = excluded.loaded_at",
                    (list_name, source, new, json.dumps(writer.problems), _iso(now())),
                )
                self._execute(
                    "DELETE FROM subscribers WHERE list_name = ? AND generation != ?", (list_name, new)
                )
        finally:
            self._execute("DELETE FROM temp.subscriber_staging")

    def subscriber_counts(self, list_name: str) -> tuple[int, int]:
        """(addresses in the list, of them not unsubscribed)."""
        row = self._execute(
            f"SELECT COUNT(*) AS total, SUM({_NOT_SUPPRESSED}) AS active FROM subscribers s WHERE {_CURRENT}",
            (list_name, list_name, list_name),
        ).fetchone()
        return int(row["total"]), int(row["active"] or 0)

    def subscriber(self, list_name: str, address: str) -> Subscriber | None:
        row = self._execute(
            f"SELECT * FROM subscribers s WHERE {_CURRENT} AND key = ?",
            (list_name, list_name, address.lower()),
        ).fetchone()
        return _subscriber(row) if row else None

    def subscribers(self, list_name: str, page: int = 500) -> Iterator[tuple[Subscriber, bool]]:
        """The list in file order, (subscriber, unsubscribed), read ``page`` rows at a time."""
        after = 0
        while rows := self._execute(
            f"SELECT *, NOT {_NOT_SUPPRESSED} AS suppressed FROM subscribers s WHERE {_CURRENT}"
            " AND line > ? ORDER BY line LIMIT ?",
            (list_name, list_name, list_name, after, page),
        ).fetchall():
            yield from ((_subscriber(r), bool(r["suppressed"])) for r in rows)
            after = rows[-1]["line"]

    def subscriber_fields(self, list_name: str) -> list[str]:
        """Every extra column any subscriber of the list has, sorted."""
        rows = self._execute(
            f"SELECT DISTINCT j.key FROM subscribers s, json_each(s.fields) j WHERE {_CURRENT}"
            " ORDER BY j.key",
            (list_name, list_name),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def suppressed(self, list_name: str) -> dict[str, tuple[datetime, str]]:
        rows = self._execute(
            "SELECT address, created_at, source FROM suppressions WHERE list_name = ? ORDER BY address",
            (list_name,),
        ).fetchall()
        return {r["address"]: (datetime.fromisoformat(r["created_at"]), r["source"]) for r in rows}

    # -- locks: one run of a schedule at a time, across processes ----------------------------

    def acquire_lock(self, name: str, owner: str, ttl: float) -> str | None:
        """Take the lock, or return who holds it. A holder that died (same host, pid gone)
        or stopped refreshing it (``ttl`` passed) no longer counts."""
        stamp = now()
        with self.transaction():
            row = self._execute("SELECT owner, expires_at FROM locks WHERE name = ?", (name,)).fetchone()
            if (
                row
                and row["owner"] != owner
                and datetime.fromisoformat(row["expires_at"]) > stamp
                and _alive(row["owner"])
            ):
                return str(row["owner"])
            self._execute(
                "INSERT INTO locks (name, owner, acquired_at, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                (name, owner, _iso(stamp), _iso(stamp + timedelta(seconds=ttl))),
            )
            return None

    def refresh_lock(self, name: str, owner: str, ttl: float) -> None:
        self._execute(
            "UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ?",
            (_iso(now() + timedelta(seconds=ttl)), name, owner),
        )

    def release_lock(self, name: str, owner: str) -> None:
        self._execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    # -- feeds and entries ------------------------------------------------------------------

    def feed_state(self, url: str) -> FeedState:
        row = self._execute("SELECT * FROM feeds WHERE url = ?", (url,)).fetchone()
        if not row:
            return FeedState(url)
        return FeedState(url, row["fetch_url"], row["etag"], row["last_modified"])

    def record_fetch(self, result: FetchResult, *, first_newest: int, first_days: float | None) -> int:
        """Store a fetch's outcome and its new entries; return how many entries are new."""
        stamp = _iso(now())
        with self.transaction():
            known = self._execute("SELECT last_ok FROM feeds WHERE url = ?", (result.url,)).fetchone()
            self._execute(
                "INSERT INTO feeds (url, last_checked) VALUES (?, ?) ON CONFLICT (url) DO NOTHING",
                (result.url, stamp),
            )
            if result.status == "error":
                self._execute(
                    "UPDATE feeds SET last_checked = ?, last_status = 'error', last_error = ?,"
                    " consecutive_errors = consecutive_errors + 1, error_count = error_count + 1"
                    " WHERE url = ?",
                    (stamp, result.error, result.url),
                )
                return 0
            self._execute(
                "UPDATE feeds SET last_checked = ?, last_ok = ?, last_status = ?, last_error = ?,"
                " consecutive_errors = 0, fetch_url = ?, etag = ?, last_modified = ?,"
                " title = COALESCE(NULLIF(?, ''), title), link = COALESCE(NULLIF(?, ''), link),"
                " ttl = COALESCE(?, ttl) WHERE url = ?",
                (
                    stamp,
                    stamp,
                    result.status,
                    result.warning,
                    result.fetch_url,
                    result.etag,
                    result.last_modified,
                    result.title,
                    result.link,
                    clamp_ttl(result.ttl),
                    result.url,
                ),
            )
            first_fetch = not (known and known["last_ok"])
            backlog = _backlog(result.entries, first_newest, first_days) if first_fetch else set()
            new = 0
            for i, e in enumerate(result.entries):
                cur = self._execute(
                    "INSERT INTO entries (feed_url, key, title, link, summary_html, author, published,"
                    " first_seen, image_url, categories, backlog)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (feed_url, key) DO NOTHING",
                    (
                        result.url,
                        e.key,
                        e.title,
                        e.link,
                        e.summary_html,
                        e.author,
                        _iso(e.published) if e.published else stamp,
                        stamp,
                        e.image_url,
                        json.dumps(e.categories),
                        1 if i in backlog else 0,
                    ),
                )
                new += cur.rowcount if i not in backlog else 0
            return new

    def feeds(self, urls: Iterable[str] | None = None) -> list[dict[str, Any]]:
        rows = self._execute("SELECT * FROM feeds ORDER BY url").fetchall()
        wanted = set(urls) if urls is not None else None
        # A ttl stored before it was clamped (10**15 minutes, say) must not break every poll.
        return [
            {**r, "ttl": clamp_ttl(r["ttl"])} for r in map(dict, rows) if wanted is None or r["url"] in wanted
        ]

    def new_entries(
        self, feed_urls: list[str], after_id: int, up_to_id: int, limit: int
    ) -> list[StoredEntry]:
        """Entries with after_id < id <= up_to_id that are not history, newest first.

        Entries of one date (undated ones are dated when first seen, so all of a fetch share
        one) keep the feed's document order, which lists the newest first: id ascending."""
        marks = ",".join("?" * len(feed_urls))
        rows = self._execute(
            f"SELECT * FROM entries WHERE feed_url IN ({marks}) AND id > ? AND id <= ?"
            " AND backlog = 0 ORDER BY published DESC, id ASC LIMIT ?",
            (*feed_urls, after_id, up_to_id, limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def entries(self, ids: list[int]) -> list[StoredEntry]:
        marks = ",".join("?" * len(ids))
        rows = self._execute(f"SELECT * FROM entries WHERE id IN ({marks})", ids).fetchall()
        by_id = {r["id"]: _entry(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def max_entry_id(self) -> int:
        return int(self._execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0])

    # -- issues and the ledger ----------------------------------------------------------------

    def watermark(self, schedule: str) -> int:
        row = self._execute(
            "SELECT COALESCE(MAX(entry_watermark), 0) FROM issues WHERE schedule = ?", (schedule,)
        ).fetchone()
        return int(row[0])

    def create_issue(
        self,
        schedule: str,
        *,
        watermark: int,
        entry_ids: list[int],
        subject: str,
        payload: dict[str, Any],
        list_name: str | None,
    ) -> Issue:
        """Record an issue and, all or nothing, one pending delivery per subscriber of
        ``list_name`` who has not unsubscribed (none for a test send: ``list_name=None``)."""
        stamp = now()
        with self.transaction():
            number = 1 + int(
                self._execute(
                    "SELECT COALESCE(MAX(number), 0) FROM issues WHERE schedule = ?", (schedule,)
                ).fetchone()[0]
            )
            cur = self._execute(
                "INSERT INTO issues (schedule, number, created_at, status, entry_watermark,"
                " entry_ids, subject, payload) VALUES (?, ?, ?, 'sending', ?, ?, ?, ?)",
                (
                    schedule,
                    number,
                    _iso(stamp),
                    watermark,
                    json.dumps(entry_ids),
                    subject,
                    json.dumps(payload),
                ),
            )
            issue_id = int(cur.lastrowid or 0)
            if list_name is not None:
                # In SQL, not Python: the ledger of 100,000 rows never passes through memory.
                self._execute(
                    "INSERT INTO deliveries (issue_id, recipient, status, updated_at)"
                    " SELECT ?, s.key, 'pending', ? FROM subscribers s"
                    f" WHERE {_ACTIVE} ON CONFLICT DO NOTHING",
                    (issue_id, _iso(stamp), list_name, list_name, list_name),
                )
        return Issue(issue_id, schedule, number, stamp, "sending", entry_ids, subject, payload)

    def unfinished_issues(self, schedule: str) -> list[Issue]:
        rows = self._execute(
            "SELECT * FROM issues WHERE schedule = ? AND status = 'sending' ORDER BY number",
            (schedule,),
        ).fetchall()
        return [_issue(r) for r in rows]

    def issues(self, schedule: str, limit: int = 5) -> list[Issue]:
        rows = self._execute(
            "SELECT * FROM issues WHERE schedule = ? ORDER BY number DESC LIMIT ?", (schedule, limit)
        ).fetchall()
        return [_issue(r) for r in rows]

    def pending(self, issue_id: int, list_name: str, after: str = "", limit: int = 500) -> list[Pending]:
        """The next ``limit`` deliveries still to be made, in recipient order after ``after``.

        A page at a time, so memory does not grow with the list. Each comes with the
        subscriber as the list has them now: None when they left the file since the issue
        was built."""
        rows = self._execute(
            "SELECT d.recipient, d.attempts, s.email, s.name, s.fields,"
            " EXISTS (SELECT 1 FROM suppressions WHERE list_name = ? AND address = d.recipient)"
            " AS suppressed FROM deliveries d LEFT JOIN subscribers s ON s.list_name = ?"
            " AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = ?)"
            " AND s.key = d.recipient"
            " WHERE d.issue_id = ? AND d.status = 'pending' AND d.recipient > ?"
            " ORDER BY d.recipient LIMIT ?",
            (list_name, list_name, list_name, issue_id, after, limit),
        ).fetchall()
        return [
            Pending(
                r["recipient"],
                r["attempts"],
                _subscriber(r) if r["email"] is not None else None,
                bool(r["suppressed"]),
            )
            for r in rows
        ]

    def record_delivery(self, issue_id: int, recipient: str, status: str, error: str = "") -> None:
        # One autocommitted statement per delivery: the ledger is never behind the wire by
        # more than the message in flight.
        self._execute(
            "UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?,"
            " updated_at = ? WHERE issue_id = ? AND recipient = ?",
            (status, error, _iso(now()), issue_id, recipient),
        )

    def skip_delivery(self, issue_id: int, recipient: str, reason: str) -> None:
        self._execute(
            "UPDATE deliveries SET status = 'skipped', last_error = ?, updated_at = ?"
            " WHERE issue_id = ? AND recipient = ?",
            (reason, _iso(now()), issue_id, recipient),
        )

    def finish_issue_if_done(self, issue_id: int) -> bool:
        cur = self._execute(
            "UPDATE issues SET status = 'complete' WHERE id = ? AND NOT EXISTS"
            " (SELECT 1 FROM deliveries WHERE issue_id = ? AND status = 'pending')",
            (issue_id, issue_id),
        )
        return cur.rowcount > 0

    def delivery_counts(self, issue_id: int) -> dict[str, int]:
        rows = self._execute(
            "SELECT status, COUNT(*) AS n FROM deliveries WHERE issue_id = ? GROUP BY status",
            (issue_id,),
        ).fetchall()
        counts = {"sent": 0, "pending": 0, "failed": 0, "skipped": 0}
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    def failures(self, issue_id: int) -> list[tuple[str, str, str]]:
        rows = self._execute(
            "SELECT recipient, status, last_error FROM deliveries WHERE issue_id = ?"
            " AND last_error != '' AND status IN ('pending', 'failed') ORDER BY recipient",
            (issue_id,),
        ).fetchall()
        return [(r["recipient"], r["status"], r["last_error"]) for r in rows]


def lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: only the expiry time can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# SQL fragments over ``subscribers s``; parameters: the list name for each ``?``.
_CURRENT = "s.list_name = ? AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = ?)"
_NOT_SUPPRESSED = "NOT EXISTS (SELECT 1 FROM suppressions u WHERE u.list_name = ? AND u.address = s.key)"
_ACTIVE = f"{_CURRENT} AND {_NOT_SUPPRESSED}"


@dataclass
class Pending:
    recipient: str
    attempts: int
    subscriber: Subscriber | None  # None: no longer in the list
    suppressed: bool


class SubscriberWriter:
    """Adds the rows of one new copy of a list, inside ``Store.replacing_subscribers``."""

    def __init__(self, store: Store, list_name: str, previous: int | None) -> None:
        self.store, self.list_name, self.previous = store, list_name, previous
        self.problems: list[str] = []

    def known(self, raw: str) -> str | None:
        """The checked address ``raw`` became in the previous copy, so it is not checked twice."""
        if self.previous is None:
            return None
        row = self.store._execute(
            "SELECT email FROM subscribers WHERE list_name = ? AND generation = ? AND raw = ?",
            (self.list_name, self.previous, raw),
        ).fetchone()
        return str(row["email"]) if row else None

    def add(self, sub: Subscriber, raw: str, line: int) -> int | None:
        """Add a subscriber; if the address is already in this copy, the line it is on."""
        cur = self.store._execute(
            "INSERT INTO temp.subscriber_staging (key, email, raw, name, fields, line)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (sub.key, sub.email, raw, sub.name, json.dumps(sub.fields), line),
        )
        if cur.rowcount:
            return None
        row = self.store._execute(
            "SELECT line FROM temp.subscriber_staging WHERE key = ?", (sub.key,)
        ).fetchone()
        return int(row["line"])


def _subscriber(row: sqlite3.Row) -> Subscriber:
    return Subscriber(row["email"], row["name"], json.loads(row["fields"]))


def _backlog(entries: list[FeedEntry], newest: int, days: float | None) -> set[int]:
    """Indexes of entries that are history on a feed's first fetch."""
    if days is not None:
        cutoff = now().timestamp() - days * 86400
        return {i for i, e in enumerate(entries) if e.published and e.published.timestamp() < cutoff}
    # Dated entries newest first, then the undated ones: a date is the better evidence of
    # being recent. Ties, and the undated among themselves, keep document order (feeds list
    # the newest first).
    dated = sorted((-e.published.timestamp(), i) for i, e in enumerate(entries) if e.published)
    undated = [i for i, e in enumerate(entries) if e.published is None]
    return set(([i for _, i in dated] + undated)[newest:])


def _entry(row: sqlite3.Row) -> StoredEntry:
    return StoredEntry(
        id=row["id"],
        feed_url=row["feed_url"],
        title=row["title"],
        link=row["link"],
        summary_html=row["summary_html"],
        author=row["author"],
        published=datetime.fromisoformat(row["published"]),
        image_url=row["image_url"],
        categories=json.loads(row["categories"]),
        first_seen=datetime.fromisoformat(row["first_seen"]),
    )


def _issue(row: sqlite3.Row) -> Issue:
    return Issue(
        id=row["id"],
        schedule=row["schedule"],
        number=row["number"],
        created_at=datetime.fromisoformat(row["created_at"]),
        status=row["status"],
        entry_ids=json.loads(row["entry_ids"]),
        subject=row["subject"],
        payload=json.loads(row["payload"]),
    )
