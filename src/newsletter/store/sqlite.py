"""The SQLite store: ``storage.Storage`` over one connection, SQL and model types only.

Only the store speaks SQL. It decides nothing: the callers say which entries are history,
which lock holder is gone and when a target comes back on; here they are written down.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from ..model import (
    DeliveryStatus,
    FeedRow,
    FeedState,
    FetchResult,
    FetchStatus,
    Issue,
    IssueStatus,
    ListedSubscriber,
    ListSource,
    PendingPost,
    PostKind,
    PostStatus,
    StoredEntry,
    Subscriber,
    SubscriberCounts,
    clamp_ttl,
    now,
)
from ..storage import ListReader
from .claims import SharedClaims
from .common import SharedSql, Staging
from .database import Database
from .rows import entry_row, feed_row, iso, subscriber_row
from .usage import SenderUsage

# A new copy of a list is gathered here, in SQLite's temporary database: writing it takes no
# lock on the state database, however long reading and checking the file takes.
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS subscriber_staging (
    key TEXT PRIMARY KEY, email TEXT NOT NULL, raw TEXT NOT NULL, name TEXT NOT NULL,
    fields TEXT NOT NULL, line INTEGER NOT NULL
)
"""

# SQL fragments over ``subscribers s``; parameters: the list name for each ``?``.
_CURRENT = "s.list_name = ? AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = ?)"
_NOT_SUPPRESSED = "NOT EXISTS (SELECT 1 FROM suppressions u WHERE u.list_name = ? AND u.address = s.key)"
_ACTIVE = f"{_CURRENT} AND {_NOT_SUPPRESSED}"


