"""Benchmark: build and deliver one digest issue to many subscribers, on 127.0.0.1 only.

    .venv/bin/python bench/bench_digest.py [--subscribers 10000] [--articles 25]

1. build: the once-per-issue cost (render, premailer, Skeleton) and the per-subscriber cost of
   what ``IssueBuilder.recipient`` + ``Skeleton.build`` do, without any I/O;
2. send: the public ``send_digest`` path (feed file, CSV, SQLite ledger, SMTP sender) to an
   aiosmtpd server started here;
3. limit: plain smtplib sending as many same-sized messages over one connection to the same
   server, the ceiling for 2 on this machine.

This is a measuring script, not a test: it prints figures and exits non-zero only when the
pipeline did not deliver what it should have.
"""

from __future__ import annotations

import argparse
import csv
import email
import email.policy
import html
import io
import os
import platform
import random
import smtplib
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from time import perf_counter
from typing import Any
from unittest import mock

from aiosmtpd.controller import Controller

# IssueBuilder.recipient() is exactly what a delivery runs per subscriber.
from newsletter import render as render_module
from newsletter.build import IssueBuilder
from newsletter.config import Config, load_config
from newsletter.context import RunContext
from newsletter.digest import fetch, send_digest
from newsletter.message import Skeleton
from newsletter.model import Issue, StoredEntry, Subscriber, now
from newsletter.store import Store
from newsletter.subscribers import sync

SCHEDULE = "bench"


def send_builder(config: Config, store: Store) -> IssueBuilder:
    """The send path's issue builder, after the subscriber sync a send starts with."""
    builder = IssueBuilder(RunContext(config, store), SCHEDULE)
    sync(store, builder.list_name, builder.list_path)
    return builder


FROM = "Bench Weekly <news@example.org>"
ENVELOPE_FROM = "news@example.org"
# The first render also compiles the templates; the median of the warm ones is the steady cost.
ISSUE_REPEATS = 5
# Shared VMs drift by tens of per cent within seconds: several passes, the median reported.
BUILD_PASSES = 3
# Messages per chunk when the smtplib limit alternates with send_digest (see Interleaved).
CHUNK = 100
# A fixed seed: the same feed and list every run, so runs compare.
SEED = 20260101


# -- synthetic input ---------------------------------------------------------------------------

# Names and prose as plain text, split into words below; some names are non-ASCII so the To:
# header takes the RFC 2047 path, as it does on real lists.
_NAMES = """
Ana Ben Chloé Dmitri Eva Farid Grace Hiro Ines José Kai Lena Marta Noor Olu Priya Sven Zoë
Almeida Brown Costa Dubois Eriksen Fischer García Hansen Ito Kowalski Müller Nakamura Søndergaard
"""
_PROSE = """
the server client message queue cache latency request reply header body team week test measure
result change deploy config rollout metric budget inbox render layout column table image link
reader subscriber digest feed entry ledger retry timeout window batch we found that it was slower
than expected and most of the time went into small things
"""
_FIRST, _LAST = (line.split() for line in _NAMES.strip().splitlines())
_WORDS = _PROSE.split()
_CITIES = ["Lisbon", "Osaka", "Berlin", "São Paulo", "Nairobi", "Toronto", "Kraków", "Reykjavík"]
_SUBJECTS = [
    "build caches",
    "feed readers",
    "dark mode in email",
    "SQLite in production",
    "one-click unsubscribe",
    "conditional GET",
    "quoted-printable",
    "retry queues",
    "rate limits",
    "image proxies",
    "plain-text email",
    "premailer",
    "Outlook tables",
    "Python packaging",
    "DNS for mail",
]
_TITLES = [
    "What we learned about {}",
    "A field guide to {}",
    "Why {} is harder than it looks",
    "{}: the numbers after a year",
    "Stop worrying about {}",
    "Notes on {}, with benchmarks",
    "How we cut our bill with {}",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(9, 18))]
    if rng.random() < 0.3:
        words[2] = f"<strong>{words[2]}</strong>"
    text = " ".join(words)
    if rng.random() < 0.2:
        text += f" (see <code>{rng.choice(_WORDS)}_{rng.randint(1, 99)}</code>)"
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random, n: int) -> str:
    body = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
    if rng.random() < 0.5:
        body += f' More in <a href="https://blog.example.org/notes/{n}-{rng.randint(1, 9)}">our notes</a>.'
    return f"<p>{body}</p>"


