"""The PostgreSQL store: ``storage.Storage`` over one psycopg connection, as the SQLite one.

The same methods with the same meaning, row for row: times are stored as the same ISO text,
JSON as the same text, so ``rows`` turns them into the same model types. What both say in the
same SQL is in ``common.py`` and ``usage.py``; here is what PostgreSQL says differently:
``= ANY(...)`` for lists, ``RETURNING`` for new ids, a queue order column for posts where
SQLite has its rowid, the staging table in ``pg_temp``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

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
from .pgdb import PgDatabase
from .rows import entry_row, feed_row, iso, subscriber_row
from .usage import SenderUsage

if TYPE_CHECKING:
    import sqlite3

# The new copy of a list is gathered in a temporary table of this connection: writing it
# takes no lock on the shared tables, however long reading and checking the file takes.
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS subscriber_staging (
    key TEXT COLLATE "C" PRIMARY KEY, email TEXT NOT NULL, raw TEXT NOT NULL, name TEXT NOT NULL,
    fields TEXT NOT NULL, line INTEGER NOT NULL
)
"""

# SQL fragments over ``subscribers s``; parameters: the list name for each ``?``.
_CURRENT = "s.list_name = ? AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = ?)"
_SUPPRESSED = "EXISTS (SELECT 1 FROM suppressions u WHERE u.list_name = ? AND u.address = s.key)"
_ACTIVE = f"{_CURRENT} AND NOT {_SUPPRESSED}"


def _row(r: dict[str, Any]) -> sqlite3.Row:
    # ``rows`` reads columns by name only; a psycopg dict row answers the same way.
    return cast("sqlite3.Row", r)