class SQLiteStore(Database, SenderUsage, SharedClaims, SharedSql):
    # One machine, and SQLite's writers take turns: no row locks to skip.
    DB_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    SKIP_LOCKED = ""

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------------

    # -- feeds and entries ------------------------------------------------------------------

    def feed_state(self, url: str) -> FeedState:
        row = self.execute("SELECT * FROM feeds WHERE url = ?", (url,)).fetchone()
        if not row:
            return FeedState(url)
        return FeedState(url, row["fetch_url"], row["etag"], row["last_modified"])

    def record_fetch(self, result: FetchResult, history: Collection[int] = ()) -> int:
        """Store a fetch's outcome and its new entries; return how many entries are new.

        ``history``: indexes of ``result.entries`` stored as history (never mailed) if this is
        the feed's first successful fetch."""
        stamp = iso(now())
        with self.transaction():
            known = self.execute("SELECT last_ok FROM feeds WHERE url = ?", (result.url,)).fetchone()
            self.execute(
                "INSERT INTO feeds (url, last_checked) VALUES (?, ?) ON CONFLICT (url) DO NOTHING",
                (result.url, stamp),
            )
            if result.status == FetchStatus.ERROR:
                self.execute(
                    "UPDATE feeds SET last_checked = ?, last_status = ?, last_error = ?,"
                    " consecutive_errors = consecutive_errors + 1, error_count = error_count + 1"
                    " WHERE url = ?",
                    (stamp, FetchStatus.ERROR, result.error, result.url),
                )
                return 0
            self.execute(
                "UPDATE feeds SET last_checked = ?, last_ok = ?, last_status = ?, last_error = ?,"
                " consecutive_errors = 0, fetch_url = ?, etag = ?, last_modified = ?,"
                " title = COALESCE(NULLIF(?, ''), title), link = COALESCE(NULLIF(?, ''), link),"
                # A 304 says nothing new about the ttl; a full answer without <ttl> clears it, or
                # one huge ttl sent once would slow the polling of a fixed feed for good.
                " ttl = CASE WHEN ? THEN ttl ELSE ? END WHERE url = ?",
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
                    result.status == FetchStatus.NOT_MODIFIED,
                    clamp_ttl(result.ttl),
                    result.url,
                ),
            )
            first_fetch = not (known and known["last_ok"])
            backlog = set(history) if first_fetch else set()
            new = 0
            for i, e in enumerate(result.entries):
                cur = self.execute(
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
                        iso(e.published) if e.published else stamp,
                        stamp,
                        e.image_url,
                        json.dumps(e.categories),
                        1 if i in backlog else 0,
                    ),
                )
                new += cur.rowcount if i not in backlog else 0
            return new

    def feeds(self, urls: Iterable[str] | None = None) -> list[FeedRow]:
        rows = self.execute("SELECT * FROM feeds ORDER BY url").fetchall()
        wanted = set(urls) if urls is not None else None
        return [feed_row(r) for r in rows if wanted is None or r["url"] in wanted]

    def new_entries(
        self, feed_urls: list[str], after_id: int, up_to_id: int, limit: int
    ) -> list[StoredEntry]:
        """Entries with after_id < id <= up_to_id that are not history, newest first.

        Entries of one date (undated ones are dated when first seen, so all of a fetch share
        one) keep the feed's document order, which lists the newest first: id ascending."""
        marks = ",".join("?" * len(feed_urls))
        rows = self.execute(
            f"SELECT * FROM entries WHERE feed_url IN ({marks}) AND id > ? AND id <= ?"
            " AND backlog = 0 ORDER BY published DESC, id ASC LIMIT ?",
            (*feed_urls, after_id, up_to_id, limit),
        ).fetchall()
        return [entry_row(r) for r in rows]

    def entries(self, ids: list[int]) -> list[StoredEntry]:
        marks = ",".join("?" * len(ids))
        rows = self.execute(f"SELECT * FROM entries WHERE id IN ({marks})", ids).fetchall()
        by_id = {r["id"]: entry_row(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    # -- issues and the ledger ----------------------------------------------------------------

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
                self.execute(
                    "SELECT COALESCE(MAX(number), 0) FROM issues WHERE schedule = ?", (schedule,)
                ).fetchone()[0]
            )
            cur = self.execute(
                "INSERT INTO issues (schedule, number, created_at, status, entry_watermark,"
                " entry_ids, subject, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    schedule,
                    number,
                    iso(stamp),
                    IssueStatus.SENDING,
                    watermark,
                    json.dumps(entry_ids),
                    subject,
                    json.dumps(payload),
                ),
            )
            issue_id = int(cur.lastrowid or 0)
            if list_name is not None:
                # In SQL, not Python: the ledger of 100,000 rows never passes through memory.
                self.execute(
                    "INSERT INTO deliveries (issue_id, recipient, status, updated_at)"
                    " SELECT ?, s.key, ?, ? FROM subscribers s"
                    f" WHERE {_ACTIVE} ON CONFLICT DO NOTHING",
                    (issue_id, DeliveryStatus.PENDING, iso(stamp), list_name, list_name, list_name),
                )
        return Issue(issue_id, schedule, number, stamp, IssueStatus.SENDING, entry_ids, subject, payload)

    def subscriber_source(self, list_name: str) -> ListSource | None:
        """Which file the stored copy was read from and its problems; None if never read."""
        row = self.execute(
            "SELECT source, problems FROM subscriber_lists WHERE name = ?", (list_name,)
        ).fetchone()
        return ListSource(str(row["source"]), json.loads(row["problems"])) if row else None

    def replace_subscribers(self, list_name: str, source: str, reuse: bool, read: ListReader) -> list[str]:
        """Write a new copy of a list with what ``read`` adds; it replaces the old one only
        when ``read`` returns, with the problems it returns.

        The rows are staged first, holding no write lock, then moved in one short
        transaction. ``reuse``: an address checked for the previous copy is taken as it was.
        """
        self.execute(STAGING)
        self.execute("DELETE FROM temp.subscriber_staging")
        row = self.execute("SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,)).fetchone()
        staging = Staging(self, "temp", list_name, int(row["generation"]) if row and reuse else None)
        try:
            with self.transaction(write=False):
                problems = read(staging)
            with self.transaction():
                row = self.execute(
                    "SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,)
                ).fetchone()
                new = (int(row["generation"]) if row else 0) + 1
                self.execute(
                    "DELETE FROM subscribers WHERE list_name = ? AND generation >= ?", (list_name, new)
                )
                self.execute(
                    "INSERT INTO subscribers (list_name, generation, key, email, raw, name, fields, line)"
                    " SELECT ?, ?, key, email, raw, name, fields, line FROM temp.subscriber_staging",
                    (list_name, new),
                )
                self.execute(
                    "INSERT INTO subscriber_lists (name, source, generation, problems, loaded_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET source = excluded.source,"
                    " generation = excluded.generation, problems = excluded.problems,"
                    " loaded_at = excluded.loaded_at",
                    (list_name, source, new, json.dumps(problems), iso(now())),
                )
                self.execute(
                    "DELETE FROM subscribers WHERE list_name = ? AND generation != ?", (list_name, new)
                )
        finally:
            self.execute("DELETE FROM temp.subscriber_staging")
        return problems

    def subscriber_counts(self, list_name: str) -> SubscriberCounts:
        row = self.execute(
            f"SELECT COUNT(*) AS total, SUM({_NOT_SUPPRESSED}) AS active FROM subscribers s WHERE {_CURRENT}",
            (list_name, list_name, list_name),
        ).fetchone()
        return SubscriberCounts(int(row["total"]), int(row["active"] or 0))

    def subscriber(self, list_name: str, address: str) -> Subscriber | None:
        row = self.execute(
            f"SELECT * FROM subscribers s WHERE {_CURRENT} AND key = ?",
            (list_name, list_name, address.lower()),
        ).fetchone()
        return subscriber_row(row) if row else None

    def subscribers(self, list_name: str, page: int = 500) -> Iterator[ListedSubscriber]:
        """The list in file order, read ``page`` rows at a time."""
        after = 0
        while rows := self.execute(
            f"SELECT *, NOT {_NOT_SUPPRESSED} AS suppressed FROM subscribers s WHERE {_CURRENT}"
            " AND line > ? ORDER BY line LIMIT ?",
            (list_name, list_name, list_name, after, page),
        ).fetchall():
            yield from (ListedSubscriber(subscriber_row(r), bool(r["suppressed"])) for r in rows)
            after = rows[-1]["line"]

    def subscriber_fields(self, list_name: str) -> list[str]:
        """Every extra column any subscriber of the list has, sorted."""
        rows = self.execute(
            f"SELECT DISTINCT j.key FROM subscribers s, json_each(s.fields) j WHERE {_CURRENT}"
            " ORDER BY j.key",
            (list_name, list_name),
        ).fetchall()
        return [str(r[0]) for r in rows]

    # -- suppressions: addresses that unsubscribed stay unsubscribed ----------------------------

    # -- webhook posts ---------------------------------------------------------------------------

    def pending_posts(self, target: str, schedule: str) -> list[PendingPost]:
        """Posts still to make, oldest first."""
        rows = self.execute(
            "SELECT item_id, kind, ref, attempts FROM posts WHERE target = ? AND schedule = ?"
            " AND status = ? ORDER BY rowid",
            (target, schedule, PostStatus.PENDING),
        ).fetchall()
        return [PendingPost(r["item_id"], PostKind(r["kind"]), r["ref"], r["attempts"]) for r in rows]

    # -- locks: one run of a schedule at a time, across processes ----------------------------