def feed_xml(articles: int, rng: random.Random) -> str:
    """RSS 2.0 with ``articles`` items: 1 to 4 paragraphs each, so some exceed the excerpt length."""
    start = datetime.now(UTC) - timedelta(hours=articles + 1)
    items = []
    for n in range(articles):
        title = rng.choice(_TITLES).format(rng.choice(_SUBJECTS))
        summary = "".join(_paragraph(rng, n) for _ in range(rng.randint(1, 4)))
        image = (
            f'<media:content url="https://blog.example.org/img/{n}.png" medium="image"/>'
            if n % 3 == 0
            else ""
        )
        author = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        items.append(
            "<item>"
            f"<title>{html.escape(title)}</title>"
            f"<link>https://blog.example.org/posts/{n:03d}</link>"
            f'<guid isPermaLink="false">bench-{n:03d}</guid>'
            f"<pubDate>{format_datetime(start + timedelta(hours=n))}</pubDate>"
            f"<author>writer{n % 5}@example.org ({html.escape(author)})</author>"
            f"<category>{html.escape(rng.choice(_SUBJECTS))}</category>"
            f"{image}"
            f"<description><![CDATA[{summary}]]></description>"
            "</item>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/"><channel>'
        "<title>The Bench Engineering Blog</title><link>https://blog.example.org/</link>"
        "<description>Synthetic posts for the benchmark.</description>"
        + "".join(items)
        + "</channel></rss>\n"
    )


def write_subscribers(path: Path, count: int, rng: random.Random) -> None:
    width = max(5, len(str(count)))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "city"])
        for i in range(1, count + 1):
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            writer.writerow([f"reader{i:0{width}d}@example.com", name, rng.choice(_CITIES)])


def write_project(root: Path, subscribers: int, articles: int, smtp_port: int) -> Path:
    rng = random.Random(SEED)
    (root / "feed.xml").write_text(feed_xml(articles, rng), encoding="utf-8")
    (root / "subscribers").mkdir()
    write_subscribers(root / "subscribers" / f"{SCHEDULE}.csv", subscribers, rng)
    config = root / "schedules.yaml"
    # local_hostname: skips smtplib's getfqdn(), a DNS lookup that is no part of sending.
    config.write_text(
        f"""\
database: sqlite:///state.db
templates: null
fetch:
  first_fetch_newest: {articles}
senders:
  local:
    type: smtp
    host: 127.0.0.1
    port: {smtp_port}
    timeout: 30
    local_hostname: localhost
schedules:
  {SCHEDULE}:
    title: Bench Weekly
    feeds:
      - feed.xml
    subscribers: {SCHEDULE}
    sender: local
    from: {FROM}
    max_articles: {articles}
    unsubscribe_url: https://news.example.org/unsubscribe/{{token}}
""",
        encoding="utf-8",
    )
    return config


# -- the SMTP server -----------------------------------------------------------------------------


class CountingHandler:
    """Accepts everything and keeps only counts: the server should cost as little as it can."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        # Runs on the controller's loop thread only, so plain counters need no lock.
        self.messages += 1
        self.bytes += len(envelope.content)
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def smtp_server() -> Iterator[tuple[CountingHandler, int]]:
    handler = CountingHandler()
    # Controller needs a concrete port: it connects to itself to check that it is up.
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- 1. building ---------------------------------------------------------------------------------


@dataclass
class IssueCost:
    render: float  # feed HTML sanitising + Jinja2
    premailer: float
    skeleton: float

    @property
    def total(self) -> float:
        return self.render + self.premailer + self.skeleton


@dataclass
class BuildPass:
    total: float  # the loop's wall time
    recipient: float  # of which IssueBuilder.recipient
    build: float  # of which Skeleton.build


@dataclass
class BuildFigures:
    subscribers: int
    load_subscribers: float
    same_subscribers: float
    cold: IssueCost
    warm: list[IssueCost]
    html_bytes: int
    passes: list[BuildPass] = field(default_factory=list)
    ledger_total: float = 0.0
    message_bytes: list[int] = field(default_factory=list)
    sample: bytes = b""  # the first subscriber's message, resent by the smtplib limit
    recipients: list[str] = field(default_factory=list)


def issue_once(run: IssueBuilder, entries: list[StoredEntry]) -> tuple[IssueCost, Skeleton, Issue]:
    """What build_issue + deliver do once per issue, timed by stage, without the database write."""
    premailer = 0.0
    real_inline = render_module.inline_css

    def timed_inline(markup: str) -> str:
        nonlocal premailer
        start = perf_counter()
        out = real_inline(markup)
        premailer += perf_counter() - start
        return out

    date = now()
    # render_issue looks inline_css up at call time, so the wrapper sees the real call.
    with mock.patch.object(render_module, "inline_css", timed_inline):
        t0 = perf_counter()
        rendered = run.render(entries, 1, date)
        t1 = perf_counter()
    issue = Issue(
        0,
        run.name,
        1,
        date,
        "sending",
        [e.id for e in entries],
        rendered.subject,
        {**rendered.to_payload(), "date": date.isoformat()},
    )
    t2 = perf_counter()
    skeleton = run.skeleton(issue)
    t3 = perf_counter()
    return IssueCost(t1 - t0 - premailer, premailer, t3 - t2), skeleton, issue


def check_message(data: bytes, to: str, unsubscribe_url: str) -> None:
    """One parsed message: a benchmark of broken output would be worth nothing."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text = msg.get_body(("plain",))
    markup = msg.get_body(("html",))
    problems = []
    if to not in str(msg["To"]):
        problems.append(f"To: is {msg['To']!r}")
    if text is None or to not in text.get_content() or unsubscribe_url not in text.get_content():
        problems.append("the text part lacks the address or the unsubscribe URL")
    if markup is None or html.escape(unsubscribe_url) not in markup.get_content():
        problems.append("the HTML part lacks the unsubscribe URL")
    if problems:
        sys.exit("built message is wrong: " + "; ".join(problems))


