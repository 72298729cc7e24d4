"""Benchmark (issue 6, item 2): the cost of building an issue's personalised messages, not sending them.

    .venv/bin/python bench/bench_build.py [--subscribers 10000] [--articles 25] [--sizes 1000,100000]

1. Time, in this process, for the issue of 25 articles to 10,000 subscribers: the
   once-per-issue work (render, premailer, Skeleton) and the microseconds per message beyond
   it, i.e. exactly what the delivery loop does per subscriber before it calls the sender
   (``IssueBuilder.recipient`` + ``Skeleton.build``), median of several passes. Target: <= 50 µs.
2. Memory: peak RSS (VmHWM in ``/proc/self/status``) of a fresh child process
   per list size, in two modes:
   - ``send``: the whole ``send_digest`` (CSV, fetch, render, ledger rows, every message built
     and handed to a sender), with a ``discard`` sender registered in-process that drops the
     bytes: what a real send holds in memory, minus the socket;
   - ``build``: only ``IssueBuilder`` (which loads the list) and the build loop, no ledger.
   Target: peak RSS at 100,000 subscribers within 1.5x of that at 1,000, in the same run.
   Each child also reports its per-message time, so part 1 is cross-checked at both sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

from _support import line_buffered, ms, show
from bench_digest import (
    ISSUE_REPEATS,
    SCHEDULE,
    SEED,
    bench_build,
    feed_xml,
    median_pass,
    send_builder,
    write_project,
    write_subscribers,
)

from newsletter.config import load_config
from newsletter.context import RunContext
from newsletter.digest import fetch, send_digest
from newsletter.model import Issue, now
from newsletter.senders import Outgoing, Sender
from newsletter.store import Store

TARGET_US = 50.0
TARGET_RSS = 1.5
# This VM's speed drifts by tens of per cent within seconds: five passes, median and best shown.
PASSES = 5


class DiscardSender(Sender):
    """Takes every message and keeps only counts: building is measured, not sending."""

    messages = 0
    bytes = 0

    def send(self, message: Outgoing) -> None:
        DiscardSender.messages += 1
        DiscardSender.bytes += len(message.data)


def register_discard(folder: Path) -> None:
    """Register DiscardSender the way any plugin package is: an entry point in its metadata."""
    site = folder / "discard-site"
    info = site / "bench_discard-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-discard\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[newsletter.senders]\ndiscard = bench_build:DiscardSender\n")
    sys.path.insert(0, str(site))
    # The entry point names this module; run as a script it is __main__, so say it is that one.
    sys.modules.setdefault("bench_build", sys.modules[__name__])


def write_discard_project(root: Path, subscribers: int, articles: int) -> Path:
    rng = random.Random(SEED)
    (root / "feed.xml").write_text(feed_xml(articles, rng), encoding="utf-8")
    (root / "subscribers").mkdir()
    write_subscribers(root / "subscribers" / f"{SCHEDULE}.csv", subscribers, rng)
    config = root / "schedules.yaml"
    config.write_text(
        f"""\
database: sqlite:///state.db
templates: null
fetch:
  first_fetch_newest: {articles}
senders:
  drop:
    type: discard
schedules:
  {SCHEDULE}:
    title: Bench Weekly
    feeds:
      - feed.xml
    subscribers: {SCHEDULE}
    sender: drop
    from: Bench Weekly <news@example.org>
    max_articles: {articles}
    unsubscribe_url: https://news.example.org/unsubscribe/{{token}}
""",
        encoding="utf-8",
    )
    return config


def maxrss_mib() -> float:
    """This process's peak resident set, from /proc: ``getrusage``'s ru_maxrss would carry over
    the parent's peak across fork and exec, and a small child would read as big as its parent."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kilobytes
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


# -- the child: one size, one mode, a fresh interpreter ------------------------------------------


