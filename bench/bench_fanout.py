"""Benchmark (issue 6, item 1): fan-out of one issue to many subscribers through the SMTP sender.

    .venv/bin/python bench/bench_fanout.py [--subscribers 10000] [--articles 25]
                                           [--aiosmtpd-subscribers 4000] [--servers smtp-sink,aiosmtpd]

The public path: a temporary schedules.yaml, subscribers CSV and local feed file, then
``newsletter.digest.send_digest`` with the real ``smtp`` sender, to a server on 127.0.0.1:

- Postfix's ``smtp-sink`` (C, discards everything), so the figure measures our side, not the
  server. Installed from Debian's ``postfix`` when missing (root only; its mail service is
  stopped); the script says so clearly when it cannot.
- aiosmtpd, in a child process so that it does not share our GIL. It costs about 10 ms per
  110 KB message itself, so it is the bottleneck and its run is shorter by default (the
  ratio, not the count, is the figure; ``--aiosmtpd-subscribers 10000`` for the full list).

The limit: plain ``smtplib`` sending the same number of pre-built messages of the same size
over one connection to the same server. It runs in chunks of 100 alternating with chunks of
ours (send_digest's progress hook), on its own connection, so both meet the same machine
speed; its time is taken out of ours. Target: ours / limit >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import platform
import smtplib
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from _support import AiosmtpdProcess, SmtpSink, ensure_smtp_sink, line_buffered, ms, rate, show
from bench_digest import CHUNK, SCHEDULE, Interleaved, check_message, send_builder, write_project

from newsletter.config import load_config
from newsletter.context import RunContext
from newsletter.digest import fetch, send_digest
from newsletter.model import Issue, now
from newsletter.store import Store

TARGET = 0.8


@dataclass
class FanoutFigures:
    server: str
    subscribers: int
    message_bytes: int
    total: float  # send_digest wall time, the limit's chunks taken out
    before: float  # CSV, fetch, render, ledger rows, connect
    delivery: float
    limit: float  # the smtplib loop, as many messages
    pairs: list[tuple[float, float]]
    chunk: int

    @property
    def ratio_total(self) -> float:
        return self.limit / self.total

    @property
    def ratio_delivery(self) -> float:
        return self.limit / self.delivery


def sample_message(config_path: Path, workdir: Path) -> tuple[bytes, list[str]]:
    """A message of the median size, built by the send path's own code, and the address list.

    Built from a scratch database, so the real run below still starts from nothing.
    """
    config = load_config(config_path)
    store = Store(f"sqlite:///{workdir / 'sample.db'}")
    try:
        run = send_builder(config, store)
        fetch(RunContext(config, store), [SCHEDULE])
        entries = store.new_entries(run.feed_urls, 0, store.max_entry_id(), run.schedule.max_articles)
        date = now()
        rendered = run.render(entries, 1, date)
        payload = {**rendered.to_payload(), "date": date.isoformat()}
        issue = Issue(0, SCHEDULE, 1, date, "draft", [e.id for e in entries], rendered.subject, payload)
        skeleton = run.skeleton(issue)
        built = []
        subs = [sub for sub, _ in store.subscribers(run.list_name)]
        for sub in subs[:201]:
            recipient = run.recipient(sub)
            built.append((len(skeleton.build(recipient)[1]), sub, recipient))
        built.sort(key=lambda b: b[0])
        _size, sub, recipient = built[len(built) // 2]
        data = skeleton.build(recipient)[1]
        check_message(data, sub.email, recipient.values["unsubscribe_url"])
        return data, [s.email for s in subs]
    finally:
        store.close()


def measure(
    server: SmtpSink | AiosmtpdProcess, config_path: Path, sample: bytes, recipients: list[str]
) -> FanoutFigures:
    expected = len(recipients)
    config = load_config(config_path)
    store = Store(config.database_url)
    chunk = min(CHUNK, max(1, expected // 10))
    received_before = server.counts()[0]
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="localhost", timeout=30) as conn:
        conn.ehlo()  # outside the timing, as the sender's connect is outside the delivery phase
        hooks = Interleaved(conn, sample, recipients, chunk)
        start = perf_counter()
        report = send_digest(
            RunContext(config, store), SCHEDULE, progress=hooks.progress, on_issue=hooks.on_issue
        )
        end = perf_counter()
        hooks.send_limit(expected - hooks.limit_sent)  # the part short of a whole chunk
    store.close()
    received = server.counts()[0] - received_before
    issue = report.issues[0] if len(report.issues) == 1 else None
    if not report.ok or issue is None or issue.sent != expected or received != expected + hooks.limit_sent:
        sys.exit(
            f"{server.name}: send_digest did not deliver {expected} messages: aborted={report.aborted!r}"
            f" issues={report.issues!r}; the server received {received} (expected {2 * expected})"
        )
    return FanoutFigures(
        server=server.name,
        subscribers=expected,
        message_bytes=len(sample),
        total=end - start - hooks.paused,
        before=hooks.deliver_start - start,
        delivery=hooks.last - hooks.deliver_start,
        limit=hooks.limit,
        pairs=hooks.pairs,
        chunk=chunk,
    )


def report(f: FanoutFigures) -> None:
    n = f.subscribers
    print(f"\n{f.server}: {n:,} messages of {f.message_bytes / 1024:,.1f} KB each way")
    show("ours: whole send_digest", f"{f.total:,.2f} s = {rate(n, f.total)}")
    show("  before delivery (CSV, fetch, render, ledger)", ms(f.before))
    show("  delivery phase", f"{f.delivery:,.2f} s = {rate(n, f.delivery)}")
    show("limit: smtplib.sendmail, pre-built, one connection", f"{f.limit:,.2f} s = {rate(n, f.limit)}")
    show("ratio ours/limit, whole send_digest", f"{f.ratio_total:.2f}  (target >= {TARGET})")
    show("ratio ours/limit, delivery phase", f"{f.ratio_delivery:.2f}")
    if len(f.pairs) >= 10:
        ratios = [limit / ours for ours, limit in f.pairs]
        deciles = statistics.quantiles(ratios, n=10)
        show(
            f"  chunk by chunk ({len(ratios)} chunks of {f.chunk})",
            f"median {statistics.median(ratios):.2f}, p10 {deciles[0]:.2f}, p90 {deciles[-1]:.2f}",
        )
        speeds = [f.chunk / limit for _ours, limit in f.pairs]
        show("  the limit's own drift, chunk to chunk", f"{min(speeds):,.0f} to {max(speeds):,.0f} msg/s")
    show("ours minus limit, per message", f"{(f.total - f.limit) / n * 1e6:,.0f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000, help="smtp-sink run (default 10000)")
    parser.add_argument("--aiosmtpd-subscribers", type=int, default=4_000, help="aiosmtpd run (default 4000)")
    parser.add_argument("--articles", type=int, default=25, help="default 25")
    parser.add_argument("--servers", default="smtp-sink,aiosmtpd", help="comma-separated; default both")
    args = parser.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not set(servers) <= {"smtp-sink", "aiosmtpd"} or not servers:
        parser.error("--servers takes smtp-sink and/or aiosmtpd")
    line_buffered()
    print(
        f"fan-out benchmark: one issue of {args.articles} articles through the smtp sender;"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs, 127.0.0.1 only"
    )
    results: list[FanoutFigures] = []
    missing = ""
    for name in servers:
        if name == "smtp-sink":
            path, how = ensure_smtp_sink()
            if path is None:
                missing = how
                print(f"\nsmtp-sink: CANNOT RUN: {how}; no smtp-sink figure in this run")
                continue
            print(f"\nsmtp-sink: {path} ({how})")
            server: SmtpSink | AiosmtpdProcess = SmtpSink(path)
            count = args.subscribers
        else:
            server = AiosmtpdProcess()
            count = args.aiosmtpd_subscribers
        with tempfile.TemporaryDirectory(prefix=f"bench-fanout-{name}-") as tmp, server:
            root = Path(tmp)
            config_path = write_project(root, count, args.articles, server.port)
            sample, recipients = sample_message(config_path, root)
            if len(recipients) != count:
                sys.exit(f"only {len(recipients)} of {count} subscribers loaded")
            figures = measure(server, config_path, sample, recipients)
            report(figures)
            results.append(figures)

    print("\nsummary (messages/second; ratio = ours / limit, measured in the same run)")
    print(f"  {'server':<10} {'messages':>9} {'ours':>8} {'limit':>8} {'ratio':>6}  target >= {TARGET}")
    for f in results:
        verdict = "ok" if f.ratio_total >= TARGET else "BELOW TARGET"
        print(
            f"  {f.server:<10} {f.subscribers:>9,} {f.subscribers / f.total:>8,.0f}"
            f" {f.subscribers / f.limit:>8,.0f} {f.ratio_total:>6.2f}  {verdict}"
        )
    if missing:
        print(f"  smtp-sink  not measured: {missing}")
        sys.exit(1)


if __name__ == "__main__":
    main()
