"""Benchmark (issue 6, item 3): newsletter against rss2email 3.14, the same feed, server and reader.

    .venv/bin/python bench/bench_rss2email.py [--entries 200] [--trials 3]

- rss2email 3.14 is installed from PyPI into its own virtual environment,
  bench/.cache/rss2email-3.14 (made here, reused while it holds 3.14; never a project
  dependency).
- One 200-entry RSS feed served on 127.0.0.1 by a small http.server with a strong ETag:
  ``If-None-Match`` with the current ETag gets ``304 Not Modified``.
- One SMTP server for both: aiosmtpd in a child process, counting messages and bytes.
- One recipient. rss2email in HTML digest mode (its documented keys: ``digest = True``,
  ``html-mail = True``, ``email-protocol = smtp``, ``smtp-server = 127.0.0.1:PORT``,
  ``use-8bit`` left at its default False); newsletter with ``max_articles: 200`` and
  ``first_fetch_newest: 200``, so both mail all 200 entries on the first run, as rss2email
  does for a newly added feed.
- Each tool is timed as a whole process (``r2e run``, ``newsletter send-digest``) from a
  fresh state: the first run (everything new: one digest of 200 entries), then a second run
  (the feed answers 304: nothing to send). Several trials, alternating which tool goes first;
  medians and the ratio rss2email / newsletter (above 1: ours is faster). Target: ours faster
  on both runs.
- Last, the floor: how long a bare interpreter and one that imports the libraries a
  nothing-new run needs (click, PyYAML, pydantic, requests, sqlite3) take to start, beside
  rss2email's whole nothing-new run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from time import perf_counter

from _support import CACHE, LOOPBACK, REPO, AiosmtpdProcess, line_buffered, show
from bench_digest import SEED, feed_xml

R2E_VERSION = "3.14"
RECIPIENT = "reader@example.org"
NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


# -- the feed server -----------------------------------------------------------------------------


class FeedServer:
    """Serves one feed with a strong ETag and honours If-None-Match; counts what it answered."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        self.full = self.not_modified = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/feed.xml":
                    self.send_error(404)
                    return
                tags = [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]
                if outer.etag in tags:
                    with outer.lock:
                        outer.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", outer.etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with outer.lock:
                    outer.full += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
                self.send_header("ETag", outer.etag)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}/feed.xml"

    def __enter__(self) -> FeedServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.full, self.not_modified


# -- rss2email in its own virtual environment ---------------------------------------------------


def ensure_rss2email() -> tuple[Path | None, str]:
    """(path of r2e, how) or (None, why not)."""
    venv = CACHE / f"rss2email-{R2E_VERSION}"
    r2e = venv / "bin" / "r2e"
    if r2e.exists():
        done = subprocess.run(
            [str(r2e), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0 and R2E_VERSION in (done.stdout + done.stderr):
            return r2e, f"reused {venv.relative_to(REPO)}"
        shutil.rmtree(venv)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"  installing rss2email=={R2E_VERSION} from PyPI into {venv.relative_to(REPO)} ...")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120
        )
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"rss2email=={R2E_VERSION}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not create the virtual environment: {exc}"
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return None, f"pip install rss2email=={R2E_VERSION} failed: {tail}"
    version = subprocess.run([str(r2e), "--version"], capture_output=True, text=True, timeout=60, check=False)
    if version.returncode != 0 or R2E_VERSION not in (version.stdout + version.stderr):
        return None, f"r2e --version does not run: {(version.stderr or version.stdout).strip()[-300:]}"
    return r2e, f"installed into {venv.relative_to(REPO)}"


R2E_CONFIG = """\
[DEFAULT]
to = {to}
from = bench@example.org
digest = True
html-mail = True
use-8bit = False
email-protocol = smtp
smtp-server = {host}:{port}
smtp-auth = False
smtp-ssl = False
verbose = warning
"""