class PostgresStore(PgDatabase, SenderUsage, SharedClaims, SharedSql):
    # The server's clock (not the transaction's start: a lease renewed late in a long
    # transaction must not start in the past), whichever host asks.
    DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    SKIP_LOCKED_OF_D = " FOR UPDATE OF d SKIP LOCKED"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        return self.execute(sql, args).fetchone()

    def _value(self, sql: str, args: Iterable[Any] = ()) -> Any:
        row = self._one(sql, args)
        return next(iter(row.values())) if row else None

    # -- meta -------------------------------------------------------------------------------

    # -- feeds and entries ------------------------------------------------------------------

    def feed_state(self, url: str) -> FeedState:
        row = self._one("SELECT * FROM feeds WHERE url = ?", (url,))
        if not row:
            return FeedState(url)
        return FeedState(url, row["fetch_url"], row["etag"], row["last_modified"])

    def record_fetch(self, result: FetchResult, history: Collection[int] = ()) -> int:
        """Store a fetch's outcome and its new entries; return how many entries are new.

        ``history``: indexes of ``result.entries`` stored as history (never mailed) if this is
        the feed's first successful fetch."""
        stamp = iso(now())
        with self.transaction():
            known = self._one("SELECT last_ok FROM feeds WHERE url = ?", (result.url,))
            self.execute(
                "INSERT INTO feeds (url, last_checked) VALUES (?, ?) ON CONFLICT (url) DO NOTHING",
                (result.url, stamp),
            )
            if result.status == FetchStatus.ERROR:
                self.execute(
                    "UPDATE feeds SET last_checked = ?, last_status = ?, last_error = ?,"
                    " consecutive_errors = consecutive_errors + 1, error_count = error_count + 1"
                    " WHERE url = ?",
                    (stamp, FetchStatus.ERROR.value, result.error, result.url),
                )
                return 0
            self.execute(
                "UPDATE feeds SET last_checked = ?, last_ok = ?, last_status = ?, last_error = ?,"
                " consecutive_errors = 0, fetch_url = ?, etag = ?, last_modified = ?,"
                " title = COALESCE(NULLIF(?, ''), title), link = COALESCE(NULLIF(?, ''), link),"
                # A 304 says nothing new about the ttl; a full answer without <ttl> clears it.
                " ttl = CASE WHEN ? THEN ttl ELSE ?::integer END WHERE url = ?",
                (
                    stamp,
                    stamp,
                    FetchStatus(result.status).value,
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
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (feed_url, key) DO NOTHING",
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
        found = self.execute("SELECT * FROM feeds ORDER BY url").fetchall()
        wanted = set(urls) if urls is not None else None
        return [feed_row(_row(r)) for r in found if wanted is None or r["url"] in wanted]

    def new_entries(
        self, feed_urls: list[str], after_id: int, up_to_id: int, limit: int
    ) -> list[StoredEntry]:
        """Entries with after_id < id <= up_to_id that are not history, newest first (entries
        of one date in the feed's document order: id ascending)."""
        found = self.execute(
            "SELECT * FROM entries WHERE feed_url = ANY(?) AND id > ? AND id <= ?"
            " AND backlog = 0 ORDER BY published DESC, id ASC LIMIT ?",
            (list(feed_urls), after_id, up_to_id, limit),
        ).fetchall()
        return [entry_row(_row(r)) for r in found]

    def entries(self, ids: list[int]) -> list[StoredEntry]:
        found = self.execute("SELECT * FROM entries WHERE id = ANY(?)", (list(ids),)).fetchall()
        by_id = {r["id"]: entry_row(_row(r)) for r in found}
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
                self._value("SELECT COALESCE(MAX(number), 0) FROM issues WHERE schedule = ?", (schedule,))
            )
            issue_id = int(
                self._value(
                    "INSERT INTO issues (schedule, number, created_at, status, entry_watermark,"
                    " entry_ids, subject, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (
                        schedule,
                        number,
                        iso(stamp),
                        IssueStatus.SENDING.value,
                        watermark,
                        json.dumps(entry_ids),
                        subject,
                        json.dumps(payload),
                    ),
                )
            )
            if list_name is not None:
                # In SQL, not Python: the ledger of 100,000 rows never passes through memory.
                self.execute(
                    "INSERT INTO deliveries (issue_id, recipient, status, updated_at)"
                    " SELECT ?, s.key, ?, ? FROM subscribers s"
                    f" WHERE {_ACTIVE} ON CONFLICT DO NOTHING",
                    (
                        issue_id,
                        DeliveryStatus.PENDING.value,
                        iso(stamp),
                        list_name,
                        list_name,
                        list_name,
                    ),
                )
        return Issue(issue_id, schedule, number, stamp, IssueStatus.SENDING, entry_ids, subject, payload)

    def subscriber_source(self, list_name: str) -> ListSource | None:
        """Which file the stored copy was read from and its problems; None if never read."""
        row = self._one("SELECT source, problems FROM subscriber_lists WHERE name = ?", (list_name,))
        return ListSource(str(row["source"]), json.loads(row["problems"])) if row else None

    def replace_subscribers(self, list_name: str, source: str, reuse: bool, read: ListReader) -> list[str]:
        """Write a new copy of a list with what ``read`` adds; it replaces the old one only
        when ``read`` returns, with the problems it returns.

        The rows are staged first, holding no write lock, then moved in one short
        transaction. ``reuse``: an address checked for the previous copy is taken as it was.
        """
        self.execute(STAGING)
        self.execute("DELETE FROM pg_temp.subscriber_staging")
        previous = self._value("SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,))
        staging = Staging(
            self, "pg_temp", list_name, int(previous) if previous is not None and reuse else None
        )
        try:
            with self.transaction(write=False):
                problems = read(staging)
            with self.transaction():
                current = self._value("SELECT generation FROM subscriber_lists WHERE name = ?", (list_name,))
                new = (int(current) if current is not None else 0) + 1
                self.execute(
                    "DELETE FROM subscribers WHERE list_name = ? AND generation >= ?", (list_name, new)
                )
                self.execute(
                    "INSERT INTO subscribers (list_name, generation, key, email, raw, name, fields, line)"
                    " SELECT ?, ?, key, email, raw, name, fields, line FROM pg_temp.subscriber_staging",
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
            self.execute("DELETE FROM pg_temp.subscriber_staging")
        return problems

    def subscriber_counts(self, list_name: str) -> SubscriberCounts:
        row = self._one(
            f"SELECT COUNT(*) AS total, COUNT(*) FILTER (WHERE NOT {_SUPPRESSED}) AS active"
            f" FROM subscribers s WHERE {_CURRENT}",
            (list_name, list_name, list_name),
        )
        assert row is not None  # an aggregate always answers one row
        return SubscriberCounts(int(row["total"]), int(row["active"] or 0))

    def subscriber(self, list_name: str, address: str) -> Subscriber | None:
        row = self._one(
            f"SELECT * FROM subscribers s WHERE {_CURRENT} AND key = ?",
            (list_name, list_name, address.lower()),
        )
        return subscriber_row(_row(row)) if row else None

    def subscribers(self, list_name: str, page: int = 500) -> Iterator[ListedSubscriber]:
        """The list in file order, read ``page`` rows at a time."""
        after = 0
        while found := self.execute(
            f"SELECT *, {_SUPPRESSED} AS suppressed FROM subscribers s WHERE {_CURRENT}"
            " AND line > ? ORDER BY line LIMIT ?",
            (list_name, list_name, list_name, after, page),
        ).fetchall():
            yield from (ListedSubscriber(subscriber_row(_row(r)), bool(r["suppressed"])) for r in found)
            after = found[-1]["line"]

    def subscriber_fields(self, list_name: str) -> list[str]:
        """Every extra column any subscriber of the list has, sorted."""
        found = self.execute(
            'SELECT DISTINCT k COLLATE "C" AS k FROM subscribers s,'
            f" jsonb_object_keys(s.fields::jsonb) k WHERE {_CURRENT} ORDER BY 1",
            (list_name, list_name),
        ).fetchall()
        return [str(r["k"]) for r in found]

    # -- suppressions: addresses that unsubscribed stay unsubscribed ----------------------------

    # -- webhook posts ---------------------------------------------------------------------------

    def pending_posts(self, target: str, schedule: str) -> list[PendingPost]:
        """Posts still to make, oldest first."""
        found = self.execute(
            "SELECT item_id, kind, ref, attempts FROM posts WHERE target = ? AND schedule = ?"
            " AND status = ? ORDER BY seq",
            (target, schedule, PostStatus.PENDING.value),
        ).fetchall()
        return [PendingPost(r["item_id"], PostKind(r["kind"]), r["ref"], r["attempts"]) for r in found]

    # -- locks: one run of a schedule at a time, across processes and machines ----------------
