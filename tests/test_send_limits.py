"""A send held to a provider's day quota and to a schedule's send window, on an injected clock.

The public path in-process (``send_digest`` on a ``RunContext`` with a clock of the test's
own), real aiosmtpd on 127.0.0.1: what stops, what stays pending, what ``status`` says, and
that a later run (a later "day", an open window) finishes with nobody skipped or doubled.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta

from conftest import FeedServer, Mailbox, Project, Route, item, rss
from newsletter.config import load_config
from newsletter.context import RunContext
from newsletter.digest import schedule_status, send_digest
from newsletter.model import DeliveryStatus
from newsletter.store import Store

READERS = [f"reader{i:02d}@example.com" for i in range(12)]


def configure(
    project: Project, feed_server: FeedServer, port: int, *, sender: str = "", schedule: str = ""
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup(
        [feed_server.url("/feed.xml")], smtp_port=port, subscribers=READERS, extra_schedule=schedule
    )
    text = project.config.read_text()
    project.config.write_text(text.replace("    timeout: 10\n", f"    timeout: 10\n{sender}", 1))


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def run(project: Project, clock: Clock):  # type: ignore[no-untyped-def]
    config = load_config(project.config)
    with RunContext.open(config, clock=clock) as ctx:
        report = send_digest(ctx, "weekly", fetch_feeds=True)
        status = schedule_status(ctx, "weekly")
    return report, status


def test_a_day_quota_stops_the_send_and_the_next_day_finishes_it(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    configure(project, feed_server, port, sender="    connections: 3\n    rate_limit: {per_day: 5}\n")
    clock = Clock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    report, status = run(project, clock)
    # Five go out, the rest waits: nobody failed for a quota.
    assert len(box.messages) == 5
    assert report.paused and "quota" in report.paused and not report.aborted
    (issue,) = report.issues
    assert (issue.sent, issue.pending, issue.failed) == (5, len(READERS) - 5, 0)
    assert status.paused == report.paused and "2026-12-02" in status.paused
    # Seven left at five a day: the last of them two days on, whatever the rate.
    assert report.finish is not None and report.finish.date() == date(2026, 12, 3), report.finish
    assert status.retries == len(READERS) - 5
    assert status.still_pending and set(status.still_pending) <= set(READERS)
    # What the publisher sees: why it waits, who is still to get it, when it should be done.
    shown = project.run("status", "weekly").output
    assert "paused: daily quota of 5 reached" in shown, shown
    assert "still pending: reader" in shown and "expected to finish" in shown, shown
    # A restart the same day does not reset the count: nothing more goes out, and it does not
    # even connect to hear that.
    clock.at += timedelta(hours=2)
    sessions = box.sessions
    again, _ = run(project, clock)
    assert len(box.messages) == 5 and again.paused and again.paused == report.paused
    assert box.sessions == sessions
    # The next days: five more, then the last two, each exactly once.
    clock.at += timedelta(hours=24)
    run(project, clock)
    assert len(box.messages) == 10
    clock.at += timedelta(hours=25)
    last, status = run(project, clock)
    assert not last.paused and status.paused == "" and status.retries == 0
    copies = Counter(r for _, rcpts, _ in box.messages for r in rcpts)
    assert copies == Counter(READERS)
    # Each send forgets the hours no day quota looks at any more (a row a process and hour).
    config = load_config(project.config)
    with Store(config.database_url) as store:
        kept = store.sent_since(config.schedule("weekly").sender, clock.at - timedelta(days=30))
    assert kept and min(hour for hour, _ in kept) >= clock.at - timedelta(hours=26), kept
    assert sum(n for _, n in kept) == len(READERS) - 5


def test_a_send_window_pauses_the_send_and_an_open_window_resumes_it(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    configure(
        project,
        feed_server,
        port,
        schedule="    timezone: Europe/Lisbon\n    send_window: weekdays 08:00-18:00\n",
    )
    # Saturday 2026-12-05, 10:00 in Lisbon (UTC+0 in winter): closed until Monday 08:00.
    clock = Clock(datetime(2026, 12, 5, 10, 0, tzinfo=UTC))
    report, status = run(project, clock)
    assert box.messages == []
    assert "send window" in report.paused and "2026-12-07 08:00" in report.paused, report.paused
    (issue,) = report.issues
    assert (issue.sent, issue.pending, issue.failed) == (0, len(READERS), 0)
    assert status.paused == report.paused
    # Monday 08:30: the window is open and the issue goes out to everyone once.
    clock.at = datetime(2026, 12, 7, 8, 30, tzinfo=UTC)
    report, status = run(project, clock)
    assert not report.paused and status.retries == 0
    assert Counter(r for _, rcpts, _ in box.messages for r in rcpts) == Counter(READERS)


def test_status_names_each_process_holding_batches_its_rate_and_its_lease(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    _box, port = smtp_server
    configure(project, feed_server, port, sender="    rate_limit: {per_day: 2}\n")
    report, _ = run(project, Clock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC)))
    assert report.paused  # two sent, the rest pending
    # Two other processes hold batches of the rest: one renewing, one that has gone quiet.
    with load_config(project.config).open_store() as store:
        issue_id = store.issues("weekly")[0].id
        store.claim_batch(issue_id, "mail-2:4242:a", "mail-2", 4242, size=4, lease=300)
        store.claim_batch(issue_id, "mail-3:77:b", "mail-3", 77, size=3, lease=4)
        first = store.pending(issue_id, "readers", batch="mail-2:4242:a")[0].recipient
        store.record_delivery(issue_id, first, DeliveryStatus.SENT, "", "mail-2:4242:a")
        assert store.renew_batch("mail-2:4242:a", 300, sent=1)  # what its holder says it sent
    shown = project.run("status", "weekly").output
    assert "mail-2 (pid 4242): 1 batch(es), 4 row(s), 1 sent," in shown, shown
    assert "mail-3 (pid 77): 1 batch(es), 3 row(s), 0 sent, 0.0 msg/s; lease ends in" in shown, shown
    (quiet,) = [line for line in shown.splitlines() if "mail-3" in line]
    assert quiet.endswith("(about to expire)")
    assert "about to expire" not in next(line for line in shown.splitlines() if "mail-2" in line)


def test_a_send_paced_slower_than_its_lease_keeps_its_batch_and_finishes_in_one_run(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    configure(project, feed_server, port, sender="    connections: 1\n    rate_limit: 0.5\n")
    # A turn every 2 s against a 2 s lease: the lease must be renewed while the lane waits.
    text = project.config.read_text().replace("senders:", "batches:\n  size: 4\n  lease: 2s\nsenders:", 1)
    project.config.write_text(text)
    with_readers = READERS[:4]
    project.write_subscribers(with_readers)
    result = project.run_in_process("send-digest", "weekly")
    assert result.returncode == 0, result.stdout + result.stderr
    assert Counter(r for _, rcpts, _ in box.messages for r in rcpts) == Counter(with_readers)
