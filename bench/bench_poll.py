"""Benchmark (issue 6, item 4): one polling round of 50 slow feeds, then a round of 304s.

    .venv/bin/python bench/bench_poll.py [--feeds 50] [--delay 0.2] [--entries 20] [--rounds 3]

A threaded HTTP server on 127.0.0.1 serves ``--feeds`` distinct RSS feeds, each answering
after ``--delay`` seconds, with a strong ETag; a request whose ``If-None-Match`` matches gets
304 (after the same delay). A temporary schedules.yaml lists every feed with the default
``fetch:`` settings (``workers: 8``), and ``newsletter.digest.fetch`` (what ``newsletter fetch``
runs: ``feeds.fetch_all`` and the store) polls them:

1. a round from a fresh state (every feed 200, every entry new): wall time, target < 2 s;
2. a round where every feed answers 304: wall time, and proof that nothing was parsed:
   ``feedparser.parse`` and ``newsletter.feeds.parse_feed`` are wrapped to count calls, and
   the server counts the conditional requests it answered 304.

Each is repeated ``--rounds`` times, each repetition from a fresh database, medians printed.
The floor for a round is ceil(feeds / workers) x delay: the default 8 workers, not the
machine, bound it; the same rounds with ``workers: 50`` are printed for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from time import perf_counter
from typing import Any

import feedparser
from _support import LOOPBACK, line_buffered, show
from bench_digest import SEED, feed_xml

import newsletter.digest as digest_module
import newsletter.feeds as feeds_module
from newsletter.config import FetchSettings, load_config
from newsletter.context import RunContext
from newsletter.digest import fetch
from newsletter.store import Store

TARGET = 2.0


class SlowFeeds:
    """``/feed/N.xml`` for N in range(count): answers after ``delay`` s, 200 or 304 by ETag."""

    def __init__(self, count: int, delay: float, entries: int) -> None:
        self.delay = delay
        self.bodies: list[bytes] = []
        self.etags: list[str] = []
        for n in range(count):
            body = feed_xml(entries, random.Random(SEED + n)).replace(
                "The Bench Engineering Blog", f"Bench feed {n}"
            )
            data = body.encode("utf-8")
            self.bodies.append(data)
            self.etags.append('"' + hashlib.sha256(data).hexdigest()[:32] + '"')
        self.lock = threading.Lock()
        self.full = self.not_modified = self.conditional = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = self.path.removeprefix("/feed/").removesuffix(".xml")
                if not name.isdigit() or int(name) >= len(outer.bodies):
                    self.send_error(404)
                    return
                n = int(name)
                time.sleep(outer.delay)
                tags = [t.strip() for t in self.headers.get("If-None-Match", "").split(",") if t.strip()]
                with outer.lock:
                    outer.conditional += bool(tags)
                if outer.etags[n] in tags:
                    with outer.lock:
                        outer.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", outer.etags[n])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with outer.lock:
                    outer.full += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
                self.send_header("ETag", outer.etags[n])
                self.send_header("Content-Length", str(len(outer.bodies[n])))
                self.end_headers()
                self.wfile.write(outer.bodies[n])

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.httpd = Server((LOOPBACK, 0), Handler)
        self.base = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self.urls = [f"{self.base}/feed/{n}.xml" for n in range(count)]

    def __enter__(self) -> SlowFeeds:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.full, self.not_modified, self.conditional


class CallCounter:
    """Wraps a module attribute; counts calls across threads."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name = module, name
        self.real: Callable[..., Any] = getattr(module, name)
        self.calls = 0
        self.seconds = 0.0  # summed wall time of the calls (they overlap across threads)
        self.lock = threading.Lock()

    def __enter__(self) -> CallCounter:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls += 1
            start = perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds += perf_counter() - start

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.module, self.name, self.real)


def write_config(root: Path, urls: list[str], workers: int | None) -> Path:
    (root / "subscribers").mkdir(exist_ok=True)
    (root / "subscribers" / "one.csv").write_text("email\nreader@example.org\n", encoding="utf-8")
    feeds = "".join(f"      - {u}\n" for u in urls)
    fetch_block = f"fetch:\n  workers: {workers}\n" if workers else ""
    config = root / "schedules.yaml"
    config.write_text(
        f"""\
database: sqlite:///state.db
templates: null
{fetch_block}senders:
  out:
    type: file
    path: outbox
schedules:
  bench:
    feeds:
{feeds}    subscribers: one
    sender: out
    from: news@example.org
    unsubscribe_url: https://news.example.org/unsubscribe/{{token}}
""",
        encoding="utf-8",
    )
    return config


