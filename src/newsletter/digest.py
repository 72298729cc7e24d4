"""The pipeline: fetch feeds, build the next issue, deliver it through the ledger.

Order of a ``send-digest`` run: fetch; finish any unfinished issue of the schedule; build the
next issue from entries first seen since the last one; deliver it. Each delivery is committed
as soon as its outcome is known, so a rerun after a crash carries on where the last one died.
Building is ``build.IssueBuilder``'s, the loop over the ledger ``deliver.deliver``'s; this
module says in what order they run, and is the one that syncs a subscriber list.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .build import IssueBuilder
from .claims import Claims, reap
from .config import FetchSettings
from .context import RunContext
from .deliver import Attempt, Outcome, Unsendable, deliver, deliver_lanes
from .errors import ConfigError, DeliveryError, PermanentFailure, StoreError, TemporaryFailure
from .feeds import fetch_all, first_fetch_history
from .locks import ScheduleLock
from .model import (
    Batch,
    DeliveryCounts,
    DeliveryStatus,
    FeedRow,
    FetchResult,
    FetchStatus,
    Issue,
    Pending,
    Subscriber,
    now,
)
from .redact import redact
from .sanitize import one_line
from .schedule import zone
from .senders import Outgoing, Sender
from .senders.file import FileOptions, FileSender
from .storage import Storage
from .subscribers import SubscriberList, sync
from .timing import WindowHold, expected_finish, note_pause, pause_note

if TYPE_CHECKING:
    from .social import PostReport

Progress = Callable[[int], None]  # called with how many messages were just handled
RECOUNT = 1.0  # seconds between two reads of a day quota's count while sending
_STATUS = {o: DeliveryStatus(o.value) for o in Outcome}  # the ledger's word for each outcome


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
    paused: str = ""  # a send window or a quota: why the rest waits, and until when
    refused: int = 0  # outcomes not written: this process's lease had run out (it was paused)
    lost: int = 0  # batches whose lease ran out under this run: their rest went to others
    elsewhere: int = 0  # of the pending, those another process is sending now
    sent_here: int = 0  # sent by this run (``sent`` counts every process's)


@dataclass
class DigestReport:
    schedule: str
    feeds: list[FeedReport] = field(default_factory=list)
    issues: list[IssueReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aborted: str = ""  # the sender could not go on; everything undelivered stays pending
    paused: str = ""  # a send window or a quota stopped the send; it goes on by itself later
    finish: datetime | None = None  # a paused send: when all should be out, at this run's rate
    outbox: str = ""  # where a dry run put its messages
    posts: list[PostReport] = field(default_factory=list)  # issue announcements

    @property
    def ok(self) -> bool:
        # What another process is sending is not left undone.
        return not self.aborted and not any(i.failed or i.pending > i.elsewhere for i in self.issues)


def fetch(
    ctx: RunContext, names: list[str] | None = None, settings: FetchSettings | None = None
) -> list[FeedReport]:
    """Poll the feeds of the named schedules (all by default) and store new entries."""
    config, store = ctx.config, ctx.store
    urls: list[str] = []
    for name in names or list(config.schedules):
        for feed in config.schedule(name).feeds:
            url = config.feed_url(feed)
            if url not in urls:
                urls.append(url)
    fs = settings or config.settings.fetch
    return [record_feed(store, result, fs) for result in fetch_all([store.feed_state(u) for u in urls], fs)]


def record_feed(store: Storage, result: FetchResult, fs: FetchSettings) -> FeedReport:
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


@dataclass
class _Send:
    """One send-digest run of one schedule: the builder, the list as synced, how to report."""

    builder: IssueBuilder
    subscribers: SubscriberList
    progress: Progress | None

    @property
    def ctx(self) -> RunContext:
        return self.builder.ctx

    def record_issue(self, force: bool, ledger: bool = True) -> Issue | None:
        """Record the next issue; with ``ledger=False`` (a test send) it gets no deliveries."""
        b, store = self.builder, self.builder.store
        if ledger and not store.subscriber_counts(b.list_name)[1]:
            # Building would use up the new entries with no one to read them.
            raise ConfigError(
                f"{self.subscribers.path}: no valid, subscribed addresses; no issue built",
                hint="add rows with an email column, or fix the ones reported above",
            )
        draft = b.draft(force)
        if draft is None:
            return None
        issue = draft.issue
        return store.create_issue(
            b.name,
            watermark=draft.watermark,
            entry_ids=issue.entry_ids,
            subject=issue.subject,
            payload=issue.payload,
            list_name=b.list_name if ledger else None,
        )

    def deliver(self, issue: Issue, sender: Sender, fresh_only: bool = False) -> IssueReport:
        """Send this process's share of the issue: batches claimed until none is left (with
        ``fresh_only``, of deliveries never tried: what the join job helps with)."""
        b, store = self.builder, self.builder.store
        bs = self.ctx.config.settings.batches
        claims = Claims(
            store, issue.id, b.list_name, size=bs.size, lease=bs.lease.total_seconds(), fresh_only=fresh_only
        )
        try:
            report = self._deliver(issue, sender, claims)
        finally:
            claims.release()
        report.refused, report.lost = claims.refused, len(claims.lost)
        return self.counted(issue, report)

    def counted(self, issue: Issue, report: IssueReport | None = None) -> IssueReport:
        """The issue's report with its counts as the ledger has them now (every process's)."""
        store = self.builder.store
        if report is None:
            report = IssueReport(
                issue.number, issue.subject, len(issue.entry_ids), len(issue.payload["html"].encode())
            )
        report.complete = store.finish_issue_if_done(issue.id)
        reap(store, issue.id)  # what dead holders left is not "being sent by another"
        counts = store.delivery_counts(issue.id)
        report.sent, report.failed = counts.sent, counts.failed
        report.pending, report.skipped = counts.pending, counts.skipped
        report.elsewhere = counts.held  # ours are released: the batches left are others'
        return report

    def _deliver(self, issue: Issue, sender: Sender, claims: Claims) -> IssueReport:
        b, store = self.builder, self.builder.store
        skeleton = b.skeleton(issue)
        report = IssueReport(
            issue.number, issue.subject, len(issue.entry_ids), len(issue.payload["html"].encode())
        )
        label = f"{b.name}-{issue.number}"

        def prepare(item: Pending) -> Attempt | None:
            key, sub = item.recipient, item.subscriber
            claims.tick()
            if not claims.usable(key):
                return None  # its batch's lease ran out while we were away: another's now
            # Unsubscribed addresses are skipped even while they are still in the CSV.
            if sub is None or item.suppressed:
                why = "unsubscribed" if item.suppressed else f"not in {self.subscribers.path.name}"
                store.skip_delivery(issue.id, key, why, claims.batch_of(key))
                report.skipped += 1
                claims.answered(key)
                return None
            try:
                message_id, data = skeleton.build(b.recipient(sub))
            except ValueError as exc:  # a value that cannot go into a header, say
                raise Unsendable(sub.email, f"cannot build the message: {exc}") from None
            out = Outgoing(skeleton.envelope_from, sub.email, message_id, data, label, dot_safe=True)
            valid = functools.partial(claims.usable, key)
            return Attempt(lambda: sender.send(out), item.attempts, sub.email, out, valid)

        sent_now = [0, 0]  # sent since the last count_sent; sent by this run in all
        group: list[tuple[Pending, Outcome, str]] | None = None  # outcomes to write together

        def settle(done: list[tuple[Pending, Outcome, str]]) -> None:
            rows = []
            for item, outcome, error in done:
                if (held_by := claims.batch_of(item.recipient)) is not None:
                    rows.append((item.recipient, _STATUS[outcome], error, held_by))
            written = dict(zip([r[0] for r in rows], store.record_deliveries(issue.id, rows), strict=True))
            for item, outcome, _ in done:
                ok = written.get(item.recipient, False)
                if not ok:
                    claims.refused += 1  # our lease ran out: the row is another's, who sends it
                elif outcome == Outcome.SENT:
                    sent_now[0] += 1
                    sent_now[1] += 1
                claims.answered(item.recipient, ok and outcome == Outcome.SENT)

        def record(item: Pending, outcome: Outcome, error: str, where: str) -> None:
            if group is None:
                settle([(item, outcome, error)])
            else:
                group.append((item, outcome, error))

        recounted = [time.monotonic()]

        @contextlib.contextmanager
        def batch() -> Iterator[None]:
            # The outcomes that came together are written with one statement at the end, and
            # the day's count (a quota's) with the rows it counts. Fenced row by row: no need
            # to take turns with the other processes sending.
            nonlocal group
            with store.transaction(serial=False):
                group = []
                try:
                    yield
                    done = group
                finally:
                    group = None
                settle(done)
                if sent_now[0]:
                    store.count_sent(sender.name, self.ctx.clock(), sent_now[0])
                    sent_now[0] = 0
            if sender.counts_days() and time.monotonic() - recounted[0] >= RECOUNT:
                # Other processes send through this sender too: its day quota is theirs too.
                recounted[0] = time.monotonic()
                sender.recount(store.sent_since(sender.name, self.ctx.clock() - timedelta(hours=25)))

        hold = WindowHold(b.schedule.window(self.ctx.config.settings.timezone), self.ctx.clock)
        if sender.lanes():
            run = deliver_lanes(
                claims.rows(),
                prepare,
                record,
                sender,
                max_attempts=b.schedule.max_attempts,
                stop=self.ctx.stop,
                progress=self.progress,
                hold=hold,
                batch=batch,
                tick=claims.tick,  # also while every connection waits (a slow server, a quota)
            )
        else:
            run = deliver(
                claims.rows(),
                prepare,
                record,
                max_attempts=b.schedule.max_attempts,
                stop=self.ctx.stop,
                progress=self.progress,
                hold=hold,
            )
            if sent_now[0]:
                store.count_sent(sender.name, self.ctx.clock(), sent_now[0])
        report.errors += run.errors
        report.paused = run.paused
        # The sender cannot go on: this message and the rest stay pending.
        report.stopped = run.aborted or run.gone or run.unavailable or run.paused
        report.sent_here = sent_now[1]
        return report


def _start(ctx: RunContext, name: str, progress: Progress | None, reread: bool = True) -> _Send:
    builder = IssueBuilder(ctx, name)
    if reread:
        return _Send(builder, sync(ctx.store, builder.list_name, builder.list_path), progress)
    # A join, every few seconds in every daemon: the list as stored, not a hash of the file
    # each time (a build or a retry reads it, so a removal from the file still counts).
    cached = ctx.store.subscriber_source(builder.list_name)
    listed = SubscriberList(builder.list_name, builder.list_path, cached.problems if cached else [])
    return _Send(builder, listed, progress)


def send_digest(
    ctx: RunContext,
    name: str,
    *,
    dry_run: bool = False,
    to: str | None = None,
    force: bool = False,
    fetch_feeds: bool = True,
    fetch_timeout: float | None = None,
    build: bool = True,
    join: bool = False,
    wait: float = 0.0,
    progress: Progress | None = None,
    on_issue: Callable[[int], None] | None = None,
) -> DigestReport:
    """Fetch, finish unfinished issues, build and deliver the next one.

    ``dry_run`` writes every message to the outbox and changes no state; ``to`` sends the next
    issue to one address through the schedule's sender, outside the ledger. The daemon passes
    ``fetch_timeout`` (a feed slower than that is used as stored, and named in ``feeds``),
    ``build=False`` for its retry runs (``join=True`` too for its join runs, which send only
    deliveries never tried), and a context with a ``stop`` event, which ends the send between
    two messages, the rest left pending.
    Every process sending a schedule's unfinished issues shares them, batch by batch; only
    building one is one process at a time: another building it is waited for ``wait``
    seconds, then BusyError.
    ``on_issue`` is told how many messages an issue is about to send (for a progress bar).
    """
    config, store = ctx.config, ctx.store
    if dry_run or to:
        # The one thing kept: the install's secret, read (or made) before the rollback, so a
        # test copy's unsubscribe link works.
        ctx.tokens  # noqa: B018 - reading it is the point
        with store.rolled_back():
            send = _start(ctx, name, progress)  # its copy of the list is rolled back too
            report = DigestReport(name, warnings=list(send.subscribers.problems))
            if fetch_feeds:
                report.feeds = fetch(ctx, [name])
            _preview(send, report, force, to)
        return report
    send = _start(ctx, name, progress, reread=not join)
    report = DigestReport(name, warnings=list(send.subscribers.problems))
    if fetch_feeds:
        # Fetching needs no lock: entries are keyed, and a second process only finds them known.
        fs = config.settings.fetch
        if fetch_timeout is not None:
            fs = fs.model_copy(update={"timeout": min(fs.timeout, fetch_timeout)})
        report.feeds = fetch(ctx, [name], fs)
    schedule = send.builder.schedule
    if build:
        # One builder at a time; the sending is shared (``claims``), so the lock ends here.
        with ScheduleLock(config.open_store, store, name, wait, ctx.stop):
            store.set_last_run(name, ctx.clock())
            built = send.record_issue(force)
            if built is not None:
                _warn_clip(send, report, built)
                from . import social

                social.queue_issue(ctx, name, built.number, built.id)
    issues = store.unfinished_issues(name)
    _deliver_all(send, report, ctx.sender(schedule.sender), issues, on_issue, fresh_only=join)
    if not join and any(t.each == "issue" for t in schedule.post):
        from . import social

        # Posting is not shared: one process at a time posts what is pending.
        with ScheduleLock(config.open_store, store, name, wait, ctx.stop):
            report.posts = social.post_pending(ctx, name)
    return report


def _deliver_all(
    send: _Send,
    report: DigestReport,
    sender: Sender,
    issues: list[Issue],
    on_issue: Callable[[int], None] | None,
    fresh_only: bool = False,
) -> None:
    store = send.builder.store
    for issue in issues:
        reap(store, issue.id)  # a dead holder's rows count as free below
    # Only what no other process holds: a join finding everything taken opens no connection.
    work = [(issue, _free(store.delivery_counts(issue.id), fresh_only)) for issue in issues]
    if not any(pending for _, pending in work):
        report.issues += [send.counted(issue) for issue, _ in work]
        return
    # The sender is opened only when there is something to send: "nothing new" needs no
    # mail server, and a server that is down leaves the built issue pending for the next run.
    # A day quota counts what this sender sent in the last 24 h, this run's own included.
    clock, started = send.ctx.clock, time.monotonic()
    store.forget_usage(clock() - timedelta(hours=26))  # each process counts into rows of its own
    sender.remember(store.sent_since(sender.name, clock() - timedelta(hours=25)), clock)
    if (reached := sender.quota_reached()) is not None:
        # The day's quota is used up already: nothing to connect for (a retry every few
        # minutes would log in to the provider each time only to hear it).
        report.issues += [send.counted(issue) for issue, _ in work]
        report.paused = str(reached)
        work = []
    try:
        with sender if work else contextlib.nullcontext(sender):
            for issue, pending in work:
                if on_issue:
                    on_issue(pending)
                item = send.deliver(issue, sender, fresh_only)
                report.issues.append(item)
                if item.paused:
                    report.paused = item.paused
                    break
                if item.stopped:
                    report.aborted = item.stopped
                    break
                if send.ctx.stopped:
                    report.aborted = "stopped; undelivered messages stay pending for the next run"
                    break
    except DeliveryError as exc:
        report.aborted = exc.with_hint()
    note_pause(store, send.builder.name, report.paused)
    if report.paused:
        took = time.monotonic() - started
        pending = sum(i.pending for i in report.issues)
        sent = sum(i.sent_here for i in report.issues)  # this run's pace, not the ledger's total
        report.finish = finish_of(send.ctx, send.builder.name, pending, sent / took if sent else 0.0)


def _free(counts: DeliveryCounts, fresh_only: bool) -> int:
    """What this run may claim: for a join only deliveries never tried (a reader a server
    deferred waits for the retry job, not for every join a few seconds apart)."""
    return counts.fresh if fresh_only else counts.pending - counts.held


def _preview(send: _Send, report: DigestReport, force: bool, to: str | None) -> None:
    """--dry-run and --to: run inside a transaction that is rolled back afterwards."""
    ctx = send.ctx
    if to:
        _test_send(send, report, ctx.sender(send.builder.schedule.sender), to, force)
        return
    outbox = ctx.config.outbox / "dry-run"
    report.outbox = str(outbox)
    sender = FileSender("dry-run", FileOptions(path=str(outbox)), ctx.config.base_dir)
    issues = ctx.store.unfinished_issues(send.builder.name)
    built = send.record_issue(force)
    if built is not None:
        _warn_clip(send, report, built)
        issues.append(built)
    _deliver_all(send, report, sender, issues, None)


def _warn_clip(send: _Send, report: DigestReport, issue: Issue) -> None:
    size = len(issue.payload["html"].encode())
    if size > 102 * 1024:
        report.warnings.append(
            f"issue #{issue.number} HTML is {size / 1024:.0f} KB: Gmail clips messages over 102 KB"
            f" (lower max_articles, now {send.builder.schedule.max_articles}, or excerpt_chars)"
        )


def _test_send(send: _Send, report: DigestReport, sender: Sender, to: str, force: bool) -> None:
    b = send.builder
    issue = send.record_issue(force, ledger=False)
    if issue is None:
        return
    _warn_clip(send, report, issue)
    sub = b.store.subscriber(b.list_name, to) or Subscriber(to)
    skeleton = b.skeleton(issue)
    message_id, data = skeleton.build(b.recipient(sub))
    item = IssueReport(issue.number, issue.subject, len(issue.entry_ids), len(issue.payload["html"].encode()))
    try:
        with sender:
            sender.send(Outgoing(skeleton.envelope_from, to, message_id, data, f"{b.name}-test"))
        item.sent = 1
    except (TemporaryFailure, PermanentFailure) as exc:
        item.failed = 1
        item.errors.append((to, str(exc)))
    except DeliveryError as exc:
        report.aborted = exc.with_hint()
    report.issues.append(item)


@dataclass
class CheckResult:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(ctx: RunContext) -> CheckResult:
    """Subscriber lists and templates of every schedule; the size of the issue they make now.

    Unlike the preview, status and the archive, it syncs each list: reading the file is what
    a check is for.
    """
    result = CheckResult()
    store = ctx.store
    # PostgreSQL is migrated by `newsletter db migrate`, not as it opens (SQLite has none left).
    pending = store.pending_migrations()
    if pending:
        raise StoreError(
            f"{getattr(store, 'path', 'the state database')}: {len(pending)} migration(s) to apply:"
            f" {', '.join(pending)}",
            hint="run `newsletter db migrate`",
        )
    for name in ctx.config.schedules:
        b = IssueBuilder(ctx, name)
        result.warnings += sync(store, b.list_name, b.list_path).problems
        latest = b.latest()
        size = ""
        if latest:
            rendered = b.render(latest, 1, ctx.clock())
            size = f"; an issue of the latest {len(latest)} entries is {rendered.html_bytes / 1024:.0f} KB"
            if rendered.clipped:
                result.warnings.append(
                    f"schedules.{name}: an issue of {len(latest)} entries is"
                    f" {rendered.html_bytes / 1024:.0f} KB of HTML, over Gmail's 102 KB clip line"
                    " (lower max_articles or excerpt_chars)"
                )
        result.lines.append(
            f"{name}: {store.subscriber_counts(b.list_name)[0]} subscriber(s),"
            f" {len(b.feed_urls)} feed(s), sender {b.schedule.sender!r}{size}"
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
    paused: str = ""  # why the last send stopped with messages pending: a window, a quota
    rate: float = 0.0  # messages a second over the last minute, while a send runs
    still_pending: list[str] = field(default_factory=list)  # a few of those still to get it
    finish: datetime | None = None  # when the pending ones should be out, at that rate
    batches: list[Batch] = field(default_factory=list)  # who is sending the unfinished issues


RATE_SPAN = timedelta(minutes=1)


def schedule_status(ctx: RunContext, name: str, last: int = 5) -> ScheduleStatus:
    config, store = ctx.config, ctx.store
    b = IssueBuilder(ctx, name)
    trigger = config.trigger(name)
    tz = zone(b.schedule.timezone or config.settings.timezone)
    at = ctx.clock()
    next_run = trigger.get_next_fire_time(None, at) if trigger else None
    unfinished = store.unfinished_issues(name)
    pending = sum(store.delivery_counts(i.id).pending for i in unfinished)
    status = ScheduleStatus(
        name,
        store.subscriber_counts(b.list_name)[0],
        len(b.waiting()),
        [(i, store.delivery_counts(i.id)) for i in store.issues(name, last)],
        store.feeds(b.feed_urls),
        next_run.astimezone(tz) if next_run else None,
        pending,
        pause_note(store, name),
    )
    if unfinished:
        status.rate = sum(store.recent_sends(i.id, now() - RATE_SPAN) for i in unfinished) / RATE_SPAN.seconds
        status.still_pending = [p.recipient for p in store.pending(unfinished[0].id, b.list_name, limit=5)]
        status.finish = finish_of(ctx, name, pending, status.rate)
        status.batches = [batch for i in unfinished for batch in store.batches(i.id)]
    return status


def finish_of(ctx: RunContext, name: str, pending: int, rate: float) -> datetime | None:
    """When ``pending`` messages of the schedule should be out: at ``rate`` (with none, the
    sender's own per-second limit), inside its send window, within its day quota."""
    config, store = ctx.config, ctx.store
    schedule = config.schedule(name)
    tz = zone(schedule.timezone or config.settings.timezone)
    rates = getattr(config.senders[schedule.sender].options, "rate_limit", None)
    at = ctx.clock()
    used = sum(n for _, n in store.sent_since(schedule.sender, at - timedelta(hours=24)))
    finish = expected_finish(
        at,
        pending,
        rate or getattr(rates, "per_second", None),
        window=schedule.window(config.settings.timezone),
        per_day=getattr(rates, "per_day", None),
        sent_today=used,
    )
    return finish.astimezone(tz) if finish else None