def build_pass(
    run: IssueBuilder, skeleton: Skeleton, subs: list[Subscriber], sizes: list[int] | None
) -> BuildPass:
    """Exactly the per-subscriber work of the delivery loop before the sender is called."""
    t_recipient = t_build = 0.0
    start = perf_counter()
    for sub in subs:
        a = perf_counter()
        recipient = run.recipient(sub)
        b = perf_counter()
        _message_id, data = skeleton.build(recipient)
        c = perf_counter()
        t_recipient += b - a
        t_build += c - b
        if sizes is not None:
            sizes.append(len(data))
    return BuildPass(perf_counter() - start, t_recipient, t_build)


def bench_build(config: Config, workdir: Path, articles: int, passes: int = BUILD_PASSES) -> BuildFigures:
    # A scratch database of its own, so part 2 starts from nothing as a first real run would.
    store = Store(f"sqlite:///{workdir / 'build.db'}")
    t0 = perf_counter()
    run = send_builder(config, store)  # reads and validates the subscriber CSV
    load_subscribers = perf_counter() - t0
    t0 = perf_counter()
    send_builder(config, store)  # the file unchanged: only hashed
    same_subscribers = perf_counter() - t0
    fetch(RunContext(config, store), [SCHEDULE])
    entries = store.new_entries(run.feed_urls, 0, store.max_entry_id(), run.schedule.max_articles)
    if len(entries) != articles:
        sys.exit(f"expected {articles} new entries from the feed, got {len(entries)}")

    cold, skeleton, issue = issue_once(run, entries)
    warm = []
    for _ in range(ISSUE_REPEATS):
        cost, skeleton, issue = issue_once(run, entries)
        warm.append(cost)

    subs = [sub for sub, _ in store.subscribers(run.list_name)]
    figures = BuildFigures(
        subscribers=len(subs),
        load_subscribers=load_subscribers,
        same_subscribers=same_subscribers,
        cold=cold,
        warm=warm,
        html_bytes=len(issue.payload["html"].encode()),
        recipients=[s.email for s in subs],
    )
    first = subs[0]
    recipient = run.recipient(first)
    _message_id, figures.sample = skeleton.build(recipient)
    check_message(figures.sample, first.email, recipient.values["unsubscribe_url"])
    for n in range(passes):
        figures.passes.append(build_pass(run, skeleton, subs, figures.message_bytes if n == 0 else None))

    # The ledger's share of a delivery: one autocommitted UPDATE per message, as deliver does.
    ledger_issue = store.create_issue(
        SCHEDULE,
        watermark=0,
        entry_ids=issue.entry_ids,
        subject=issue.subject,
        payload=issue.payload,
        list_name=run.list_name,
    )
    start = perf_counter()
    for sub in subs:
        store.record_delivery(ledger_issue.id, sub.key, "sent")
    figures.ledger_total = perf_counter() - start
    store.close()
    return figures


# -- 2. send_digest ------------------------------------------------------------------------------


