"""What the pipeline asks of the state database: the methods every store backend implements.

``newsletter.store`` is the SQLite backend; a PostgreSQL one implements this same Protocol
and follows the same numbered migrations. Everything goes in and comes out as ``model``
types. The store keeps no policy: which entries of a first fetch are history, whether a
lock's holder is still alive, when a disabled target comes back on are the caller's to say.

Writes are committed one statement at a time unless inside ``transaction()``: a delivery's
result is on disk the moment it is known, so a killed process loses at most the one message
in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol, Self

from .model import (
    Batch,
    DeliveryCounts,
    DeliveryStatus,
    DisabledTarget,
    FeedRow,
    FeedState,
    FetchResult,
    Issue,
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
)


class SubscriberStaging(Protocol):
    """A new copy of a list being written, inside ``Storage.replace_subscribers``."""

    def checked(self, raw: str) -> str | None:
        """The address ``raw`` was checked into for the previous copy (None: check it)."""
        ...

    def add(self, row: SubscriberRow) -> int | None:
        """Add a row; if its address is already in this copy, the line it is on."""
        ...


# Reads a list file into the staging copy and returns the problems found in it.
ListReader = Callable[[SubscriberStaging], list[str]]


class Storage(Protocol):
    # -- the connection and its transactions ----------------------------------------------------

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def transaction(self, write: bool = True, serial: bool = True) -> AbstractContextManager[None]:
        """One transaction (nested ones join the outer). ``write=False``: a snapshot to read,
        no lock held on the database. ``serial=False``: a writer whose statements are safe
        beside other writers (row by row, fenced), so on PostgreSQL it does not wait for the
        one-writer-at-a-time lock; SQLite has only that one."""
        ...

    def rolled_back(self) -> AbstractContextManager[None]:
        """Run a whole pipeline and then forget it: what --dry-run and --to use."""
        ...

    # -- meta ------------------------------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A per-installation random secret, made on first use."""
        ...

    def pending_migrations(self) -> list[str]:
        """Schema migrations this database still lacks (``NNNN_name``): PostgreSQL is migrated
        by ``newsletter db migrate``; SQLite migrates as it opens, so it has none."""
        ...

    def meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def last_run(self, schedule: str) -> datetime | None: ...

    def set_last_run(self, schedule: str, when: datetime) -> None: ...

    # -- feeds and entries -----------------------------------------------------------------------

    def feed_state(self, url: str) -> FeedState: ...

    def record_fetch(self, result: FetchResult, history: Collection[int] = ()) -> int:
        """Store a fetch's outcome and its new entries; return how many are new (to mail).

        ``history``: indexes into ``result.entries`` that are history if this is the feed's
        first successful fetch: stored, never mailed. Ignored on any later fetch."""
        ...

    def feeds(self, urls: Iterable[str] | None = None) -> list[FeedRow]:
        """The feeds known (those of ``urls`` only, if given), by URL."""
        ...

    def new_entries(
        self, feed_urls: list[str], after_id: int, up_to_id: int, limit: int
    ) -> list[StoredEntry]:
        """Entries with after_id < id <= up_to_id that are not history, newest first."""
        ...

    def entries(self, ids: list[int]) -> list[StoredEntry]:
        """The entries of ``ids`` still stored, in that order."""
        ...

    def max_entry_id(self) -> int: ...

    # -- issues and the ledger -------------------------------------------------------------------

    def watermark(self, schedule: str) -> int:
        """The last entry id any issue of the schedule considered."""
        ...

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
        """Record an issue and, all or nothing, a pending delivery per active subscriber of
        ``list_name`` (none for a test send: ``list_name=None``)."""
        ...

    def issue_by_id(self, issue_id: int) -> Issue | None: ...

    def issue(self, schedule: str, number: int) -> Issue | None:
        """Issue ``number`` of the schedule, as it was recorded."""
        ...

    def issues(self, schedule: str, limit: int = 5) -> list[Issue]:
        """The latest issues of the schedule, newest first."""
        ...

    def unfinished_issues(self, schedule: str) -> list[Issue]: ...

    def pending(
        self, issue_id: int, list_name: str, after: str = "", limit: int = 500, batch: str | None = None
    ) -> list[Pending]:
        """The next ``limit`` deliveries still to be made, in recipient order after ``after``;
        with ``batch``, only the rows that batch holds."""
        ...

    def record_delivery(
        self, issue_id: int, recipient: str, status: DeliveryStatus, error: str = "", batch: str | None = None
    ) -> bool:
        """One attempt's outcome, committed at once (outside a transaction). With ``batch``
        only while the batch still holds the row: False when it does not (nothing written)."""
        ...

    def record_deliveries(
        self, issue_id: int, outcomes: Sequence[tuple[str, DeliveryStatus, str, str]]
    ) -> list[bool]:
        """Outcomes that came together, ``(recipient, status, error, batch)`` each, in one
        statement; each written only while its batch holds the row: whether it was."""
        ...

    def skip_delivery(self, issue_id: int, recipient: str, reason: str, batch: str | None = None) -> None:
        """A pending delivery that will not be made (with ``batch``: while it holds the row)."""
        ...

    def finish_issue_if_done(self, issue_id: int) -> bool:
        """Mark the issue complete if no delivery is pending; whether it now is."""
        ...

    def delivery_counts(self, issue_id: int) -> DeliveryCounts: ...

    def recent_sends(self, issue_id: int, since: datetime) -> int:
        """Deliveries of the issue marked sent at ``since`` or later: a running send's rate."""
        ...

    # -- subscriber lists ------------------------------------------------------------------------

    def subscriber_source(self, list_name: str) -> ListSource | None:
        """Which file the stored copy was read from and its problems; None if never read."""
        ...

    def replace_subscribers(self, list_name: str, source: str, reuse: bool, read: ListReader) -> list[str]:
        """Write a new copy of a list with what ``read`` adds; it replaces the old copy only
        if ``read`` returns (its problems, stored with the copy and returned).

        ``reuse``: an address checked for the previous copy is taken as it was."""
        ...

    def subscriber_counts(self, list_name: str) -> SubscriberCounts: ...

    def subscriber(self, list_name: str, address: str) -> Subscriber | None: ...

    def subscribers(self, list_name: str, page: int = 500) -> Iterator[ListedSubscriber]:
        """The list in file order, read ``page`` rows at a time."""
        ...

    def subscriber_fields(self, list_name: str) -> list[str]:
        """Every extra column any subscriber of the list has, sorted."""
        ...

    # -- suppressions: addresses that unsubscribed stay unsubscribed -----------------------------

    def suppress(self, list_name: str, address: str, source: str) -> bool:
        """Record an unsubscribe; False when the address was already suppressed."""
        ...

    def suppressed(self, list_name: str) -> list[Suppression]:
        """The list's unsubscribed addresses, by address."""
        ...

    # -- webhook posts ---------------------------------------------------------------------------

    def queue_post(self, target: str, item_id: str, schedule: str, kind: PostKind, ref: int) -> int:
        """Record a pending post unless it is known; how many were new (0 or 1)."""
        ...

    def pending_posts(self, target: str, schedule: str) -> list[PendingPost]:
        """Posts still to make, oldest first."""
        ...

    def record_post(
        self, target: str, item_id: str, status: PostStatus, error: str = "", location: str = ""
    ) -> None: ...

    def post_counts(self, target: str, schedule: str) -> PostCounts: ...

    def disable_target(self, name: str, reason: str, fingerprint: str) -> None: ...

    def disabled_target(self, name: str) -> DisabledTarget | None:
        """Why and under which configuration the target was switched off, if it was."""
        ...

    def enable_target(self, name: str) -> None: ...

    # -- locks: one run of a schedule at a time, across processes --------------------------------

    def acquire_lock(self, name: str, owner: str, ttl: float, *, dead: str | None = None) -> str | None:
        """Take the lock, or return who holds it. A lock past its ``ttl`` is free; one held by
        ``dead`` (a holder the caller found gone) is taken over if that one still holds it."""
        ...

    def refresh_lock(self, name: str, owner: str, ttl: float) -> None: ...

    def release_lock(self, name: str, owner: str) -> None: ...

    # -- several daemons: fires and batches (migration 0004), timed by the database's clock --

    def claim_fire(self, job: str, fire_at: datetime, host: str, keep: timedelta = ...) -> bool:
        """True for the one caller across every process on the database that fires ``job``
        due at ``fire_at``."""
        ...

    def claim_batch(
        self,
        issue_id: int,
        batch: str,
        host: str,
        pid: int,
        *,
        size: int,
        lease: float,
        after: str = "",
        fresh_only: bool = False,
    ) -> int:
        """Claim up to ``size`` pending rows nobody holds, after ``after``; how many."""
        ...

    def renew_batch(self, batch: str, lease: float, sent: int = 0) -> bool:
        """Extend the lease (and note how many it sent), run out or not; False when the
        batch was reaped."""
        ...

    def release_batch(self, batch: str) -> int:
        """The holder is done: its rows still pending are anyone's again; how many."""
        ...

    def reap_batch(self, batch: str, expired_only: bool = True) -> int:
        """Take a batch whose lease has run out (or whose holder is dead); rows freed."""
        ...

    def free_orphans(self, issue_id: int) -> int:
        """Free pending rows whose batch is gone (skipped while being written); how many."""
        ...

    def batches(self, issue_id: int | None = None) -> list[Batch]:
        """The batches held now, oldest claim first."""
        ...

    # -- sender usage: what a sender's daily quota counts, across restarts ----------------------

    def count_sent(self, sender: str, when: datetime, n: int = 1) -> None:
        """Add ``n`` messages to the UTC hour of ``when`` (timezone-aware). Inside
        ``transaction()`` it commits or rolls back with the rest, e.g. the ledger row."""
        ...

    def sent_since(self, sender: str, since: datetime) -> list[tuple[datetime, int]]:
        """The hour buckets from the one ``since`` falls in on, oldest first: (the hour's
        start in UTC, messages)."""
        ...

    def forget_usage(self, before: datetime) -> int:
        """Drop every sender's buckets of hours before the one ``before`` falls in; how many."""
        ...
