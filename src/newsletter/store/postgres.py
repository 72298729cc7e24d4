"""The PostgreSQL store: ``storage.Storage`` over one psycopg connection, as the SQLite one.

The same methods with the same meaning, row for row: times are stored as the same ISO text,
JSON as the same text, so ``rows`` turns them into the same model types. What differs is the
dialect: ``%s`` parameters, ``= ANY(...)`` for lists, ``RETURNING`` for new ids, a queue order
column for posts where SQLite has its rowid.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from ..model import (
    DeliveryCounts,
    DeliveryStatus,
    DisabledTarget,
    FeedRow,
    FeedState,
    FetchResult,
    FetchStatus,
    Issue,
    IssueStatus,
    ListedSubscriber,
    ListSource,
    Pending,
    PendingPost,
    PostCounts,
    PostKind,
    PostStatus,
    StoredEntry,
    Subscriber,
    SubscriberCounts,
    SubscriberRow,
    Suppression,
    clamp_ttl,
    now,
)
from ..storage import ListReader
from .pgdb import PgDatabase
from .rows import entry_row, feed_row, iso, issue_row, subscriber_row
from .usage import _HOUR, hour_of

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

# SQL fragments over ``subscribers s``; parameters: the list name for each ``%s``.
_CURRENT = "s.list_name = %s AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = %s)"
_SUPPRESSED = "EXISTS (SELECT 1 FROM suppressions u WHERE u.list_name = %s AND u.address = s.key)"
_ACTIVE = f"{_CURRENT} AND NOT {_SUPPRESSED}"


def _row(r: dict[str, Any]) -> sqlite3.Row:
    # ``rows`` reads columns by name only; a psycopg dict row answers the same way.
    return cast("sqlite3.Row", r)


class PostgresStore(PgDatabase):
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

    def secret(self, name: str) -> str:
        """A per-installation random secret, made on first use (used when none is in the env)."""
        with self.transaction():
            row = self._one("SELECT value FROM meta WHERE key = %s", (name,))
            if row:
                return str(row["value"])
            value = secrets.token_urlsafe(32)
            self.execute("INSERT INTO meta (key, value) VALUES (%s, %s)", (name, value))
            return value

    def meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = %s", (key,))
        return str(row["value"]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def last_run(self, schedule: str) -> datetime | None:
        value = self.meta(f"last_run:{schedule}")
        return datetime.fromisoformat(value) if value else None

    def set_last_run(self, schedule: str, when: datetime) -> None:
        self.set_meta(f"last_run:{schedule}", iso(when))

    # -- feeds and entries ------------------------------------------------------------------

    def feed_state(self, url: str) -> FeedState:
        row = self._one("SELECT * FROM feeds WHERE url = %s", (url,))
        if not row:
            return FeedState(url)
        return FeedState(url, row["fetch_url"], row["etag"], row["last_modified"])

    def record_fetch(self, result: FetchResult, history: Collection[int] = ()) -> int:
        """Store a fetch's outcome and its new entries; return how many entries are new.

        ``history``: indexes of ``result.entries`` stored as history (never mailed) if this is
        the feed's first successful fetch."""
        stamp = iso(now())
        with self.transaction():
            known = self._one("SELECT last_ok FROM feeds WHERE url = %s", (result.url,))
            self.execute(
                "INSERT INTO feeds (url, last_checked) VALUES (%s, %s) ON CONFLICT (url) DO NOTHING",
                (result.url, stamp),
            )
            if result.status == FetchStatus.ERROR:
                self.execute(
                    "UPDATE feeds SET last_checked = %s, last_status = %s, last_error = %s,"
                    " consecutive_errors = consecutive_errors + 1, error_count = error_count + 1"
                    " WHERE url = %s",
                    (stamp, FetchStatus.ERROR.value, result.error, result.url),
                )
                return 0
            self.execute(
                "UPDATE feeds SET last_checked = %s, last_ok = %s, last_status = %s, last_error = %s,"
                " consecutive_errors = 0, fetch_url = %s, etag = %s, last_modified = %s,"
                " title = COALESCE(NULLIF(%s, ''), title), link = COALESCE(NULLIF(%s, ''), link),"
                # A 304 says nothing new about the ttl; a full answer without <ttl> clears it.
                " ttl = CASE WHEN %s THEN ttl ELSE %s::integer END WHERE url = %s",
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
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
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
            "SELECT * FROM entries WHERE feed_url = ANY(%s) AND id > %s AND id <= %s"
            " AND backlog = 0 ORDER BY published DESC, id ASC LIMIT %s",
            (list(feed_urls), after_id, up_to_id, limit),
        ).fetchall()
        return [entry_row(_row(r)) for r in found]

    def entries(self, ids: list[int]) -> list[StoredEntry]:
        found = self.execute("SELECT * FROM entries WHERE id = ANY(%s)", (list(ids),)).fetchall()
        by_id = {r["id"]: entry_row(_row(r)) for r in found}
        return [by_id[i] for i in ids if i in by_id]

    def max_entry_id(self) -> int:
        return int(self._value("SELECT COALESCE(MAX(id), 0) FROM entries"))

    # -- issues and the ledger ----------------------------------------------------------------

    def watermark(self, schedule: str) -> int:
        return int(
            self._value(
                "SELECT COALESCE(MAX(entry_watermark), 0) FROM issues WHERE schedule = %s", (schedule,)
            )
        )

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
                self._value("SELECT COALESCE(MAX(number), 0) FROM issues WHERE schedule = %s", (schedule,))
            )
            issue_id = int(
                self._value(
                    "INSERT INTO issues (schedule, number, created_at, status, entry_watermark,"
                    " entry_ids, subject, payload) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
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
                    " SELECT %s, s.key, %s, %s FROM subscribers s"
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

    def issue_by_id(self, issue_id: int) -> Issue | None:
        row = self._one("SELECT * FROM issues WHERE id = %s", (issue_id,))
        return issue_row(_row(row)) if row else None

    def issue(self, schedule: str, number: int) -> Issue | None:
        row = self._one("SELECT * FROM issues WHERE schedule = %s AND number = %s", (schedule, number))
        return issue_row(_row(row)) if row else None

    def unfinished_issues(self, schedule: str) -> list[Issue]:
        found = self.execute(
            "SELECT * FROM issues WHERE schedule = %s AND status = %s ORDER BY number",
            (schedule, IssueStatus.SENDING.value),
        ).fetchall()
        return [issue_row(_row(r)) for r in found]

    def issues(self, schedule: str, limit: int = 5) -> list[Issue]:
        found = self.execute(
            "SELECT * FROM issues WHERE schedule = %s ORDER BY number DESC LIMIT %s", (schedule, limit)
        ).fetchall()
        return [issue_row(_row(r)) for r in found]

    def pending(self, issue_id: int, list_name: str, after: str = "", limit: int = 500) -> list[Pending]:
        """The next ``limit`` deliveries still to be made, in recipient order after ``after``,
        each with the subscriber as the list has them now (None: they left the file)."""
        found = self.execute(
            "SELECT d.recipient, d.attempts, s.email, s.name, s.fields,"
            " EXISTS (SELECT 1 FROM suppressions WHERE list_name = %s AND address = d.recipient)"
            " AS suppressed FROM deliveries d LEFT JOIN subscribers s ON s.list_name = %s"
            " AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = %s)"
            " AND s.key = d.recipient"
            " WHERE d.issue_id = %s AND d.status = %s AND d.recipient > %s"
            " ORDER BY d.recipient LIMIT %s",
            (list_name, list_name, list_name, issue_id, DeliveryStatus.PENDING.value, after, limit),
        ).fetchall()
        return [
            Pending(
                r["recipient"],
                r["attempts"],
                subscriber_row(_row(r)) if r["email"] is not None else None,
                bool(r["suppressed"]),
            )
            for r in found
        ]

    def record_delivery(self, issue_id: int, recipient: str, status: DeliveryStatus, error: str = "") -> None:
        # One autocommitted statement per delivery: the ledger is never behind the wire by
        # more than the message in flight.
        self.execute(
            "UPDATE deliveries SET status = %s, attempts = attempts + 1, last_error = %s,"
            " updated_at = %s WHERE issue_id = %s AND recipient = %s",
            (DeliveryStatus(status).value, error, iso(now()), issue_id, recipient),
        )

    def skip_delivery(self, issue_id: int, recipient: str, reason: str) -> None:
        self.execute(
            "UPDATE deliveries SET status = %s, last_error = %s, updated_at = %s"
            " WHERE issue_id = %s AND recipient = %s",
            (DeliveryStatus.SKIPPED.value, reason, iso(now()), issue_id, recipient),
        )

    def finish_issue_if_done(self, issue_id: int) -> bool:
        cur = self.execute(
            "UPDATE issues SET status = %s WHERE id = %s AND NOT EXISTS"
            " (SELECT 1 FROM deliveries WHERE issue_id = %s AND status = %s)",
            (IssueStatus.COMPLETE.value, issue_id, issue_id, DeliveryStatus.PENDING.value),
        )
        return cur.rowcount > 0

    def delivery_counts(self, issue_id: int) -> DeliveryCounts:
        found = self.execute(
            "SELECT status, COUNT(*) AS n FROM deliveries WHERE issue_id = %s GROUP BY status",
            (issue_id,),
        ).fetchall()
        return DeliveryCounts(**{DeliveryStatus(r["status"]).value: int(r["n"]) for r in found})

    def recent_sends(self, issue_id: int, since: datetime) -> int:
        return int(
            self._value(
                "SELECT COUNT(*) FROM deliveries WHERE issue_id = %s AND status = %s AND updated_at >= %s",
                (issue_id, DeliveryStatus.SENT.value, iso(since)),
            )
        )

    # -- subscriber lists: subscribers/NAME.csv, checked once per change of the file ---------

    def subscriber_source(self, list_name: str) -> ListSource | None:
        """Which file the stored copy was read from and its problems; None if never read."""
        row = self._one("SELECT source, problems FROM subscriber_lists WHERE name = %s", (list_name,))
        return ListSource(str(row["source"]), json.loads(row["problems"])) if row else None

    def replace_subscribers(self, list_name: str, source: str, reuse: bool, read: ListReader) -> list[str]:
        """Write a new copy of a list with what ``read`` adds; it replaces the old one only
        when ``read`` returns, with the problems it returns.

        The rows are staged first, holding no write lock, then moved in one short
        transaction. ``reuse``: an address checked for the previous copy is taken as it was.
        """
        self.execute(STAGING)
        self.execute("DELETE FROM pg_temp.subscriber_staging")
        previous = self._value("SELECT generation FROM subscriber_lists WHERE name = %s", (list_name,))
        staging = _Staging(self, list_name, int(previous) if previous is not None and reuse else None)
        try:
            with self.transaction(write=False):
                problems = read(staging)
            with self.transaction():
                current = self._value("SELECT generation FROM subscriber_lists WHERE name = %s", (list_name,))
                new = (int(current) if current is not None else 0) + 1
                self.execute(
                    "DELETE FROM subscribers WHERE list_name = %s AND generation >= %s", (list_name, new)
                )
                self.execute(
                    "INSERT INTO subscribers (list_name, generation, key, email, raw, name, fields, line)"
                    " SELECT %s, %s, key, email, raw, name, fields, line FROM pg_temp.subscriber_staging",
                    (list_name, new),
                )
                self.execute(
                    "INSERT INTO subscriber_lists (name, source, generation, problems, loaded_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET source = excluded.source,"
                    " generation = excluded.generation, problems = excluded.problems,"
                    " loaded_at = excluded.loaded_at",
                    (list_name, source, new, json.dumps(problems), iso(now())),
                )
                self.execute(
                    "DELETE FROM subscribers WHERE list_name = %s AND generation != %s", (list_name, new)
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
            f"SELECT * FROM subscribers s WHERE {_CURRENT} AND key = %s",
            (list_name, list_name, address.lower()),
        )
        return subscriber_row(_row(row)) if row else None

    def subscribers(self, list_name: str, page: int = 500) -> Iterator[ListedSubscriber]:
        """The list in file order, read ``page`` rows at a time."""
        after = 0
        while found := self.execute(
            f"SELECT *, {_SUPPRESSED} AS suppressed FROM subscribers s WHERE {_CURRENT}"
            " AND line > %s ORDER BY line LIMIT %s",
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

    def suppress(self, list_name: str, address: str, source: str) -> bool:
        """Record an unsubscribe; False when the address was already suppressed."""
        cur = self.execute(
            "INSERT INTO suppressions (list_name, address, created_at, source) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (list_name, address.lower(), iso(now()), source),
        )
        return cur.rowcount > 0

    def suppressed(self, list_name: str) -> list[Suppression]:
        found = self.execute(
            "SELECT address, created_at, source FROM suppressions WHERE list_name = %s ORDER BY address",
            (list_name,),
        ).fetchall()
        return [
            Suppression(r["address"], datetime.fromisoformat(r["created_at"]), r["source"]) for r in found
        ]

    # -- webhook posts ---------------------------------------------------------------------------

    def queue_post(self, target: str, item_id: str, schedule: str, kind: PostKind, ref: int) -> int:
        stamp = iso(now())
        cur = self.execute(
            "INSERT INTO posts (target, item_id, schedule, kind, ref, status, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (target, item_id, schedule, PostKind(kind).value, ref, PostStatus.PENDING.value, stamp, stamp),
        )
        return cur.rowcount

    def pending_posts(self, target: str, schedule: str) -> list[PendingPost]:
        """Posts still to make, oldest first."""
        found = self.execute(
            "SELECT item_id, kind, ref, attempts FROM posts WHERE target = %s AND schedule = %s"
            " AND status = %s ORDER BY seq",
            (target, schedule, PostStatus.PENDING.value),
        ).fetchall()
        return [PendingPost(r["item_id"], PostKind(r["kind"]), r["ref"], r["attempts"]) for r in found]

    def record_post(
        self, target: str, item_id: str, status: PostStatus, error: str = "", location: str = ""
    ) -> None:
        self.execute(
            "UPDATE posts SET status = %s, attempts = attempts + 1, last_error = %s, location = %s,"
            " updated_at = %s WHERE target = %s AND item_id = %s",
            (PostStatus(status).value, error, location, iso(now()), target, item_id),
        )

    def post_counts(self, target: str, schedule: str) -> PostCounts:
        found = self.execute(
            "SELECT status, COUNT(*) AS n FROM posts WHERE target = %s AND schedule = %s GROUP BY status",
            (target, schedule),
        ).fetchall()
        return PostCounts(**{PostStatus(r["status"]).value: int(r["n"]) for r in found})

    def disable_target(self, name: str, reason: str, fingerprint: str) -> None:
        self.execute(
            "INSERT INTO targets (name, reason, fingerprint, disabled_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET reason = excluded.reason,"
            " fingerprint = excluded.fingerprint, disabled_at = excluded.disabled_at",
            (name, reason, fingerprint, iso(now())),
        )

    def disabled_target(self, name: str) -> DisabledTarget | None:
        row = self._one("SELECT reason, fingerprint FROM targets WHERE name = %s", (name,))
        return DisabledTarget(str(row["reason"]), str(row["fingerprint"])) if row else None

    def enable_target(self, name: str) -> None:
        self.execute("DELETE FROM targets WHERE name = %s", (name,))

    # -- locks: one run of a schedule at a time, across processes and machines ----------------

    def acquire_lock(self, name: str, owner: str, ttl: float, *, dead: str | None = None) -> str | None:
        """Take the lock, or return who holds it. A lock past its ``ttl`` is free; one held by
        ``dead`` (a holder the caller found gone) is taken over if that one still holds it."""
        stamp = now()
        with self.transaction():  # the write lock: a second taker reads after this one wrote
            row = self._one("SELECT owner, expires_at FROM locks WHERE name = %s", (name,))
            if (
                row
                and row["owner"] not in (owner, dead)
                and datetime.fromisoformat(row["expires_at"]) > stamp
            ):
                return str(row["owner"])
            self.execute(
                "INSERT INTO locks (name, owner, acquired_at, expires_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                (name, owner, iso(stamp), iso(stamp + timedelta(seconds=ttl))),
            )
            return None

    def refresh_lock(self, name: str, owner: str, ttl: float) -> None:
        self.execute(
            "UPDATE locks SET expires_at = %s WHERE name = %s AND owner = %s",
            (iso(now() + timedelta(seconds=ttl)), name, owner),
        )

    def release_lock(self, name: str, owner: str) -> None:
        self.execute("DELETE FROM locks WHERE name = %s AND owner = %s", (name, owner))

    # -- sender usage (migration 0003): what a daily quota counts -----------------------------

    def count_sent(self, sender: str, when: datetime, n: int = 1) -> None:
        """Add ``n`` messages to the hour of ``when``; inside ``transaction()`` it commits, or
        rolls back, with the rest of it."""
        self.execute(
            "INSERT INTO sender_usage (sender, hour, sent) VALUES (%s, %s, %s)"
            " ON CONFLICT (sender, hour) DO UPDATE SET sent = sender_usage.sent + excluded.sent",
            (sender, hour_of(when), n),
        )

    def sent_since(self, sender: str, since: datetime) -> list[tuple[datetime, int]]:
        """The hour buckets from the one ``since`` falls in on, oldest first: (start of the
        hour in UTC, messages)."""
        found = self.execute(
            "SELECT hour, sent FROM sender_usage WHERE sender = %s AND hour >= %s ORDER BY hour",
            (sender, hour_of(since)),
        ).fetchall()
        return [(datetime.strptime(r["hour"], _HOUR).replace(tzinfo=UTC), int(r["sent"])) for r in found]

    def forget_usage(self, before: datetime) -> int:
        """Drop the buckets of every sender that end before the hour of ``before``; how many."""
        return self.execute("DELETE FROM sender_usage WHERE hour < %s", (hour_of(before),)).rowcount


class _Staging:
    """The new copy of a list, in ``pg_temp.subscriber_staging``: ``storage.SubscriberStaging``."""

    def __init__(self, store: PgDatabase, list_name: str, previous: int | None) -> None:
        self.store, self.list_name, self.previous = store, list_name, previous

    def checked(self, raw: str) -> str | None:
        """The checked address ``raw`` became in the previous copy, so it is not checked twice."""
        if self.previous is None:
            return None
        row = self.store.execute(
            "SELECT email FROM subscribers WHERE list_name = %s AND generation = %s AND raw = %s",
            (self.list_name, self.previous, raw),
        ).fetchone()
        return str(row["email"]) if row else None

    def add(self, row: SubscriberRow) -> int | None:
        """Add a subscriber; if the address is already in this copy, the line it is on."""
        sub = row.subscriber
        cur = self.store.execute(
            "INSERT INTO pg_temp.subscriber_staging (key, email, raw, name, fields, line)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (sub.key, sub.email, row.raw, sub.name, json.dumps(sub.fields), row.line),
        )
        if cur.rowcount:
            return None
        first = self.store.execute(
            "SELECT line FROM pg_temp.subscriber_staging WHERE key = %s", (sub.key,)
        ).fetchone()
        assert first is not None  # the conflict was with this very row
        return int(first["line"])