def setup_rss2email(r2e: Path, root: Path, feed_url: str, smtp_port: int) -> list[str]:
    """A fresh rss2email configuration and data file; returns the timed command."""
    cfg, data = root / "r2e.cfg", root / "r2e.json"
    base = [str(r2e), "-c", str(cfg), "-d", str(data)]
    # `new` writes the data file (and a default configuration, replaced just below).
    must([*base, "new", RECIPIENT], "r2e new")
    cfg.write_text(R2E_CONFIG.format(to=RECIPIENT, host=LOOPBACK, port=smtp_port), encoding="utf-8")
    must([*base, "add", "bench", feed_url], "r2e add")
    return [*base, "run"]


# -- newsletter ---------------------------------------------------------------------------------


def setup_newsletter(root: Path, feed_url: str, smtp_port: int, entries: int) -> list[str]:
    (root / "subscribers").mkdir()
    (root / "subscribers" / "one.csv").write_text(f"email,name\n{RECIPIENT},Reader\n", encoding="utf-8")
    config = root / "schedules.yaml"
    # No local_hostname (an option rss2email lacks): both let smtplib look up the FQDN.
    config.write_text(
        f"""\
database: sqlite:///state.db
templates: null
fetch:
  first_fetch_newest: {entries}
senders:
  local:
    type: smtp
    host: {LOOPBACK}
    port: {smtp_port}
schedules:
  bench:
    title: Bench Weekly
    feeds:
      - {feed_url}
    subscribers: one
    sender: local
    from: Bench Weekly <news@example.org>
    max_articles: {entries}
    unsubscribe_url: https://news.example.org/unsubscribe/{{token}}
""",
        encoding="utf-8",
    )
    return [NEWSLETTER, "--config", str(config), "send-digest", "bench"]


# -- running and timing -------------------------------------------------------------------------