@dataclass
class SendFigures:
    total: float  # send_digest's wall time, the limit's chunks taken out
    before_delivery: float  # subscribers, fetch, render, ledger rows, SMTP connect
    delivery: float  # on_issue to the last message's ledger update, the limit's chunks taken out
    after_delivery: float  # issue closed, counts, QUIT
    limit: float  # the smtplib loop's time for as many messages
    chunk: int  # messages per chunk of the alternation
    pairs: list[tuple[float, float]]  # (ours, limit) seconds of each chunk


class Interleaved:
    """send_digest's progress hooks, which also send a chunk of the limit after each chunk of ours.

    This VM's speed drifts by up to half within a minute, so a limit measured before or after
    the run would compare two different machines. Alternating chunks of the same size makes
    every chunk of ours meet the limit under the same conditions; the time spent in the limit's
    chunks is taken out of ours.
    """

    def __init__(self, conn: smtplib.SMTP, sample: bytes, recipients: list[str], chunk: int) -> None:
        self.conn, self.sample, self.recipients, self.chunk = conn, sample, recipients, chunk
        self.handled = self.limit_sent = 0
        self.paused = self.limit = 0.0
        self.deliver_start = self.last = self.chunk_start = 0.0
        self.pairs: list[tuple[float, float]] = []

    def on_issue(self, _count: int) -> None:
        # Fires once the sender is open, just before deliver().
        self.deliver_start = self.chunk_start = perf_counter()

    def progress(self, n: int) -> None:
        now = perf_counter()
        self.handled += n
        self.last = now - self.paused  # on a clock that stops while the limit runs
        if self.handled % self.chunk:
            return
        ours = now - self.chunk_start
        took = self.send_limit(self.chunk)
        self.pairs.append((ours, took))
        self.chunk_start = perf_counter()
        self.paused += self.chunk_start - now

    def send_limit(self, count: int) -> float:
        batch = self.recipients[self.limit_sent : self.limit_sent + count]
        took = bench_smtplib(self.conn, self.sample, batch)
        self.limit_sent += len(batch)
        self.limit += took
        return took