def one_round(config_path: Path, server: SlowFeeds) -> dict[str, Any]:
    config = load_config(config_path)
    store = Store(config.database_url)
    before = server.snapshot()
    with (
        CallCounter(feedparser, "parse") as fp,
        CallCounter(feeds_module, "parse_feed") as pf,
        CallCounter(digest_module, "fetch_all") as fa,
    ):
        start = perf_counter()
        reports = fetch(RunContext(config, store))
        seconds = perf_counter() - start
    store.close()
    after = server.snapshot()
    statuses: dict[str, int] = {}
    for r in reports:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "seconds": seconds,
        "fetch_all": fa.seconds,
        "statuses": statuses,
        "new": sum(r.new for r in reports),
        "errors": [r.error for r in reports if r.error],
        "feedparser_parse": fp.calls,
        "parse_feed": pf.calls,
        "served_200": after[0] - before[0],
        "served_304": after[1] - before[1],
        "conditional": after[2] - before[2],
    }


def measure(
    server: SlowFeeds, workers: int | None, rounds: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    firsts, seconds = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-poll-") as tmp:
            config_path = write_config(Path(tmp), server.urls, workers)
            firsts.append(one_round(config_path, server))
            seconds.append(one_round(config_path, server))
    n = len(server.urls)
    for r in firsts:
        if r["statuses"] != {"ok": n} or r["errors"]:
            sys.exit(f"first round: expected {n} ok feeds, got {r['statuses']} {r['errors'][:3]}")
    for r in seconds:
        if r["statuses"] != {"not-modified": n}:
            sys.exit(f"304 round: expected {n} not-modified feeds, got {r['statuses']} {r['errors'][:3]}")
    return firsts, seconds


def report(
    label: str, workers: int, firsts: list[dict[str, Any]], seconds: list[dict[str, Any]], delay: float
) -> None:
    n = firsts[0]["statuses"]["ok"]
    floor = math.ceil(n / workers) * delay
    t1 = statistics.median(r["seconds"] for r in firsts)
    t2 = statistics.median(r["seconds"] for r in seconds)
    print(f"\n{label}: {n} feeds, {workers} workers; floor ceil({n}/{workers}) x {delay:g} s = {floor:.2f} s")
    verdict = "ok" if t1 < TARGET else "OVER TARGET"
    runs1 = ", ".join(f"{r['seconds']:.2f}" for r in firsts)
    runs2 = ", ".join(f"{r['seconds']:.2f}" for r in seconds)
    show("round 1 (all new), median", f"{t1:.2f} s  (runs {runs1}; target < {TARGET:g} s) {verdict}")
    show("  ratio to the floor", f"{t1 / floor:.2f}x")
    fa = statistics.median(r["fetch_all"] for r in firsts)
    show("  of which feeds.fetch_all (download + parse)", f"{fa:.2f} s; storing the entries {t1 - fa:.2f} s")
    r = firsts[0]
    show(
        "  parsed / served",
        f"feedparser.parse {r['feedparser_parse']}, parse_feed {r['parse_feed']},"
        f" HTTP 200 {r['served_200']}, new entries {r['new']}",
    )
    show("round 2 (every feed 304), median", f"{t2:.2f} s  (runs {runs2}); ratio to round 1 {t2 / t1:.2f}")
    parsed = sum(r["feedparser_parse"] + r["parse_feed"] for r in seconds)
    answered = sum(r["served_304"] for r in seconds)
    conditional = sum(r["conditional"] for r in seconds)
    show(
        "  parsed / served, all round-2 runs",
        f"feedparser.parse {sum(r['feedparser_parse'] for r in seconds)},"
        f" parse_feed {sum(r['parse_feed'] for r in seconds)};"
        f" {conditional} conditional requests, {answered} answered 304,"
        f" {sum(r['served_200'] for r in seconds)} answered 200",
    )
    show("  no parsing in the 304 round", "yes" if parsed == 0 and answered == n * len(seconds) else "NO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feeds", type=int, default=50, help="default 50")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds before each answer (default 0.2)")
    parser.add_argument("--entries", type=int, default=20, help="entries per feed (default 20)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="repetitions, each from a fresh state (default 3)"
    )
    args = parser.parse_args()
    line_buffered()
    print(
        f"polling benchmark: {args.feeds} feeds of {args.entries} entries, each answering after"
        f" {args.delay * 1e3:.0f} ms; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    with SlowFeeds(args.feeds, args.delay, args.entries) as server:
        size = sum(map(len, server.bodies)) / len(server.bodies) / 1024
        print(f"  server {server.base}, {size:,.1f} KB per feed; newsletter.digest.fetch with the store")
        workers = FetchSettings().workers  # what a schedules.yaml without fetch.workers gets
        start = perf_counter()
        for body in server.bodies:
            feeds_module.parse_feed(body, "application/rss+xml", server.base)
        parse_all = perf_counter() - start
        print(
            f"  parse_feed of all {args.feeds} bodies, one after another, no I/O:"
            f" {parse_all:.2f} s (the CPU floor of round 1)"
        )
        firsts, seconds = measure(server, None, args.rounds)
        report("default fetch settings", workers, firsts, seconds, args.delay)
        wide = min(64, args.feeds)
        firsts_w, seconds_w = measure(server, wide, args.rounds)
        report(f"for comparison, fetch.workers: {wide}", wide, firsts_w, seconds_w, args.delay)


if __name__ == "__main__":
    main()
