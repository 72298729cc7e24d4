"""Stored rows as ``model`` types, the one way the store writes a time, and many rows in one
statement."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..model import FeedRow, FetchStatus, Issue, IssueStatus, StoredEntry, Subscriber, clamp_ttl


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds")


def values_list(rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
    """``rows`` as a VALUES list (placeholders) and its arguments, for a statement that writes
    many rows at once (``UPDATE ... FROM (VALUES ...) AS v``, columns ``v.column1`` on).

    Not executemany: psycopg pipelines that, and until its closing sync a PostgreSQL session
    counts as busy, not idle in a transaction, so a process frozen mid-pipeline (SIGSTOP, a VM
    paused) would hold its rows' locks past the server's idle-in-transaction timeout, for ever.
    One statement reaches its sync with the same write."""
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    return ", ".join([one] * len(rows)), [value for row in rows for value in row]


def subscriber_row(row: sqlite3.Row) -> Subscriber:
    return Subscriber(row["email"], row["name"], json.loads(row["fields"]))


def feed_row(row: sqlite3.Row) -> FeedRow:
    status = row["last_status"]
    return FeedRow(
        url=row["url"],
        title=row["title"],
        link=row["link"],
        fetch_url=row["fetch_url"],
        etag=row["etag"],
        last_modified=row["last_modified"],
        last_checked=row["last_checked"],
        last_ok=row["last_ok"],
        last_status=FetchStatus(status) if status else None,
        last_error=row["last_error"],
        consecutive_errors=row["consecutive_errors"],
        error_count=row["error_count"],
        # A ttl stored before it was clamped (10**15 minutes, say) must not break every poll.
        ttl=clamp_ttl(row["ttl"]),
    )


def entry_row(row: sqlite3.Row) -> StoredEntry:
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


def issue_row(row: sqlite3.Row) -> Issue:
    return Issue(
        id=row["id"],
        schedule=row["schedule"],
        number=row["number"],
        created_at=datetime.fromisoformat(row["created_at"]),
        status=IssueStatus(row["status"]),
        entry_ids=json.loads(row["entry_ids"]),
        subject=row["subject"],
        payload=json.loads(row["payload"]),
    )