def bench_send(
    config_path: Path, handler: CountingHandler, port: int, sample: bytes, recipients: list[str]
) -> SendFigures:
    expected = len(recipients)
    config = load_config(config_path)
    store = Store(config.database_url)
    chunk = min(CHUNK, max(1, expected // 10))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="localhost", timeout=30) as conn:
        conn.ehlo()  # outside the timing, as the sender's connect is outside our delivery phase
        hooks = Interleaved(conn, sample, recipients, chunk)
        received = handler.messages
        start = perf_counter()
        report = send_digest(
            RunContext(config, store), SCHEDULE, progress=hooks.progress, on_issue=hooks.on_issue
        )
        end = perf_counter()
        hooks.send_limit(expected - hooks.limit_sent)  # the part short of a whole chunk
    store.close()

    issue = report.issues[0] if len(report.issues) == 1 else None
    ours = handler.messages - received - hooks.limit_sent
    if not report.ok or issue is None or issue.sent != expected or ours != expected:
        sys.exit(
            f"send_digest did not deliver {expected} messages: aborted={report.aborted!r}"
            f" issues={report.issues!r}; the server received {ours} of ours"
        )
    return SendFigures(
        total=end - start - hooks.paused,
        before_delivery=hooks.deliver_start - start,
        delivery=hooks.last - hooks.deliver_start,
        after_delivery=end - hooks.paused - hooks.last,
        limit=hooks.limit,
        chunk=chunk,
        pairs=hooks.pairs,
    )


# -- 3. the smtplib limit ------------------------------------------------------------------------


def bench_smtplib(conn: smtplib.SMTP, sample: bytes, recipients: list[str]) -> float:
    """Pre-built messages of our size over an open connection: no building, no ledger."""
    start = perf_counter()
    for rcpt in recipients:
        conn.sendmail(ENVELOPE_FROM, [rcpt], sample)
    return perf_counter() - start


# -- output --------------------------------------------------------------------------------------


def show(label: str, value: str) -> None:
    print(f"  {label:<46} {value}")


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} msg/s  ({seconds / count * 1e6:,.1f} µs/msg)"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def median_pass(passes: list[BuildPass]) -> BuildPass:
    return sorted(passes, key=lambda p: p.total)[len(passes) // 2]


def report_build(b: BuildFigures) -> None:
    n = b.subscribers
    med = IssueCost(
        statistics.median(c.render for c in b.warm),
        statistics.median(c.premailer for c in b.warm),
        statistics.median(c.skeleton for c in b.warm),
    )
    mid = median_pass(b.passes)
    best = min(p.total for p in b.passes)
    print("\n1. build, in memory (no SMTP, no ledger)")
    show("issue HTML after premailer", f"{b.html_bytes / 1024:,.1f} KB")
    show("message size (median)", f"{statistics.median(b.message_bytes) / 1024:,.1f} KB")
    show("once per issue, first (compiles templates)", ms(b.cold.total))
    show(f"once per issue, median of {ISSUE_REPEATS}", ms(med.total))
    show("  render: sanitise + Jinja2", ms(med.render))
    show("  premailer", ms(med.premailer))
    show("  Skeleton()", ms(med.skeleton))
    show(f"per subscriber, median of {len(b.passes)} passes", rate(n, mid.total))
    show("  IssueBuilder.recipient (incl. unsubscribe token)", f"{mid.recipient / n * 1e6:,.1f} µs/msg")
    show("  Skeleton.build", f"{mid.build / n * 1e6:,.1f} µs/msg")
    show("  best pass", rate(n, best))
    show("first run: read + check the subscriber CSV", f"{ms(b.load_subscribers)} (the sync)")
    show("later runs, the CSV unchanged", f"{ms(b.same_subscribers)} (the sync: a hash of the file)")
    show("ledger alone: record_delivery per message", rate(n, b.ledger_total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000, help="default 10000")
    parser.add_argument("--articles", type=int, default=25, help="default 25 (at most 500)")
    args = parser.parse_args()
    # Each part's figures as soon as they exist, also when piped: the whole run takes minutes.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if args.subscribers < 1 or not 1 <= args.articles <= 500:
        parser.error("--subscribers must be at least 1 and --articles between 1 and 500")

    print(
        f"newsletter digest benchmark: {args.subscribers:,} subscribers, {args.articles} articles;"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="bench-digest-") as tmp, smtp_server() as (handler, port):
        root = Path(tmp)
        config_path = write_project(root, args.subscribers, args.articles, port)
        b = bench_build(load_config(config_path), root, args.articles)
        n = b.subscribers
        if n != args.subscribers:
            sys.exit(f"only {n} of {args.subscribers} subscribers loaded")
        report_build(b)

        s = bench_send(config_path, handler, port, b.sample, b.recipients)
        print("\n2. send_digest to aiosmtpd on 127.0.0.1 (SMTP sender + SQLite ledger)")
        show("whole send_digest", f"{s.total:,.2f} s = {rate(n, s.total)}")
        show("  before delivery (CSV, fetch, render, ledger)", ms(s.before_delivery))
        show("  delivery phase", f"{s.delivery:,.2f} s = {rate(n, s.delivery)}")
        show("  after delivery (close issue, QUIT)", ms(s.after_delivery))

        kb = len(b.sample) / 1024
        print(f"\n3. limit: plain smtplib, {n:,} pre-built {kb:,.1f} KB messages over one connection")
        show("smtplib.sendmail loop", f"{s.limit:,.2f} s = {rate(n, s.limit)}")
        show("ratio ours/limit, delivery phase", f"{s.limit / s.delivery:.2f}")
        show("ratio ours/limit, whole send_digest", f"{s.limit / s.total:.2f}")
        if len(s.pairs) >= 10:
            ratios = [limit / ours for ours, limit in s.pairs]
            deciles = statistics.quantiles(ratios, n=10)
            show(
                f"  chunk by chunk ({len(ratios)} chunks of {s.chunk})",
                f"median {statistics.median(ratios):.2f}, p10 {deciles[0]:.2f}, p90 {deciles[-1]:.2f}",
            )
            speeds = [s.chunk / limit for _ours, limit in s.pairs]
            show("  the limit's own drift, chunk to chunk", f"{min(speeds):,.0f} to {max(speeds):,.0f} msg/s")
        extra = (s.delivery - s.limit) / n * 1e6
        own = (median_pass(b.passes).total + b.ledger_total) / n * 1e6
        show("delivery phase minus limit", f"{extra:,.1f} µs/msg (part 1 build + ledger: {own:,.1f})")
        print(
            f"\n  The limit runs in chunks of {s.chunk} between chunks of ours, on its own connection."
            "\n  aiosmtpd runs in this process: client and server share one GIL in 2 and 3 alike;"
            f"\n  it received {handler.messages:,} messages, {handler.bytes / 2**20:,.0f} MiB."
        )


if __name__ == "__main__":
    main()
