"""The plain data the pipeline passes around, and the statuses it records.

At the bottom of the import graph: it imports nothing of the package (stdlib only), so the
store, the fetcher, the renderer and the senders share these types without importing each
other, and a second store backend returns exactly these. Statuses are ``StrEnum``s: they are
stored as their values and compare equal to them, so the database keeps its plain strings.
Rows are frozen where nothing updates them after they are read; the two pairs that callers
unpack (a list's counts, a listed subscriber) are named tuples.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple


def now() -> datetime:
    """The clock every stamp is taken from: aware, in UTC."""
    return datetime.now(UTC)


# -- statuses ----------------------------------------------------------------------------------


class FetchStatus(enum.StrEnum):
    OK = "ok"
    NOT_MODIFIED = "not-modified"
    ERROR = "error"


class IssueStatus(enum.StrEnum):
    DRAFT = "draft"  # built for a look (preview, check), never recorded
    SENDING = "sending"  # recorded; deliveries still pending
    COMPLETE = "complete"  # no delivery pending any more


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # for good: refused permanently, or out of attempts
    SKIPPED = "skipped"  # unsubscribed, or no longer in the list


class PostStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class PostKind(enum.StrEnum):
    ARTICLE = "article"  # a post's ref is an entry id
    ISSUE = "issue"  # a post's ref is an issue id


# -- feeds and entries ---------------------------------------------------------------------------

# RSS <ttl> is minutes. Below a minute is no ask at all; above a week is a typo or an attack
# (a 20-digit value overflows SQLite and timedelta), and a weekly digest must see its feeds
# at least weekly. The same bounds apply to what an older version stored.
TTL_MIN, TTL_MAX = 1, 7 * 24 * 60


def clamp_ttl(minutes: object) -> int | None:
    """A ttl in minutes within [TTL_MIN, TTL_MAX], or None when there is none."""
    if isinstance(minutes, str):
        text = minutes.strip()
        # "²".isdigit() is True but int("²") fails: only ASCII digits are a number here.
        if not (text.isascii() and text.isdigit()):
            return None
        minutes = int(text)
    if isinstance(minutes, bool) or not isinstance(minutes, int):
        return None
    return max(TTL_MIN, min(TTL_MAX, minutes))


@dataclass
class FeedEntry:
    key: str  # stable identity within its feed: id/guid, else link, else a content hash
    title: str
    link: str
    summary_html: str  # as the feed gave it; sanitised at render time
    author: str = ""
    published: datetime | None = None
    image_url: str = ""
    categories: list[str] = field(default_factory=list)


@dataclass
class FeedState:
    """What the store remembers about a feed between fetches."""

    url: str
    fetch_url: str | None = None  # after a permanent redirect
    etag: str | None = None
    last_modified: str | None = None


@dataclass
class FetchResult:
    url: str
    status: FetchStatus
    entries: list[FeedEntry] = field(default_factory=list)
    title: str = ""
    link: str = ""
    etag: str | None = None
    last_modified: str | None = None
    fetch_url: str | None = None
    error: str = ""
    warning: str = ""
    ttl: int | None = None  # minutes, from RSS <ttl>: how long the publisher asks us to wait


@dataclass(frozen=True)
class FeedRow:
    """A feed as the store knows it: its title and link, and its health for ``status``."""

    url: str
    title: str | None = None
    link: str | None = None
    fetch_url: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    last_checked: str | None = None  # ISO 8601, UTC
    last_ok: str | None = None
    last_status: FetchStatus | None = None  # None: never fetched
    last_error: str | None = None
    consecutive_errors: int = 0
    error_count: int = 0
    ttl: int | None = None  # minutes, within [TTL_MIN, TTL_MAX]


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


# -- issues and the ledger -----------------------------------------------------------------------


@dataclass
class Issue:
    id: int  # 0 for a draft
    schedule: str
    number: int
    created_at: datetime
    status: IssueStatus
    entry_ids: list[int]
    subject: str
    payload: dict[str, Any]  # the rendered issue, so a resumed send is identical


@dataclass(frozen=True)
class Subscriber:
    email: str
    name: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The ledger key: one email per address, whatever its case."""
        return self.email.lower()


@dataclass(frozen=True)
class Pending:
    """A delivery still to be made, with the subscriber as the list has them now."""

    recipient: str
    attempts: int
    subscriber: Subscriber | None  # None: no longer in the list
    suppressed: bool


@dataclass(frozen=True)
class Batch:
    """A batch of an issue's deliveries claimed by one process, as the database sees it now."""

    id: str  # host:pid:nonce, what its marks are fenced by
    issue_id: int
    host: str
    pid: int
    size: int  # rows claimed
    sent: int  # of them, marked sent
    age: float  # seconds since the claim, by the database's clock
    lease_left: float  # seconds until the rows are anyone's again (negative: expired)


@dataclass(frozen=True)
class DeliveryCounts:
    sent: int = 0
    pending: int = 0
    failed: int = 0
    skipped: int = 0
    held: int = 0  # of the pending, those a batch holds now (some process is sending them)
    fresh: int = 0  # of the pending, those nobody holds and nobody has tried yet


# -- subscriber lists and suppressions -----------------------------------------------------------


@dataclass(frozen=True)
class SubscriberRow:
    """One checked row of a list file, as a new copy of the list is written."""

    subscriber: Subscriber
    raw: str  # the address as the file has it, so an unchanged one is not checked again
    line: int


@dataclass(frozen=True)
class ListSource:
    """Which file the stored copy of a list was read from, and what was wrong in it."""

    fingerprint: str
    problems: list[str]


class SubscriberCounts(NamedTuple):
    total: int  # addresses in the list
    active: int  # of them, not unsubscribed


class ListedSubscriber(NamedTuple):
    subscriber: Subscriber
    suppressed: bool  # unsubscribed: still in the file, gets no email


@dataclass(frozen=True)
class Suppression:
    address: str  # lower-cased
    created_at: datetime
    source: str  # how: one-click, page, cli


# -- posts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingPost:
    item_id: str  # the webhook-id / Idempotency-Key the target sees
    kind: PostKind
    ref: int  # an entry id or an issue id, after ``kind``
    attempts: int


@dataclass(frozen=True)
class PostCounts:
    sent: int = 0
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True)
class DisabledTarget:
    reason: str  # 410 Gone, bad credentials
    fingerprint: str  # of the target's configuration when it was switched off