def child(mode: str, config_path: Path) -> dict[str, Any]:
    register_discard(config_path.parent)
    config = load_config(config_path)
    base_rss = maxrss_mib()
    gc.collect()
    out: dict[str, Any] = {"mode": mode, "rss_after_imports_mib": base_rss}
    if mode == "send":
        store = Store(config.database_url)
        built: list[float] = []

        def on_issue(_count: int) -> None:
            built.append(perf_counter())

        start = perf_counter()
        report = send_digest(RunContext(config, store), SCHEDULE, on_issue=on_issue)
        end = perf_counter()
        store.close()
        issue = report.issues[0] if report.issues else None
        out.update(
            subscribers=issue.sent if issue else 0,
            ok=report.ok and DiscardSender.messages == (issue.sent if issue else -1),
            total_s=end - start,
            before_delivery_s=built[0] - start if built else 0.0,
            delivery_s=end - built[0] if built else 0.0,
            mean_bytes=DiscardSender.bytes / max(1, DiscardSender.messages),
        )
    else:
        store = Store(f"sqlite:///{config_path.parent / 'build.db'}")
        t0 = perf_counter()
        run = send_builder(config, store)
        t1 = perf_counter()
        fetch(RunContext(config, store), [SCHEDULE])
        entries = store.new_entries(run.feed_urls, 0, store.max_entry_id(), run.schedule.max_articles)
        date = now()
        t2 = perf_counter()
        rendered = run.render(entries, 1, date)
        payload = {**rendered.to_payload(), "date": date.isoformat()}
        issue = Issue(0, SCHEDULE, 1, date, "draft", [e.id for e in entries], rendered.subject, payload)
        skeleton = run.skeleton(issue)
        t3 = perf_counter()
        size = n = 0
        # A page of the list at a time, as the delivery loop reads the ledger.
        for sub, _ in store.subscribers(run.list_name):
            size += len(skeleton.build(run.recipient(sub))[1])
            n += 1
        t4 = perf_counter()
        store.close()
        out.update(
            subscribers=n,
            ok=n > 0,
            load_list_s=t1 - t0,
            once_per_issue_s=t3 - t2,
            build_loop_s=t4 - t3,
            mean_bytes=size / max(1, n),
        )
    out["peak_rss_mib"] = maxrss_mib()
    return out


