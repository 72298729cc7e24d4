"""What both stores say in the same SQL: meta, issues and the ledger, suppressions, posts,
targets and locks, and the staging of a new copy of a list.

Written once, in sqlite3's ``?`` style (the PostgreSQL connection turns it into psycopg's),
with columns read by name, which both drivers' rows answer. Each backend adds only what its
engine says differently (feeds and entries, new issues, the subscriber lists).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..model import (
    DeliveryCounts,
    DeliveryStatus,
    DisabledTarget,
    Issue,
    IssueStatus,
    Pending,
    PostCounts,
    PostKind,
    PostStatus,
    SubscriberRow,
    Suppression,
    now,
)
from .rows import iso, issue_row, subscriber_row, values_list


class SharedSql:
    """Mixed into ``SQLiteStore`` and ``PostgresStore``, after their connection class."""

    if TYPE_CHECKING:

        def execute(self, sql: str, args: Iterable[Any] = ()) -> Any: ...

        def transaction(self, write: bool = True, serial: bool = True) -> AbstractContextManager[None]: ...

        def db_now(self) -> datetime: ...

    def meta(self, key: str) -> str | None:
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row["value"]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def secret(self, name: str) -> str:
        """A per-installation random secret, made on first use (used when none is in the env)."""
        with self.transaction():
            row = self.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
            if row:
                return str(row["value"])
            value = secrets.token_urlsafe(32)
            self.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (name, value))
            return value

    def last_run(self, schedule: str) -> datetime | None:
        value = self.meta(f"last_run:{schedule}")
        return datetime.fromisoformat(value) if value else None

    def set_last_run(self, schedule: str, when: datetime) -> None:
        self.set_meta(f"last_run:{schedule}", iso(when))

    def max_entry_id(self) -> int:
        return int(self.execute("SELECT COALESCE(MAX(id), 0) AS n FROM entries").fetchone()["n"])

    def watermark(self, schedule: str) -> int:
        row = self.execute(
            "SELECT COALESCE(MAX(entry_watermark), 0) AS n FROM issues WHERE schedule = ?", (schedule,)
        ).fetchone()
        return int(row["n"])

    def issue_by_id(self, issue_id: int) -> Issue | None:
        row = self.execute("SELECT * FROM issues WHERE id = ?", (issue_id,)).fetchone()
        return issue_row(row) if row else None

    def issue(self, schedule: str, number: int) -> Issue | None:
        row = self.execute(
            "SELECT * FROM issues WHERE schedule = ? AND number = ?", (schedule, number)
        ).fetchone()
        return issue_row(row) if row else None

    def issues(self, schedule: str, limit: int = 5) -> list[Issue]:
        rows = self.execute(
            "SELECT * FROM issues WHERE schedule = ? ORDER BY number DESC LIMIT ?", (schedule, limit)
        ).fetchall()
        return [issue_row(r) for r in rows]

    def unfinished_issues(self, schedule: str) -> list[Issue]:
        rows = self.execute(
            "SELECT * FROM issues WHERE schedule = ? AND status = ? ORDER BY number",
            (schedule, IssueStatus.SENDING),
        ).fetchall()
        return [issue_row(r) for r in rows]

    def record_delivery(
        self, issue_id: int, recipient: str, status: DeliveryStatus, error: str = "", batch: str | None = None
    ) -> bool:
        """Write one outcome; with ``batch``, only while that batch still holds the row (a
        process paused past its lease finds it another's: False, nothing written)."""
        fence = "" if batch is None else " AND claimed_by = ?"
        cur = self.execute(
            "UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?,"
            f" updated_at = ? WHERE issue_id = ? AND recipient = ?{fence}",
            (status, error, iso(now()), issue_id, recipient, *(() if batch is None else (batch,))),
        )
        return bool(cur.rowcount)

    def record_deliveries(
        self, issue_id: int, outcomes: Sequence[tuple[str, DeliveryStatus, str, str]]
    ) -> list[bool]:
        """Write outcomes that came together, each ``(recipient, status, error, batch)`` and
        each only while its batch still holds the row; whether each was written. One
        statement for the group (``values_list``): on PostgreSQL one round trip, not one a
        row."""
        if len(outcomes) <= 1:  # its own rowcount says: no transaction needed around it
            return [self.record_delivery(issue_id, *outcome) for outcome in outcomes]
        values, args = values_list([(key, status, error, batch) for key, status, error, batch in outcomes])
        # Each row is matched by its own batch: the rows the statement returns are the ones
        # written, those whose batch still held them.
        rows = self.execute(
            "UPDATE deliveries SET status = v.column2, attempts = attempts + 1,"
            f" last_error = v.column3, updated_at = ? FROM (VALUES {values}) AS v"
            " WHERE deliveries.issue_id = ? AND deliveries.recipient = v.column1"
            " AND deliveries.claimed_by = v.column4 RETURNING deliveries.recipient",
            (iso(now()), *args, issue_id),
        ).fetchall()
        written = {row["recipient"] for row in rows}
        return [key in written for key, _, _, _ in outcomes]

    def skip_delivery(self, issue_id: int, recipient: str, reason: str, batch: str | None = None) -> None:
        fence, by = ("", ()) if batch is None else (" AND claimed_by = ?", (batch,))
        self.execute(
            "UPDATE deliveries SET status = ?, last_error = ?, updated_at = ?"
            f" WHERE issue_id = ? AND recipient = ? AND status = 'pending'{fence}",
            (DeliveryStatus.SKIPPED, reason, iso(now()), issue_id, recipient, *by),
        )

    def pending(
        self, issue_id: int, list_name: str, after: str = "", limit: int = 500, batch: str | None = None
    ) -> list[Pending]:
        """The next ``limit`` deliveries still to be made, in recipient order after ``after``
        (with ``batch``, only the rows it holds). A page at a time, so memory does not grow
        with the list. Each comes with the subscriber as the list has them now: None when
        they left the file since the issue was built."""
        held, held_by = ("", ()) if batch is None else (" AND d.claimed_by = ?", (batch,))
        rows = self.execute(
            "SELECT d.recipient, d.attempts, s.email, s.name, s.fields,"
            " EXISTS (SELECT 1 FROM suppressions WHERE list_name = ? AND address = d.recipient)"
            " AS suppressed FROM deliveries d LEFT JOIN subscribers s ON s.list_name = ?"
            " AND s.generation = (SELECT generation FROM subscriber_lists WHERE name = ?)"
            " AND s.key = d.recipient"
            # 'pending' written out: a partial index on it is usable only so (a batch's rows).
            f" WHERE d.issue_id = ? AND d.status = 'pending' AND d.recipient > ?{held}"
            " ORDER BY d.recipient LIMIT ?",
            (list_name, list_name, list_name, issue_id, after, *held_by, limit),
        ).fetchall()
        return [
            Pending(
                r["recipient"],
                r["attempts"],
                subscriber_row(r) if r["email"] is not None else None,
                bool(r["suppressed"]),
            )
            for r in rows
        ]

    def finish_issue_if_done(self, issue_id: int) -> bool:
        cur = self.execute(
            "UPDATE issues SET status = ? WHERE id = ? AND NOT EXISTS"
            " (SELECT 1 FROM deliveries WHERE issue_id = ? AND status = ?)",
            (IssueStatus.COMPLETE, issue_id, issue_id, DeliveryStatus.PENDING),
        )
        return cur.rowcount > 0

    def delivery_counts(self, issue_id: int) -> DeliveryCounts:
        rows = self.execute(
            "SELECT status, COUNT(*) AS n, COUNT(claimed_by) AS held,"
            " SUM(CASE WHEN claimed_by IS NULL AND attempts = 0 THEN 1 ELSE 0 END) AS fresh"
            " FROM deliveries WHERE issue_id = ? GROUP BY status",
            (issue_id,),
        ).fetchall()
        counts = {DeliveryStatus(r["status"]).value: int(r["n"]) for r in rows}
        pending = [r for r in rows if r["status"] == DeliveryStatus.PENDING.value]
        held, fresh = (int(pending[0]["held"]), int(pending[0]["fresh"])) if pending else (0, 0)
        return DeliveryCounts(**counts, held=held, fresh=fresh)

    def recent_sends(self, issue_id: int, since: datetime) -> int:
        row = self.execute(
            "SELECT COUNT(*) AS n FROM deliveries WHERE issue_id = ? AND status = ? AND updated_at >= ?",
            (issue_id, DeliveryStatus.SENT, iso(since)),
        ).fetchone()
        return int(row["n"])

    def suppress(self, list_name: str, address: str, source: str) -> bool:
        """Record an unsubscribe; False when the address was already suppressed."""
        cur = self.execute(
            "INSERT INTO suppressions (list_name, address, created_at, source) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (list_name, address.lower(), iso(now()), source),
        )
        return cur.rowcount > 0

    def suppressed(self, list_name: str) -> list[Suppression]:
        rows = self.execute(
            "SELECT address, created_at, source FROM suppressions WHERE list_name = ? ORDER BY address",
            (list_name,),
        ).fetchall()
        return [Suppression(r["address"], datetime.fromisoformat(r["created_at"]), r["source"]) for r in rows]

    def queue_post(self, target: str, item_id: str, schedule: str, kind: PostKind, ref: int) -> int:
        stamp = iso(now())
        cur = self.execute(
            "INSERT INTO posts (target, item_id, schedule, kind, ref, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (target, item_id, schedule, kind, ref, PostStatus.PENDING, stamp, stamp),
        )
        return cur.rowcount

    def record_post(
        self, target: str, item_id: str, status: PostStatus, error: str = "", location: str = ""
    ) -> None:
        self.execute(
            "UPDATE posts SET status = ?, attempts = attempts + 1, last_error = ?, location = ?,"
            " updated_at = ? WHERE target = ? AND item_id = ?",
            (status, error, location, iso(now()), target, item_id),
        )

    def post_counts(self, target: str, schedule: str) -> PostCounts:
        rows = self.execute(
            "SELECT status, COUNT(*) AS n FROM posts WHERE target = ? AND schedule = ? GROUP BY status",
            (target, schedule),
        ).fetchall()
        return PostCounts(**{PostStatus(r["status"]).value: r["n"] for r in rows})

    def disable_target(self, name: str, reason: str, fingerprint: str) -> None:
        self.execute(
            "INSERT INTO targets (name, reason, fingerprint, disabled_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET reason = excluded.reason,"
            " fingerprint = excluded.fingerprint, disabled_at = excluded.disabled_at",
            (name, reason, fingerprint, iso(now())),
        )

    def disabled_target(self, name: str) -> DisabledTarget | None:
        row = self.execute("SELECT reason, fingerprint FROM targets WHERE name = ?", (name,)).fetchone()
        return DisabledTarget(str(row["reason"]), str(row["fingerprint"])) if row else None

    def enable_target(self, name: str) -> None:
        self.execute("DELETE FROM targets WHERE name = ?", (name,))

    def acquire_lock(self, name: str, owner: str, ttl: float, *, dead: str | None = None) -> str | None:
        """Take the lock, or return who holds it. A lock past its ``ttl`` is free; one held by
        ``dead`` (a holder the caller found gone) is taken over if that one still holds it.
        Expiry is by the database's clock: hosts whose clocks disagree agree on it."""
        stamp = self.db_now()
        with self.transaction():
            row = self.execute("SELECT owner, expires_at FROM locks WHERE name = ?", (name,)).fetchone()
            if (
                row
                and row["owner"] not in (owner, dead)
                and datetime.fromisoformat(row["expires_at"]) > stamp
            ):
                return str(row["owner"])
            self.execute(
                "INSERT INTO locks (name, owner, acquired_at, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                (name, owner, iso(stamp), iso(stamp + timedelta(seconds=ttl))),
            )
            return None

    def refresh_lock(self, name: str, owner: str, ttl: float) -> None:
        self.execute(
            "UPDATE locks SET expires_at = ? WHERE name = ? AND owner = ?",
            (iso(self.db_now() + timedelta(seconds=ttl)), name, owner),
        )

    def release_lock(self, name: str, owner: str) -> None:
        self.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))