def must(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


@dataclass
class Timed:
    seconds: float
    messages: int
    bytes: int
    max_line: int  # the longest line of the message sent (0: none sent)
    full: int  # 200 answers the feed server gave
    not_modified: int  # 304 answers


@dataclass
class Tool:
    name: str
    first: list[Timed] = field(default_factory=list)
    second: list[Timed] = field(default_factory=list)


def timed(cmd: list[str], cwd: Path, smtp: AiosmtpdProcess, feed: FeedServer, what: str) -> Timed:
    m0, b0 = smtp.counts()
    f0, n0 = feed.counts()
    env = dict(os.environ)
    env.pop("NEWSLETTER_SECRET", None)
    env.pop("NEWSLETTER_CONFIG", None)
    # Both tools run from cached bytecode, as installed packages do (pip compiles rss2email's;
    # ours is an editable install, so its .pyc files must be allowed to be written once).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, env=env, check=False)
    seconds = perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{what} exited {done.returncode}:\n{(done.stderr + done.stdout).strip()[-3000:]}")
    after = smtp.stats()
    m1, b1 = after["messages"], after["bytes"]
    f1, n1 = feed.counts()
    return Timed(seconds, m1 - m0, b1 - b0, after["last_max_line"] if m1 > m0 else 0, f1 - f0, n1 - n0)


def trial(
    tools: dict[str, Tool],
    r2e: Path | None,
    feed: FeedServer,
    smtp: AiosmtpdProcess,
    entries: int,
    order: list[str],
) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-r2e-") as tmp:
        cmds: dict[str, tuple[list[str], Path]] = {}
        for name in order:
            root = Path(tmp) / name
            root.mkdir()
            if name == "rss2email":
                assert r2e is not None
                cmds[name] = setup_rss2email(r2e, root, feed.url, smtp.port), root
            else:
                cmds[name] = setup_newsletter(root, feed.url, smtp.port, entries), root
        for run in ("first", "second"):
            for name in order:
                cmd, root = cmds[name]
                result = timed(cmd, root, smtp, feed, f"{name} {run} run")
                expected = (1, 1, 0) if run == "first" else (0, 0, 1)
                got = (result.messages, result.full, result.not_modified)
                if got != expected:
                    sys.exit(
                        f"{name} {run} run: expected (messages, 200s, 304s) = {expected}, got {got};"
                        " the comparison would be unfair"
                    )
                getattr(tools[name], run).append(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200, help="feed entries (default 200)")
    parser.add_argument("--trials", type=int, default=5, help="fresh-state trials (default 5)")
    args = parser.parse_args()
    line_buffered()
    print(
        f"rss2email comparison: one {args.entries}-entry RSS feed, one recipient, 127.0.0.1 only;"
        f" Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    r2e, how = ensure_rss2email()
    if r2e is None:
        print(f"  rss2email {R2E_VERSION} CANNOT RUN here: {how}")
        print("  only newsletter is timed below; no ratio")
    else:
        print(f"  rss2email {R2E_VERSION}: {r2e} ({how})")

    body = feed_xml(args.entries, random.Random(SEED)).encode("utf-8")
    names = ["rss2email", "newsletter"] if r2e is not None else ["newsletter"]
    tools = {n: Tool(n) for n in names}
    # rss2email 3.14 writes HTML digests with lines far over RFC 5322's 998 characters, which
    # aiosmtpd refuses by default ("500 Line too long"); Postfix, say, takes them. The limit is
    # raised for both tools, and each message's longest line is printed.
    with FeedServer(body) as feed, AiosmtpdProcess(line_limit=16 * 2**20) as smtp:
        print(
            f"  feed {feed.url}: {len(body) / 1024:,.1f} KB, ETag {feed.etag}; aiosmtpd on port {smtp.port}"
        )
        for t in range(args.trials):
            order = names if t % 2 == 0 else names[::-1]
            trial(tools, r2e, feed, smtp, args.entries, order)
            line = "; ".join(
                f"{n} {tools[n].first[-1].seconds:.2f} s / {tools[n].second[-1].seconds:.2f} s" for n in order
            )
            print(f"  trial {t + 1} (first / second run): {line}")

    print(
        f"\nwall time, whole process, median of {args.trials} trials (first run: 1 digest of {args.entries})"
    )
    print(f"  {'':<12} {'first run':>10} {'second run':>11} {'message':>10} {'longest line':>13}")
    for tool in tools.values():
        print(
            f"  {tool.name:<12} {statistics.median(t.seconds for t in tool.first):>9.2f}s"
            f" {statistics.median(t.seconds for t in tool.second):>10.2f}s"
            f" {statistics.median(t.bytes for t in tool.first) / 1024:>7,.0f} KB"
            f" {max(t.max_line for t in tool.first):>13,}"
        )
    if r2e is None:
        sys.exit(1)
    ours, peer = tools["newsletter"], tools["rss2email"]
    for run in ("first", "second"):
        theirs = statistics.median(t.seconds for t in getattr(peer, run))
        mine = statistics.median(t.seconds for t in getattr(ours, run))
        per_trial = [
            p.seconds / o.seconds for p, o in zip(getattr(peer, run), getattr(ours, run), strict=True)
        ]
        verdict = "ours faster" if theirs > mine else "ours SLOWER"
        show(
            f"ratio rss2email / newsletter, {run} run",
            f"{theirs / mine:.2f}  (per trial: {', '.join(f'{r:.2f}' for r in per_trial)}) {verdict}",
            40,
        )

    floor(statistics.median(t.seconds for t in peer.second))


# The libraries newsletter's nothing-new run cannot do without: the CLI, the config file and its
# schema, HTTP (a conditional GET), the state database.
STACK = "import click, yaml, pydantic, requests, sqlite3"


def floor(peer_second: float) -> None:
    """How long the nothing-new run's libraries take just to import, against the peer's run."""

    def wall(code: str) -> float:
        times = []
        for _ in range(10):
            start = perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(perf_counter() - start)
        return statistics.median(times)

    bare, stack = wall("pass"), wall(STACK)
    print(f"\nthe floor under a nothing-new run, median of 10 processes of {sys.executable}")
    show("python -c pass", f"{bare:.2f}s", 45)
    show("import click, yaml, pydantic, requests, sqlite3", f"{stack:.2f}s", 45)
    show("rss2email's whole nothing-new run", f"{peer_second:.2f}s", 45)


if __name__ == "__main__":
    main()