def run_child(mode: str, config_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(config_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"child {mode} {config_path} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result.get("ok"):
        sys.exit(f"child {mode} did not build every message: {result}")
    return result


# -- the parent ----------------------------------------------------------------------------------


def part_time(subscribers: int, articles: int) -> float:
    """Part 1; returns µs per message."""
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        root = Path(tmp)
        config_path = write_project(root, subscribers, articles, smtp_port=25)  # never connected
        b = bench_build(load_config(config_path), root, articles, passes=PASSES)
    n = b.subscribers
    warm = [c.total for c in b.warm]
    mid = median_pass(b.passes)
    per_msg = mid.total / n * 1e6
    print(f"\n1. time: one issue of {articles} articles to {n:,} subscribers, built in memory")
    show("message size (median)", f"{statistics.median(b.message_bytes) / 1024:,.1f} KB")
    show("once per issue, first (compiles templates)", ms(b.cold.total))
    show(f"once per issue, median of {ISSUE_REPEATS} warm", ms(statistics.median(warm)))
    show(
        f"per message beyond that, median of {PASSES} passes",
        f"{per_msg:,.1f} µs  (target <= {TARGET_US:g}; ratio {per_msg / TARGET_US:.2f}x the target)",
    )
    show("  IssueBuilder.recipient (unsubscribe token, values)", f"{mid.recipient / n * 1e6:,.1f} µs")
    show("  Skeleton.build (headers, splice, join)", f"{mid.build / n * 1e6:,.1f} µs")
    show("  each pass", ", ".join(f"{p.total / n * 1e6:,.1f}" for p in b.passes) + " µs/msg")
    best = min(p.total for p in b.passes) / n * 1e6
    show("  best pass", f"{best:,.1f} µs  (ratio {best / TARGET_US:.2f}x the target)")
    show(
        "all messages vs the once-per-issue work",
        f"{mid.total * 1e3:,.0f} ms vs {statistics.median(warm) * 1e3:,.0f} ms",
    )
    return per_msg


def part_memory(sizes: list[int], articles: int) -> dict[str, dict[int, dict[str, Any]]]:
    print(f"\n2. memory: peak RSS of a fresh process per size ({', '.join(f'{s:,}' for s in sizes)})")
    results: dict[str, dict[int, dict[str, Any]]] = {"send": {}, "build": {}}
    with tempfile.TemporaryDirectory(prefix="bench-build-rss-") as tmp:
        for size in sizes:
            for mode in ("send", "build"):
                root = Path(tmp) / f"{mode}-{size}"
                root.mkdir()
                config_path = write_discard_project(root, size, articles)
                results[mode][size] = r = run_child(mode, config_path)
                if mode == "send":
                    detail = (
                        f"whole send_digest {r['total_s']:,.2f} s"
                        f" (delivery {r['delivery_s'] / size * 1e6:,.0f} µs/msg incl. ledger)"
                    )
                else:
                    detail = (
                        f"list {r['load_list_s'] * 1e3:,.0f} ms, build loop"
                        f" {r['build_loop_s'] / size * 1e6:,.1f} µs/msg"
                    )
                show(
                    f"{mode:<5} {size:>7,} subscribers",
                    f"peak {r['peak_rss_mib']:,.1f} MiB"
                    f" (after imports {r['rss_after_imports_mib']:,.1f}); {detail}",
                    28,
                )
    small, large = min(sizes), max(sizes)
    for mode, label in (("send", "send_digest + discard sender"), ("build", "build only (builder + loop)")):
        a, b = results[mode][small]["peak_rss_mib"], results[mode][large]["peak_rss_mib"]
        verdict = "ok" if b / a <= TARGET_RSS else "ABOVE TARGET"
        show(
            f"ratio {large:,}/{small:,}, {label}",
            f"{b / a:.2f}x  ({b - a:+,.1f} MiB = {(b - a) * 1024 * 1024 / (large - small):,.0f} bytes"
            f" per extra subscriber; target <= {TARGET_RSS}x) {verdict}",
            48,
        )
    return results


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000, help="part 1 (default 10000)")
    parser.add_argument("--articles", type=int, default=25, help="default 25")
    parser.add_argument("--sizes", default="1000,100000", help="part 2 list sizes (default 1000,100000)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--sizes needs two or more positive sizes")
    line_buffered()
    print(
        f"build benchmark: {args.articles} articles; Python {platform.python_version()},"
        f" {os.cpu_count()} CPUs; nothing is sent anywhere"
    )
    per_msg = part_time(args.subscribers, args.articles)
    results = part_memory(sizes, args.articles)
    small, large = sizes[0], sizes[-1]
    send_ratio = results["send"][large]["peak_rss_mib"] / results["send"][small]["peak_rss_mib"]
    build_ratio = results["build"][large]["peak_rss_mib"] / results["build"][small]["peak_rss_mib"]
    print("\nsummary")
    show("per message beyond the once-per-issue work", f"{per_msg:,.1f} µs (target <= {TARGET_US:g})")
    loops = ", ".join(
        f"{results['build'][s]['build_loop_s'] / s * 1e6:,.1f} µs at {s:,}" for s in (small, large)
    )
    show("  the same loop in the fresh children", loops)
    show(f"peak RSS {large:,} / {small:,}, send_digest", f"{send_ratio:.2f}x (target <= {TARGET_RSS})")
    show(f"peak RSS {large:,} / {small:,}, build only", f"{build_ratio:.2f}x (target <= {TARGET_RSS})")


if __name__ == "__main__":
    main()