class Staging:
    """The new copy of a list, in the connection's temporary ``subscriber_staging`` (in
    ``schema``: SQLite's ``temp``, PostgreSQL's ``pg_temp``): ``storage.SubscriberStaging``."""

    def __init__(self, store: SharedSql, schema: str, list_name: str, previous: int | None) -> None:
        self.store, self.table = store, f"{schema}.subscriber_staging"
        self.list_name, self.previous = list_name, previous

    def checked(self, raw: str) -> str | None:
        """The checked address ``raw`` became in the previous copy, so it is not checked twice."""
        if self.previous is None:
            return None
        row = self.store.execute(
            "SELECT email FROM subscribers WHERE list_name = ? AND generation = ? AND raw = ?",
            (self.list_name, self.previous, raw),
        ).fetchone()
        return str(row["email"]) if row else None

    def add(self, row: SubscriberRow) -> int | None:
        """Add a subscriber; if the address is already in this copy, the line it is on."""
        sub = row.subscriber
        cur = self.store.execute(
            f"INSERT INTO {self.table} (key, email, raw, name, fields, line)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (sub.key, sub.email, row.raw, sub.name, json.dumps(sub.fields), row.line),
        )
        if cur.rowcount:
            return None
        first = self.store.execute(f"SELECT line FROM {self.table} WHERE key = ?", (sub.key,)).fetchone()
        assert first is not None  # the conflict was with this very row
        return int(first["line"])
