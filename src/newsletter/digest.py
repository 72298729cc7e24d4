"""The pipeline: fetch feeds, build the next issue, deliver it through the ledger.

Order of a ``send-digest`` run: fetch; finish any unfinished issue of the schedule; build the
next issue from entries first seen since the last one; deliver it. Each delivery is committed
as soon as its outcome is known, so a rerun after a crash carries on where the last one died.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parseaddr
from typing import TYPE_CHECKING

from .config import Config, FetchSettings, Schedule
from .errors import ConfigError, DeliveryError, PermanentFailure, StoreError, TemporaryFailure
from .feeds import fetch_all, first_fetch_history
from .locks import ScheduleLock
from .message import Recipient, Skeleton
from .model import (
    DeliveryCounts,
    DeliveryStatus,
    FeedRow,
    FetchResult,
    FetchStatus,
    Issue,
    IssueStatus,
    Pending,
    StoredEntry,
    Subscriber,
    now,
)
from .redact import redact
from .sanitize import one_line, web_link
from .schedule import zone
from .senders import Outgoing, Sender
from .senders.file import FileOptions, FileSender
from .store import Store
from .subscribers import SubscriberList, sync
from .tokens import UnsubscribeTokens

if TYPE_CHECKING:
    from .render import RenderedIssue, Section
    from .social import PostReport

# Rendering and sharing (Jinja2, premailer, the share rules) are imported where they are used:
# a run that finds nothing new, the commonest run, never loads them.

Progress = Callable[[int], None]  # called with how many messages were just handled


@dataclass
class FeedReport:
    url: str
    status: FetchStatus
    new: int = 0
    error: str = ""
    warning: str = ""


@dataclass
class IssueReport:
    number: int
    subject: str
    articles: int
    html_bytes: int
    sent: int = 0
    failed: int = 0
    pending: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (recipient, server reply)
    complete: bool = False
    stopped: str = ""  # why the send of this issue stopped part-way


@dataclass
class DigestReport:
    schedule: str
    feeds: list[FeedReport] = field(default_factory=list)
    issues: list[IssueReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aborted: str = ""  # the sender could not go on; everything undelivered stays pending
    outbox: str = ""  # where a dry run put its messages
    posts: list[PostReport] = field(default_factory=list)  # issue announcements

    @property
    def ok(self) -> bool:
        return not self.aborted and not any(i.failed or i.pending for i in self.issues)


def fetch(
    config: Config, store: Store, names: list[str] | None = None, settings: FetchSettings | None = None
) -> list[FeedReport]:
    """Poll the feeds of the named schedules (all by default) and store new entries."""
    urls: list[str] = []
    for name in names or list(config.schedules):
        for feed in config.schedule(name).feeds:
            url = config.feed_url(feed)
            if url not in urls:
                urls.append(url)
    fs = settings or config.settings.fetch
    reports = []
    for result in fetch_all([store.feed_state(u) for u in urls], fs):
        reports.append(record_feed(store, result, fs))
    return reports


def record_feed(store: Store, result: FetchResult, fs: FetchSettings) -> FeedReport:
    """Store one feed's fetch in its own transaction: what one feed's data breaks is its own
    error, and the other feeds are stored all the same."""
    # Which entries are history if this is the feed's first fetch; the store knows if it is.
    history = first_fetch_history(result.entries, fs.first_fetch_newest, fs.first_fetch_days)
    try:
        new = store.record_fetch(result, history)
    except StoreError:
        raise  # the database itself is unusable: no feed can be stored, say so once
    except Exception as exc:
        cause = f"{exc.__class__.__name__}: {one_line(str(exc))}"
        error = redact(f"{result.url}: cannot store what the feed sent: {cause}")
        failed = FetchResult(result.url, FetchStatus.ERROR, error=error, fetch_url=result.fetch_url)
        with contextlib.suppress(Exception):
            store.record_fetch(failed)  # for `status`
        return FeedReport(result.url, FetchStatus.ERROR, 0, error)
    return FeedReport(result.url, result.status, new, result.error, result.warning)


def _list_id(name: str, schedule: Schedule) -> str:
    if schedule.list_id:
        return schedule.list_id
    domain = parseaddr(schedule.from_)[1].rpartition("@")[2] or "localhost"
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', name).strip('-').lower()}.{domain}"


class _Run:
    """One send-digest run of one schedule: what every step needs, worked out once."""

    def __init__(
        self, config: Config, store: Store, name: str, progress: Progress | None, *, sync_list: bool = True
    ) -> None:
        self.config, self.store, self.name = config, store, name
        self.schedule = config.schedule(name)
        self.progress = progress
        self.list_name = self.schedule.subscribers
        path = config.subscribers_path(self.schedule)
        if sync_list:
            self.subscribers: SubscriberList = sync(store, self.list_name, path)
        else:
            # Read-only callers (archive, preview, status) use the copy the last send read: a
            # CSV broken since then must not take the archive down, and a look writes nothing.
            cached = store.subscriber_source(self.list_name)
            self.subscribers = SubscriberList(self.list_name, path, cached.problems if cached else [])
        secret = os.environ.get("NEWSLETTER_SECRET") or store.secret("unsubscribe")
        self.tokens = UnsubscribeTokens(secret)
        self.feed_urls = [config.feed_url(f) for f in self.schedule.feeds]
        self.stop: threading.Event | None = None

    def recipient(self, sub: Subscriber) -> Recipient:
        token = self.tokens.make(self.schedule.subscribers, sub.email)
        values = {
            **sub.fields,
            "email": sub.email,
            "name": sub.name,
            "unsubscribe_url": self.schedule.unsubscribe_url.replace("{token}", token),
        }
        return Recipient(sub.email, sub.name, values)

    def skeleton(self, issue: Issue) -> Skeleton:
        from .render import RenderedIssue

        payload = dict(issue.payload)
        # The issue's date is what its text says; each message's Date header is stamped when it
        # is built for sending, so a retry hours later does not look backdated.
        payload.pop("date")
        return Skeleton(
            RenderedIssue.from_payload(payload),
            from_addr=self.schedule.from_,
            reply_to=self.schedule.reply_to,
            list_id=_list_id(self.name, self.schedule),
            list_name=self.schedule.title or self.name,
            id_seed=f"{self.name}:{issue.number}:{issue.created_at.isoformat()}",
        )

    def sections(self, entries: list[StoredEntry], number: int = 0) -> list[Section]:
        from . import social
        from .render import Section, article

        titles = {f.url: (f.title or "", f.link or "") for f in self.store.feeds(self.feed_urls)}
        sections: dict[str, Section] = {}
        for e in entries:
            title, link = titles.get(e.feed_url, ("", ""))
            if e.feed_url not in sections:
                sections[e.feed_url] = Section(title or e.feed_url, web_link(link))
            item = article(e, title, self.schedule.excerpt_chars)
            social.decorate(item, self.schedule, self.name, number)
            sections[e.feed_url].articles.append(item)
        return list(sections.values())

    def render(self, entries: list[StoredEntry], number: int, date: datetime) -> RenderedIssue:
        from .render import render_issue

        return render_issue(
            templates_dir=self.config.templates_dir,
            title=self.schedule.title or self.name,
            subject_template=self.schedule.subject,
            number=number,
            date=date,
            sections=self.sections(entries, number),
        )

    def build_issue(self, force: bool, ledger: bool = True) -> Issue | None:
        """Record the next issue; with ``ledger=False`` (a test send) it gets no deliveries."""
        if ledger and not self.store.subscriber_counts(self.list_name)[1]:
            # Building would use up the new entries with no one to read them.
            raise ConfigError(
                f"{self.subscribers.path}: no valid, subscribed addresses; no issue built",
                hint="add rows with an email column, or fix the ones reported above",
            )
        draft = self.draft(force)
        if draft is None:
            return None
        issue, watermark = draft
        return self.store.create_issue(
            self.name,
            watermark=watermark,
            entry_ids=issue.entry_ids,
            subject=issue.subject,
            payload=issue.payload,
            list_name=self.list_name if ledger else None,
        )

    def draft(self, force: bool) -> tuple[Issue, int] | None:
        """The next issue, rendered but not recorded (id 0), and the entry watermark it covers.

        The preview shows exactly this, so what it shows is what a send would send.
        """
        up_to = self.store.max_entry_id()
        limit = self.schedule.max_articles
        entries = self.store.new_entries(self.feed_urls, self.store.watermark(self.name), up_to, limit)
        if not entries and force:
            entries = self.store.new_entries(self.feed_urls, 0, up_to, limit)
        if not entries:
            return None
        last = self.store.issues(self.name, 1)
        date = now()
        number = (last[0].number if last else 0) + 1
        rendered = self.render(entries, number, date)
        payload = {**rendered.to_payload(), "date": date.isoformat()}
        ids = [e.id for e in entries]
        issue = Issue(0, self.name, number, date, IssueStatus.DRAFT, ids, rendered.subject, payload)
        return issue, up_to

    def pending(self, issue: Issue) -> Iterator[Pending]:
        """Every delivery of the issue still to be made, fetched a page at a time."""
        after = ""
        while page := self.store.pending(issue.id, self.list_name, after):
            yield from page
            after = page[-1].recipient

    def deliver(self, issue: Issue, sender: Sender) -> IssueReport:
        skeleton = self.skeleton(issue)
        report = IssueReport(
            issue.number, issue.subject, len(issue.entry_ids), len(issue.payload["html"].encode())
        )
        label = f"{self.name}-{issue.number}"
        for item in self.pending(issue):
            if self.stop is not None and self.stop.is_set():
                break
            key, attempts, sub = item.recipient, item.attempts, item.subscriber
            # Unsubscribed addresses are skipped even while they are still in the CSV.
            if sub is None or item.suppressed:
                why = "unsubscribed" if item.suppressed else f"not in {self.subscribers.path.name}"
                self.store.skip_delivery(issue.id, key, why)
                report.skipped += 1
                continue
            try:
                message_id, data = skeleton.build(self.recipient(sub))
            except ValueError as exc:  # a value that cannot go into a header, say
                self.store.record_delivery(
                    issue.id, key, DeliveryStatus.FAILED, f"cannot build the message: {exc}"
                )
                report.errors.append((sub.email, f"cannot build the message: {exc}"))
                continue
            try:
                sender.send(Outgoing(skeleton.envelope_from, sub.email, message_id, data, label))
            except DeliveryError as exc:
                # The sender cannot go on: this message and the rest stay pending.
                report.stopped = f"{exc}" + (f" ({exc.hint})" if exc.hint else "")
                break
            except TemporaryFailure as exc:
                give_up = attempts + 1 >= self.schedule.max_attempts
                status = DeliveryStatus.FAILED if give_up else DeliveryStatus.PENDING
                self.store.record_delivery(issue.id, key, status, str(exc))
                report.errors.append((sub.email, str(exc)))
            except PermanentFailure as exc:
                self.store.record_delivery(issue.id, key, DeliveryStatus.FAILED, str(exc))
                report.errors.append((sub.email, str(exc)))
            else:
                self.store.record_delivery(issue.id, key, DeliveryStatus.SENT)
            if self.progress:
                self.progress(1)
        report.complete = self.store.finish_issue_if_done(issue.id)
        counts = self.store.delivery_counts(issue.id)
        report.sent, report.failed = counts.sent, counts.failed
        report.pending, report.skipped = counts.pending, counts.skipped
        return report


def send_digest(
    config: Config,
    store: Store,
    name: str,
    *,
    dry_run: bool = False,
    to: str | None = None,
    force: bool = False,
    fetch_feeds: bool = True,
    fetch_timeout: float | None = None,
    build: bool = True,
    wait: float = 0.0,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    on_issue: Callable[[int], None] | None = None,
) -> DigestReport:
    """Fetch, finish unfinished issues, build and deliver the next one.

    ``dry_run`` writes every message to the outbox and changes no state; ``to`` sends the next
    issue to one address through the schedule's sender, outside the ledger. The daemon passes
    ``fetch_timeout`` (a feed slower than that is used as stored, and named in ``feeds``),
    ``build=False`` for its retry runs, and ``stop``, which ends the send between two
    messages, the rest left pending.
    Another process sending the same schedule is waited for ``wait`` seconds, then BusyError.
    ``on_issue`` is told how many messages an issue is about to send (for a progress bar).
    """
    if dry_run or to:
        if not os.environ.get("NEWSLETTER_SECRET"):
            # The one thing kept: the install's secret, so a test copy's unsubscribe link works.
            store.secret("unsubscribe")
        with store.rolled_back():
            run = _Run(config, store, name, progress)  # its copy of the list is rolled back too
            report = DigestReport(name, warnings=list(run.subscribers.problems))
            if fetch_feeds:
                report.feeds = fetch(config, store, [name])
            _preview(run, report, force, to)
        return report
    run = _Run(config, store, name, progress)
    run.stop = stop
    report = DigestReport(name, warnings=list(run.subscribers.problems))
    if fetch_feeds:
        # Fetching needs no lock: entries are keyed, and a second process only finds them known.
        fs = config.settings.fetch
        if fetch_timeout is not None:
            fs = fs.model_copy(update={"timeout": min(fs.timeout, fetch_timeout)})
        report.feeds = fetch(config, store, [name], fs)
    with ScheduleLock(config.database_url, store, name, wait, stop):
        if build:
            store.set_last_run(name, now())
        issues = store.unfinished_issues(name)
        built = run.build_issue(force) if build else None
        if built is not None:
            _warn_clip(run, report, built)
            issues.append(built)
            from . import social

            social.queue_issue(config, store, name, built.number, built.id)
        _deliver_all(run, report, config.sender(run.schedule.sender), issues, on_issue)
        if any(t.each == "issue" for t in run.schedule.post):
            from . import social

            report.posts = social.post_pending(config, store, name)
    return report


def _deliver_all(
    run: _Run,
    report: DigestReport,
    sender: Sender,
    issues: list[Issue],
    on_issue: Callable[[int], None] | None,
) -> None:
    work = [(issue, run.store.delivery_counts(issue.id).pending) for issue in issues]
    if not any(pending for _, pending in work):
        report.issues += [run.deliver(issue, sender) for issue, _ in work]
        return
    # The sender is opened only when there is something to send: "nothing new" needs no
    # mail server, and a server that is down leaves the built issue pending for the next run.
    try:
        with sender:
            for issue, pending in work:
                if on_issue:
                    on_issue(pending)
                item = run.deliver(issue, sender)
                report.issues.append(item)
                if item.stopped:
                    report.aborted = item.stopped
                    break
                if run.stop is not None and run.stop.is_set():
                    report.aborted = "stopped; undelivered messages stay pending for the next run"
                    break
    except DeliveryError as exc:
        report.aborted = f"{exc}" + (f" ({exc.hint})" if exc.hint else "")


def _preview(run: _Run, report: DigestReport, force: bool, to: str | None) -> None:
    """--dry-run and --to: run inside a transaction that is rolled back afterwards."""
    if to:
        _test_send(run, report, run.config.sender(run.schedule.sender), to, force)
        return
    outbox = run.config.outbox / "dry-run"
    report.outbox = str(outbox)
    sender = FileSender("dry-run", FileOptions(path=str(outbox)), run.config.base_dir)
    issues = run.store.unfinished_issues(run.name)
    built = run.build_issue(force)
    if built is not None:
        _warn_clip(run, report, built)
        issues.append(built)
    _deliver_all(run, report, sender, issues, None)


def _warn_clip(run: _Run, report: DigestReport, issue: Issue) -> None:
    size = len(issue.payload["html"].encode())
    if size > 102 * 1024:
        report.warnings.append(
            f"issue #{issue.number} HTML is {size / 1024:.0f} KB: Gmail clips messages over 102 KB"
            f" (lower max_articles, now {run.schedule.max_articles}, or excerpt_chars)"
        )


def _test_send(run: _Run, report: DigestReport, sender: Sender, to: str, force: bool) -> None:
    issue = run.build_issue(force, ledger=False)
    if issue is None:
        return
    _warn_clip(run, report, issue)
    sub = run.store.subscriber(run.list_name, to) or Subscriber(to)
    skeleton = run.skeleton(issue)
    message_id, data = skeleton.build(run.recipient(sub))
    item = IssueReport(issue.number, issue.subject, len(issue.entry_ids), len(issue.payload["html"].encode()))
    try:
        with sender:
            sender.send(Outgoing(skeleton.envelope_from, to, message_id, data, f"{run.name}-test"))
        item.sent = 1
    except (TemporaryFailure, PermanentFailure) as exc:
        item.failed = 1
        item.errors.append((to, str(exc)))
    except DeliveryError as exc:
        report.aborted = f"{exc}"
    report.issues.append(item)


@dataclass
class CheckResult:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(config: Config, store: Store) -> CheckResult:
    """Subscriber lists and templates of every schedule; the size of the issue they make now."""
    result = CheckResult()
    for name in config.schedules:
        run = _Run(config, store, name, None)
        result.warnings += run.subscribers.problems
        latest = store.new_entries(run.feed_urls, 0, store.max_entry_id(), run.schedule.max_articles)
        size = ""
        if latest:
            rendered = run.render(latest, 1, now())
            size = f"; an issue of the latest {len(latest)} entries is {rendered.html_bytes / 1024:.0f} KB"
            if rendered.clipped:
                result.warnings.append(
                    f"schedules.{name}: an issue of {len(latest)} entries is"
                    f" {rendered.html_bytes / 1024:.0f} KB of HTML, over Gmail's 102 KB clip line"
                    " (lower max_articles or excerpt_chars)"
                )
        result.lines.append(
            f"{name}: {store.subscriber_counts(run.list_name)[0]} subscriber(s),"
            f" {len(run.feed_urls)} feed(s), sender {run.schedule.sender!r}{size}"
        )
    return result


@dataclass
class ScheduleStatus:
    name: str
    subscribers: int
    waiting: int
    issues: list[tuple[Issue, DeliveryCounts]]
    feeds: list[FeedRow]
    next_run: datetime | None  # None: sent by hand only (no ``when:``)
    retries: int  # deliveries a server deferred, waiting for the next run


def _local(when: datetime | None, config: Config, name: str) -> datetime | None:
    tz = zone(config.schedule(name).timezone or config.settings.timezone)
    return when.astimezone(tz) if when else None


def schedule_status(config: Config, store: Store, name: str, last: int = 5) -> ScheduleStatus:
    run = _Run(config, store, name, None, sync_list=False)
    waiting = store.new_entries(run.feed_urls, store.watermark(name), store.max_entry_id(), 10_000)
    trigger = config.trigger(name)
    return ScheduleStatus(
        name,
        store.subscriber_counts(run.list_name)[0],
        len(waiting),
        [(i, store.delivery_counts(i.id)) for i in store.issues(name, last)],
        store.feeds(run.feed_urls),
        _local(trigger.get_next_fire_time(None, now()), config, name) if trigger else None,
        sum(store.delivery_counts(i.id).pending for i in store.unfinished_issues(name)),
    )
