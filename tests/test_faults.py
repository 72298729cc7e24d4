"""The fault suite: under kills, broken mail servers, hostile feeds and a database that cannot be
written, nothing is lost, nothing is sent twice beyond the one message in flight, no run hangs
past its timeout and no run ends in a traceback.

Everything here is real: feeds come over HTTP and mail goes over SMTP, all on 127.0.0.1, and
the run that meets the fault is `newsletter` as a subprocess (so a SIGKILL is a SIGKILL, a run
that hangs is seen to, and a traceback on stderr is seen). The runs around it, the set-up fetch
and the next run that must finish the issue, run in this process (`cli_here`): the same exit
code and output without a second of start-up each. So do the feeds whose content alone is
hostile; those that could hang or exhaust a process are fetched by a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import errno
import gzip
import html
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import FeedServer, Mailbox, Project, Route, item, rss, run_in_process

# Every test is bounded: 60 s unless marked. The database-lock tests set the store's busy
# timeout to STORE_LOCK_WAIT (1 s, not the 30 s default) so that giving up is quick to watch.
pytestmark = pytest.mark.timeout(60)

SCHEDULE = "weekly"


# -- running the CLI as a real process -----------------------------------------------------------


def command(project: Project, *args: str) -> list[str]:
    return [sys.executable, "-m", "newsletter", "--config", str(project.config), *args]


ENV = {**os.environ, "NEWSLETTER_SECRET": "fault-suite"}


def cli(project: Project, *args: str, timeout: float = 45) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI to the end; return the process and how long it took."""
    start = time.monotonic()
    done = subprocess.run(command(project, *args), capture_output=True, text=True, timeout=timeout, env=ENV)
    return done, time.monotonic() - start


def cli_here(project: Project, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """What `cli` answers, from a run in this process."""
    start = time.monotonic()
    done = run_in_process(["--config", str(project.config), *args], env={"NEWSLETTER_SECRET": "fault-suite"})
    return done, time.monotonic() - start


def start(project: Project, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(project, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"--- exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def assert_clean_exit(done: subprocess.CompletedProcess[str], code: int) -> None:
    """The exit code a user scripts against, and no traceback in anything the run printed."""
    assert done.returncode == code, output(done)
    assert "Traceback" not in done.stdout + done.stderr, output(done)
    assert "Exception in thread" not in done.stderr, output(done)


def configure(
    project: Project,
    feeds: list[str],
    *,
    smtp_port: int | None = None,
    smtp_timeout: float = 10,
    fetch: str = "",
    database: str = "state.db",
    subscribers: list[str] | None = None,
    busy_timeout: float | None = None,
) -> None:
    """schedules.yaml with one schedule `weekly`; smtp when a port is given, else the file sender."""
    if smtp_port:
        # One connection: these faults are about one conversation, its counts exact. Many
        # connections meet the same faults in tests/test_pipeline.py. Throttling backs off
        # briefly here, and a server that keeps at it is given up on within 2 s.
        sender = (
            f"type: smtp\n    host: 127.0.0.1\n    port: {smtp_port}\n    timeout: {smtp_timeout}"
            "\n    connections: 1\n    backoff_max: 0.05\n    patience: 2"
        )
    else:
        sender = "type: file\n    path: outbox"
    feed_lines = "\n".join(f"      - {f}" for f in feeds)
    fetch_lines = textwrap.indent(textwrap.dedent(fetch).strip(), "  ")
    project.config.write_text(
        f"""\
database: sqlite:///{database}
{f"busy_timeout: {busy_timeout}s" if busy_timeout is not None else ""}
fetch:
  first_fetch_newest: 50
{fetch_lines}
senders:
  main:
    {sender}
schedules:
  {SCHEDULE}:
    title: Test Weekly
    feeds:
{feed_lines}
    subscribers: readers
    sender: main
    from: Test Weekly <news@example.net>
    unsubscribe_url: https://news.example.net/unsubscribe/{{token}}
""",
        encoding="utf-8",
    )
    if subscribers is not None:
        project.write_subscribers(subscribers)


def readers(n: int) -> list[str]:
    return [f"reader{i:03d}@example.com" for i in range(n)]


def ledger(db_path: Path, number: int = 1) -> dict[str, str]:
    """recipient -> delivery status of issue `number`, read straight from the state database."""
    if not db_path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db:
        rows = db.execute(
            "SELECT d.recipient, d.status FROM deliveries d JOIN issues i ON i.id = d.issue_id"
            " WHERE i.schedule = ? AND i.number = ?",
            (SCHEDULE, number),
        ).fetchall()
    return {r: s for r, s in rows}


def issues(db_path: Path) -> list[tuple[int, str]]:
    if not db_path.exists():
        return []
    # No tables yet is no issues yet.
    with (
        contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db,
        contextlib.suppress(sqlite3.OperationalError),
    ):
        rows = db.execute(
            "SELECT number, status FROM issues WHERE schedule = ? ORDER BY number", (SCHEDULE,)
        ).fetchall()
        return [(int(n), str(s)) for n, s in rows]
    return []


def assert_ledger_not_ahead_of_the_wire(db_path: Path, received: Counter[str]) -> None:
    """Whoever the ledger calls sent really has a copy: a recorded send is never a lost one."""
    claimed = {r for r, s in ledger(db_path).items() if s == "sent"}
    missing = sorted(claimed - set(received))
    assert not missing, f"recorded as sent but never received: {missing[:10]}"


# -- a mail server that misbehaves ---------------------------------------------------------------


class FaultySmtp:
    """A hand-written SMTP server on 127.0.0.1 that accepts `good` messages, then misbehaves.

    fault:
      "drop"   closes the connection half-way through a message's DATA (the message is lost
               on the server's side: nothing was accepted);
      "421"    answers MAIL FROM with 421 and closes the connection;
      "452"    answers RCPT TO with 452 for the addresses in `refuse` (all along);
      "stall"  reads a message's DATA to the final dot, keeps it, and never answers: the
               message was in flight when the client gave up.
    times: how many times the fault happens; None means from then on, for good: a server that
    stays broken also greets new connections with 421 ("421") or not at all ("stall").
    """

    def __init__(self, fault: str, good: int = 0, times: int | None = None, refuse: set[str] | None = None):
        self.fault, self.good, self.times = fault, good, times
        self.refuse = {a.lower() for a in refuse or set()}
        self.accepted: list[tuple[list[str], bytes]] = []
        self.faults = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(5), "the faulty SMTP server did not start"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def by_recipient(self) -> Counter[str]:
        return Counter(r.lower() for rcpts, _ in self.accepted for r in rcpts)

    def _due(self) -> bool:
        """Is it time to misbehave?"""
        return len(self.accepted) >= self.good and (self.times is None or self.faults < self.times)

    @property
    def _broken_for_good(self) -> bool:
        return self.times is None and self.faults > 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        if self._broken_for_good and self.fault == "421":
            await say("421 4.3.2 faulty.test Service shutting down")
            return
        if self._broken_for_good and self.fault == "stall":
            await asyncio.sleep(3600)  # no greeting, ever
        await say("220 faulty.test ESMTP")
        rcpts: list[str] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            address = m.group(1).decode() if (m := re.search(rb"<([^>]*)>", line)) else ""
            if verb == b"EHLO":
                await say("250-faulty.test\r\n250-8BITMIME\r\n250 SIZE 52428800")
            elif verb == b"HELO":
                await say("250 faulty.test")
            elif verb == b"MAIL":
                if self.fault == "421" and self._due():
                    self.faults += 1
                    await say("421 4.3.2 faulty.test Too busy, closing connection")
                    return
                rcpts = []
                await say("250 2.1.0 OK")
            elif verb == b"RCPT":
                if self.fault == "452" and address.lower() in self.refuse:
                    self.faults += 1
                    await say("452 4.2.2 Mailbox full, try again later")
                else:
                    rcpts.append(address)
                    await say("250 2.1.5 OK")
            elif verb == b"DATA":
                if not rcpts:
                    await say("503 5.5.1 No valid recipients")
                    continue
                await say("354 End data with <CR><LF>.<CR><LF>")
                if self.fault == "drop" and self._due():
                    self.faults += 1
                    await reader.readline()  # a little of the message, then the line goes dead
                    return
                data = await self._read_data(reader)
                stall = self.fault == "stall" and self._due()
                self.accepted.append((list(rcpts), data))
                rcpts = []
                if stall:
                    self.faults += 1
                    await asyncio.sleep(3600)  # took the message; the reply never comes
                await say("250 2.0.0 Message accepted")
            elif verb in (b"RSET", b"NOOP"):
                rcpts = [] if verb == b"RSET" else rcpts
                await say("250 2.0.0 OK")
            elif verb == b"QUIT":
                await say("221 2.0.0 Bye")
                return
            else:
                await say("502 5.5.2 Command not recognized")

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes:
        lines = []
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                raise ConnectionError("client went away mid-DATA")
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)


@pytest.fixture
def faulty_smtp() -> Iterator[list[FaultySmtp]]:
    """Servers a test makes with FaultySmtp(...) and appends here are closed afterwards."""
    servers: list[FaultySmtp] = []
    yield servers
    for server in servers:
        server.close()


# -- SMTP servers that misbehave ----------------------------------------------------------------

MAIL_READERS = 20


def mail_project(project: Project, feed_server: FeedServer, port: int, *, smtp_timeout: float = 10) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    configure(
        project,
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        smtp_timeout=smtp_timeout,
        subscribers=readers(MAIL_READERS),
    )


def finish_against_a_good_server(
    project: Project, feed_server: FeedServer, box: Mailbox, port: int, faulty: FaultySmtp, *, duplicates: int
) -> None:
    """The next run, against a well-behaved server, finishes the issue; nothing is lost."""
    assert_ledger_not_ahead_of_the_wire(project.root / "state.db", faulty.by_recipient())
    mail_project(project, feed_server, port)
    second, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(second, 0)
    assert f"sent {MAIL_READERS}, pending 0, failed 0" in second.stdout, output(second)
    copies = faulty.by_recipient() + Counter(box.by_recipient())
    assert set(copies) == set(readers(MAIL_READERS)), "someone got nothing"
    extra = sum(n - 1 for n in copies.values())
    assert extra <= duplicates, f"{extra} duplicate(s): {sorted(r for r, n in copies.items() if n > 1)}"
    # Still issue #1: the rerun finished it rather than building another.
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}
    third, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(third, 0)
    assert "nothing new" in third.stdout
    assert faulty.by_recipient() + Counter(box.by_recipient()) == copies


def assert_issue_summary(done: subprocess.CompletedProcess[str], sent: int, pending: int) -> None:
    """A run that stops half-way still says where the issue stands, as every other run does.

    Checked last in each test, so that the invariants about the mail are checked even when
    this one fails.
    """
    line = f'{SCHEDULE} #1 "Test Weekly #1: Post 2": 2 article(s)'
    counts = f"sent {sent}, pending {pending}, failed 0 (unfinished: run again to retry)"
    assert line in done.stdout and counts in done.stdout, (
        f"no summary of issue #1 ({counts}) in the output of the stopped run:\n{output(done)}"
    )


def test_connection_dropped_mid_data_once_is_reopened_and_nothing_is_lost(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    faulty_smtp: list[FaultySmtp],
) -> None:
    box, _ = smtp_server
    faulty = FaultySmtp("drop", good=5, times=1)
    faulty_smtp.append(faulty)
    mail_project(project, feed_server, faulty.port)
    first, _ = cli(project, "send-digest", SCHEDULE)
    # "A dropped connection is reopened once": the run carries on and completes.
    assert_clean_exit(first, 0)
    assert f"sent {MAIL_READERS}, pending 0, failed 0" in first.stdout, output(first)
    assert faulty.faults == 1 and faulty.connections == 2
    # The dropped message never reached the end of its DATA, so its resend is its only copy.
    assert faulty.by_recipient() == Counter(readers(MAIL_READERS))
    assert box.messages == []


def test_connection_dropped_mid_data_for_good_stops_the_run_and_the_next_run_finishes(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    faulty_smtp: list[FaultySmtp],
) -> None:
    box, port = smtp_server
    faulty = FaultySmtp("drop", good=5)
    faulty_smtp.append(faulty)
    mail_project(project, feed_server, faulty.port)
    first, _ = cli(project, "send-digest", SCHEDULE)
    assert_clean_exit(first, 1)
    assert f"127.0.0.1:{faulty.port}" in first.stderr and "lost the connection" in first.stderr, output(first)
    assert len(faulty.accepted) == 5
    assert Counter(ledger(project.root / "state.db").values()) == {"sent": 5, "pending": MAIL_READERS - 5}
    # Nothing that was cut off mid-DATA had been accepted: no duplicate is acceptable.
    finish_against_a_good_server(project, feed_server, box, port, faulty, duplicates=0)
    assert_issue_summary(first, sent=5, pending=MAIL_READERS - 5)


@pytest.mark.parametrize("times", [1, None], ids=["once", "for-good"])
def test_421_backs_off_and_a_server_that_keeps_at_it_leaves_the_rest_pending(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    faulty_smtp: list[FaultySmtp],
    times: int | None,
) -> None:
    box, port = smtp_server
    faulty = FaultySmtp("421", good=5, times=times)
    faulty_smtp.append(faulty)
    mail_project(project, feed_server, faulty.port)
    first, _ = cli(project, "send-digest", SCHEDULE)
    states = Counter(ledger(project.root / "state.db").values())
    if times == 1:
        # "Slow down" is the server's pace, not the reader's fault: a pause, a new
        # connection, and the same message again. Nobody is deferred or failed for it.
        assert_clean_exit(first, 0)
        assert f"sent {MAIL_READERS}, pending 0, failed 0" in first.stdout, output(first)
        assert states == {"sent": MAIL_READERS}
        assert faulty.by_recipient() == Counter(readers(MAIL_READERS))
        return
    # A server that keeps saying 421: the run gives up within its patience, the rest pending.
    assert_clean_exit(first, 1)
    assert "421" in first.stderr and f"127.0.0.1:{faulty.port}" in first.stderr, output(first)
    assert states == {"sent": 5, "pending": MAIL_READERS - 5}
    finish_against_a_good_server(project, feed_server, box, port, faulty, duplicates=0)
    assert_issue_summary(first, sent=5, pending=MAIL_READERS - 5)


def test_452_for_some_recipients_defers_only_them_and_the_next_run_sends_only_them(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    faulty_smtp: list[FaultySmtp],
) -> None:
    box, port = smtp_server
    refused = set(readers(MAIL_READERS)[::4])
    faulty = FaultySmtp("452", refuse=refused)
    faulty_smtp.append(faulty)
    mail_project(project, feed_server, faulty.port)
    first, _ = cli(project, "send-digest", SCHEDULE)
    assert_clean_exit(first, 1)
    n = len(refused)
    assert f"sent {MAIL_READERS - n}, pending {n}, failed 0 (unfinished" in first.stdout, output(first)
    for address in refused:
        assert f"{address}: 452 4.2.2 Mailbox full" in first.stderr, output(first)
    assert set(faulty.by_recipient()) == set(readers(MAIL_READERS)) - refused
    finish_against_a_good_server(project, feed_server, box, port, faulty, duplicates=0)
    assert set(box.by_recipient()) == refused


def test_server_that_stalls_past_the_timeout_does_not_hang_the_run(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    faulty_smtp: list[FaultySmtp],
) -> None:
    box, port = smtp_server
    faulty = FaultySmtp("stall", good=5)
    faulty_smtp.append(faulty)
    mail_project(project, feed_server, faulty.port, smtp_timeout=1)
    first, took = cli(project, "send-digest", SCHEDULE)
    assert took < 1 + 10, f"took {took:.1f} s with a 1 s timeout"
    assert_clean_exit(first, 1)
    assert f"127.0.0.1:{faulty.port}" in first.stderr, output(first)
    # The sixth message was taken by the server and never acknowledged: it is in flight, and
    # the ledger must not call it sent; its resend is the one duplicate allowed.
    assert len(faulty.accepted) == 6
    assert Counter(ledger(project.root / "state.db").values()) == {"sent": 5, "pending": MAIL_READERS - 5}
    finish_against_a_good_server(project, feed_server, box, port, faulty, duplicates=1)
    assert_issue_summary(first, sent=5, pending=MAIL_READERS - 5)


# -- SIGKILL at random points ------------------------------------------------------------------

KILL_READERS = 300
KILLS = 10
KILL_SEED = 20260106  # the kill points are reproducible: a failure names them


@pytest.mark.timeout(120)
def test_ten_sigkills_at_random_points_lose_nobody_and_duplicate_at_most_one_each(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    box.data_delay = 0.004  # a couple of seconds for the whole list, so each kill lands mid-send
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    everyone = readers(KILL_READERS)
    configure(project, [feed_server.url("/feed.xml")], smtp_port=port, subscribers=everyone)
    db = project.root / "state.db"
    rng = random.Random(KILL_SEED)
    # Kill points by messages received so far; each kill waits for at least one message of its
    # own run, so every one lands during a send, and sleeps a random fraction of a message more
    # so it falls anywhere between "server accepted" and "ledger written".
    points = sorted(rng.sample(range(10, KILL_READERS - 20), KILLS))
    history = []
    for point in points:
        before = len(box.messages)
        target = max(point, before + 1)
        proc = start(project, "send-digest", SCHEDULE)
        deadline = time.monotonic() + 30
        while len(box.messages) < target:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(
                    f"seed {KILL_SEED}, kill points {points}: the run ended before message {target}"
                    f" (exit {proc.returncode})\n{out}\n{err}"
                )
            assert time.monotonic() < deadline, f"kill point {point}: the send never got there"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, box.data_delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        history.append((point, len(box.messages)))
        # At every moment the ledger is at most one message behind the wire, never ahead.
        assert_ledger_not_ahead_of_the_wire(db, Counter(box.by_recipient()))

    box.data_delay = 0  # slow only so that each kill lands mid-send; the last run need not be
    final, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(final, 0)
    assert f"sent {KILL_READERS}, pending 0, failed 0" in final.stdout, output(final)
    counts = box.by_recipient()
    where = f"seed {KILL_SEED}, (kill point, messages when killed): {history}"
    assert set(counts) == set(everyone), f"{len(set(everyone) - set(counts))} got nothing; {where}"
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= KILLS, f"{duplicates} duplicates after {KILLS} kills; {where}"
    # One issue, finished by the reruns; the ledger says so too.
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}
    assert issues(db) == [(1, "complete")]
    assert set(ledger(db).values()) == {"sent"}
    again, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(again, 0)
    assert "nothing new" in again.stdout and sum(box.by_recipient().values()) == sum(counts.values())


# -- hostile feeds -------------------------------------------------------------------------------

FETCH_TIMEOUT = 2
FIFTY_MB = 50 * 1024 * 1024
HUGE_HEAD = (
    b'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Huge</title>'
    b"<link>https://huge.test/</link><description>d</description><item><title>Huge feed post</title>"
    b"<guid>huge-1</guid><link>https://huge.test/1</link><description>"
)
HUGE_TAIL = b"</description></item></channel></rss>"


def huge_chunks(total: int) -> Iterator[bytes]:
    """A well-formed RSS document of `total` bytes, made as it is sent."""
    yield HUGE_HEAD
    left = total - len(HUGE_HEAD) - len(HUGE_TAIL)
    block = b"A" * 65536
    while left > 0:
        yield block[:left]
        left -= len(block)
    yield HUGE_TAIL


class HostileHttp:
    """Feeds that misbehave at the HTTP level: too big, a decompression bomb, never-ending."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with contextlib.suppress(ConnectionError):
                    server.respond(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def respond(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/rss+xml; charset=utf-8")
        if h.path == "/50mb-declared.xml":  # says how big it is up front
            h.send_header("Content-Length", str(FIFTY_MB))
            h.end_headers()
            for chunk in huge_chunks(FIFTY_MB):
                h.wfile.write(chunk)
        elif h.path == "/50mb-streamed.xml":  # no Content-Length: only reading tells
            h.end_headers()
            for chunk in huge_chunks(FIFTY_MB):
                h.wfile.write(chunk)
        elif h.path == "/50mb-gzip-bomb.xml":  # 50 MB that travels as about 50 KB
            body = gzip_bomb()
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif h.path == "/never-ends.xml":  # a byte now and then, for ever
            h.end_headers()
            h.wfile.write(HUGE_HEAD.replace(b"Huge", b"Endless"))
            h.wfile.flush()
            give_up = time.monotonic() + 60
            while not self.stop.is_set() and time.monotonic() < give_up:
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.05)
        else:
            h.send_error(404)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


_BOMB: list[bytes] = []


def gzip_bomb() -> bytes:
    if not _BOMB:
        _BOMB.append(gzip.compress(b"".join(huge_chunks(FIFTY_MB)), compresslevel=9))
    return _BOMB[0]


@pytest.fixture
def hostile_http() -> Iterator[HostileHttp]:
    server = HostileHttp()
    yield server
    server.close()


def _rss_doc(
    items: str, *, title: str = "Hostile", link: str = "https://hostile.test/", decl: str = "utf-8"
) -> str:
    return (
        f'<?xml version="1.0" encoding="{decl}"?><rss version="2.0"><channel><title>{title}</title>'
        f"<link>{link}</link><description>d</description>{items}</channel></rss>"
    )


def _item(n: int, title: str, extra: str = "") -> str:
    date = format_datetime(datetime(2026, 2, 1, tzinfo=UTC) + timedelta(hours=n))
    return f"<item><title>{title}</title><guid>hostile-{n}</guid><pubDate>{date}</pubDate>{extra}</item>"


LAUGHS = "\n".join(
    ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
)
BILLION_LAUGHS = (
    f'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE rss [\n{LAUGHS}\n]>\n'
    '<rss version="2.0"><channel><title>Laughs</title><link>https://laughs.test/</link>'
    "<description>d</description><item><title>Laughing &lol9;</title><guid>laugh-1</guid>"
    "<link>https://laughs.test/1</link><description>&lol9;</description></item></channel></rss>"
).encode()

TRUNCATED = rss([item(n, title=f"Truncated feed post {n}", guid=f"trunc-{n}") for n in (1, 2, 3)])
TRUNCATED = TRUNCATED[: TRUNCATED.index(b"Truncated feed post 3") + 12]

# Says UTF-8 (in the XML declaration and in the HTTP header), is Latin-1.
WRONG_ENCODING = _rss_doc(
    _item(1, "Caf\xe9 cr\xe8me, wrongly declared", "<link>https://hostile.test/cafe</link>")
).encode("latin-1")
# Names a charset that does not exist.
NO_SUCH_ENCODING = _rss_doc(
    _item(2, "Unknown charset post", "<link>https://hostile.test/unknown</link>"), decl="x-no-such-charset"
).encode()

# (route, how it is served, text that must never reach a message, whether the feed is refused)
HOSTILE_FEEDS = {
    "truncated-xml": ("/truncated.xml", Route(TRUNCATED), "Truncated feed post", True),
    "wrong-declared-encoding": ("/latin1.xml", Route(WRONG_ENCODING), None, False),
    "unknown-encoding": ("/unknown.xml", Route(NO_SUCH_ENCODING), None, False),
    "billion-laughs": ("/laughs.xml", Route(BILLION_LAUGHS), "lollollollol", None),
    "50mb-declared": ("/50mb-declared.xml", None, "Huge feed post", True),
    "50mb-streamed": ("/50mb-streamed.xml", None, "Huge feed post", True),
    "50mb-gzip-bomb": ("/50mb-gzip-bomb.xml", None, "Huge feed post", True),
    "never-ends": ("/never-ends.xml", None, "Endless feed post", True),
}


# Hostile content only: nothing here can hang a run or exhaust its memory if the defences fail,
# so these run in this process; the rest are fetched by a real `newsletter` process.
CONTENT_ONLY = {"truncated-xml", "wrong-declared-encoding", "unknown-encoding"}


def eml_texts(outbox: Path) -> dict[str, tuple[bytes, EmailMessage]]:
    found = {}
    for path in sorted(outbox.rglob("*.eml")):
        raw = path.read_bytes()
        found[path.stem] = (raw, email.message_from_bytes(raw, policy=email.policy.default))
    return found  # type: ignore[return-value]


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(("plain",))
    markup = msg.get_body(("html",))
    assert text is not None and markup is not None
    return str(text.get_content()), str(markup.get_content())


@pytest.mark.parametrize("case", list(HOSTILE_FEEDS))
def test_hostile_feed_does_not_crash_hang_or_leak_into_the_digest(
    project: Project, feed_server: FeedServer, hostile_http: HostileHttp, case: str
) -> None:
    path, route, never, refused = HOSTILE_FEEDS[case]
    if route is not None:
        feed_server.routes[path] = route
        url = feed_server.url(path)
    else:
        url = hostile_http.url(path)
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    configure(
        project,
        [url, feed_server.url("/good.xml")],
        fetch=f"timeout: {FETCH_TIMEOUT}\nmax_bytes: 10000000",
        subscribers=["ann@example.com,Ann", "bob@example.com,Bob", "cy@example.com,Cy"],
    )
    done, took = (cli_here if case in CONTENT_ONLY else cli)(project, "send-digest", SCHEDULE)
    assert took < FETCH_TIMEOUT + 10, f"{case}: the run took {took:.1f} s"
    # A bad feed is reported, not fatal: the good feed's digest goes out.
    assert_clean_exit(done, 0)
    if refused:
        assert f"feed error   {url}" in done.stderr, output(done)
    messages = eml_texts(project.root / "outbox")
    assert sorted(messages) == ["ann@example.com", "bob@example.com", "cy@example.com"]
    for raw, msg in messages.values():
        assert len(raw) < 200_000, f"{case}: a {len(raw):,} byte message"
        text, markup = parts(msg)
        assert "Post 1" in text and "Post 1" in markup
        if never:
            assert never not in text and never not in markup
    if case in ("wrong-declared-encoding", "unknown-encoding"):
        # Still read, as well as can be: the entry is there, and the message is valid UTF-8.
        word = "wrongly declared" if case == "wrong-declared-encoding" else "Unknown charset post"
        text, markup = parts(next(iter(messages.values()))[1])
        assert word in text and word in markup, output(done)


CRLF_TITLE = "Header&#13;&#10;Bcc: victim@example.org&#13;&#10;X-Injected: yes\r\nX-Second: injected"
CURLY_TITLE = "Curly {{ 7*7 }} braces {% raw %}"
SCRIPTED = (
    "<p>Safe prose.</p><script>alert(1)</script>"
    '<img src="https://img.test/a.png" onerror="alert(2)" width="200" height="100">'
    '<a href="javascript:alert(3)">bad link</a><a href=" JaVaScRiPt:alert(4)">bad link two</a>'
    '<a href="jav&#x09;ascript:alert(5)">bad link three</a>'
    '<svg onload="alert(6)"><circle r="1"/></svg><iframe src="https://evil.test/"></iframe>'
    '<p onclick="alert(7)">Clickable para.</p><form action="https://evil.test/"><input name="q"></form>'
    '<object data="https://evil.test/x.swf"></object><embed src="https://evil.test/y.swf">'
    '<a href="https://ok.test/" onmouseover="alert(8)">ok link</a>'
    '<style>body { background: url("javascript:alert(9)") }</style>'
    "<p>Braces in a body {{ 7*7 }} stay braces.</p>"
)
HOSTILE_CONTENT = _rss_doc(
    "".join(
        [
            _item(
                9,
                CRLF_TITLE,
                "<link>https://hostile.test/crlf</link>"
                "<author>eve@example.org (Eve&#13;&#10;Bcc: victim2@example.org)</author>"
                "<description>Line breaks in the title.</description>",
            ),
            _item(
                8,
                CURLY_TITLE,
                "<link>https://hostile.test/curly</link>"
                "<description><![CDATA[<p>Body {{ 7*7 }} and {{ config }} and {% for x in y %}</p>]]>"
                "</description>",
            ),
            _item(
                7,
                "Scripted content",
                f"<link>https://hostile.test/scripted</link><description><![CDATA[{SCRIPTED}]]></description>",
            ),
        ]
    ),
    title="Evil&#13;&#10;Feed {{ 7*7 }}",
).encode()
# An entry whose link, and a feed whose home page link, is a javascript: URL.
JAVASCRIPT_LINKS = _rss_doc(
    _item(6, "Link is javascript", "<link>javascript:alert(10)</link><description>Prose.</description>")
    + _item(
        5, "Link is JavaScript too", "<link> JaVaScRiPt:alert(11)</link><description>More.</description>"
    ),
    title="Scripted home",
    link="javascript:alert(12)",
).encode()

HEADERS_WE_WRITE = {
    "to",
    "message-id",
    "list-unsubscribe",
    "from",
    "reply-to",
    "subject",
    "date",
    "list-id",
    "list-unsubscribe-post",
    "mime-version",
    "content-type",
}
UNSAFE_SCHEMES = ("javascript:", "vbscript:", "data:")
UNSAFE_TAGS = {"script", "iframe", "object", "embed", "form", "input", "svg", "frame", "frameset", "base"}


class Markup(HTMLParser):
    """Every tag and attribute of an HTML part, with entities decoded as a browser would."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k.lower(), v or "") for k, v in attrs]


def unsafe_markup(markup: str) -> list[str]:
    parser = Markup()
    parser.feed(markup)
    problems = [f"<{t}>" for t in parser.tags if t in UNSAFE_TAGS]
    for tag, name, value in parser.attrs:
        if name.startswith("on"):
            problems.append(f"<{tag} {name}=...>")
        # Browsers drop tabs, newlines and leading spaces inside a URL's scheme.
        squeezed = re.sub(r"[\x00-\x20]", "", html.unescape(value)).lower()
        if name in ("href", "src", "action", "background", "formaction") and squeezed.startswith(
            UNSAFE_SCHEMES
        ):
            problems.append(f"<{tag} {name}={value!r}>")
    lowered = markup.lower()
    problems += [s for s in ("<script", "onerror", "javascript:") if s in lowered]
    return problems


def test_hostile_entries_reach_no_header_and_no_unsafe_html(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/hostile.xml"] = Route(HOSTILE_CONTENT)
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    configure(
        project,
        [feed_server.url("/hostile.xml"), feed_server.url("/good.xml")],
        fetch=f"timeout: {FETCH_TIMEOUT}",
        subscribers=["ann@example.com,Ann", "bob@example.com,Bob"],
    )
    done, took = cli_here(project, "send-digest", SCHEDULE)
    assert took < FETCH_TIMEOUT + 10
    assert_clean_exit(done, 0)
    messages = eml_texts(project.root / "outbox")
    assert sorted(messages) == ["ann@example.com", "bob@example.com"]
    for address, (raw, msg) in messages.items():
        head = raw.split(b"\r\n\r\n", 1)[0]
        # Every header line ends in CRLF and is a header we write or a folded continuation.
        assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
        names = set()
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t"):
                continue
            name, sep, _ = line.partition(b":")
            assert sep and re.fullmatch(rb"[A-Za-z][A-Za-z0-9-]*", name), f"{address}: header line {line!r}"
            names.add(name.decode().lower())
        assert names <= HEADERS_WE_WRITE, f"{address}: injected headers {names - HEADERS_WE_WRITE}"
        subject = str(msg["Subject"])
        assert subject == "Test Weekly #1: Header Bcc: victim@example.org X-Injected: yes X-Second: injected"
        assert msg["To"] is not None and address in str(msg["To"])
        text, markup = parts(msg)
        problems = unsafe_markup(markup)
        assert not problems, f"{address}: unsafe HTML: {problems}"
        assert "javascript:" not in text.lower(), f"{address}: text part:\n{text}"
        # Feed text is data, never template code: the braces arrive as they were written.
        for part in (text, markup):
            assert "Curly {{ 7*7 }} braces {% raw %}" in part
            assert "Braces in a body {{ 7*7 }} stay braces." in part
            assert "Curly 49" not in part and "body 49" not in part
        # The sanitiser took the dangerous parts out and left the prose and the good link.
        assert "Safe prose." in text and "Clickable para." in text
        assert 'href="https://ok.test/"' in markup


def test_javascript_links_from_a_feed_are_never_links_in_the_digest(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/js.xml"] = Route(JAVASCRIPT_LINKS)
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    configure(
        project,
        [feed_server.url("/js.xml"), feed_server.url("/good.xml")],
        fetch=f"timeout: {FETCH_TIMEOUT}",
        subscribers=["ann@example.com,Ann"],
    )
    done, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(done, 0)
    [(_, msg)] = eml_texts(project.root / "outbox").values()
    text, markup = parts(msg)
    assert "Post 1" in text and "Post 1" in markup
    problems = unsafe_markup(markup)
    assert not problems, f"javascript: links from the feed are links in the HTML part: {problems}"
    assert "javascript:" not in text.lower(), f"javascript: links in the text part:\n{text}"


# -- the state database: full disk, held lock ---------------------------------------------------

DB_READERS = 100


def long_items(n: int) -> bytes:
    """Entries big enough that an issue of them needs a few hundred KB of database space."""
    return rss(
        [
            item(
                i,
                title=f"Post {i} " + "long title words " * 8,
                description="<p>" + "Body text. " * 250 + "</p>",
            )
            for i in range(1, n + 1)
        ]
    )


@pytest.fixture
def small_disk(project: Project) -> Iterator[Path]:
    """A real 8 MB filesystem (tmpfs) under the project, for the state database to fill up.

    Mounting needs root (CAP_SYS_ADMIN). Without it the disk-full tests are skipped rather than
    faked: SQLite's `PRAGMA max_page_count` is a setting of one connection, so setting it from
    another connection on the same file would not limit the newsletter process at all.
    """
    disk = project.root / "data"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem to the last byte, then give back `leave` bytes. Returns the filler."""
    filler = disk / f"filler-{time.monotonic_ns()}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def free_space(disk: Path) -> None:
    for filler in disk.glob("filler-*"):
        filler.unlink()


def assert_database_error(done: subprocess.CompletedProcess[str], db: Path, *words: str) -> None:
    assert_clean_exit(done, 1)
    first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else ""
    assert first.startswith(f"error: {db}"), f"the error does not name the database first:\n{output(done)}"
    assert any(w in done.stderr for w in words), output(done)


@pytest.mark.parametrize(
    "when", ["full-before-the-run", "room-for-the-fetch-not-the-issue", "fills-mid-send"]
)
def test_full_disk_is_a_clear_error_records_nothing_false_and_the_next_run_finishes(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    small_disk: Path,
    when: str,
) -> None:
    box, port = smtp_server
    box.data_delay = 0.01 if when == "fills-mid-send" else 0.0
    feed_server.routes["/feed.xml"] = Route(long_items(20))
    everyone = readers(DB_READERS)
    configure(
        project,
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        database="data/state.db",
        subscribers=everyone,
    )
    db = small_disk / "state.db"
    fetched, _ = cli_here(project, "fetch")  # the state exists and holds the entries: a working install
    assert_clean_exit(fetched, 0)

    if when == "fills-mid-send":
        proc = start(project, "send-digest", SCHEDULE)
        deadline = time.monotonic() + 30
        while len(box.messages) < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        fill(small_disk)
        out, err = proc.communicate(timeout=45)
        first = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    else:
        # Measured here: a run needs about 60 KB to fetch and take its lock, and some 200 KB more
        # to record an issue of these entries for 100 readers; 128 KB lets it fetch, not build.
        fill(small_disk, leave=0 if when == "full-before-the-run" else 128 * 1024)
        first, _ = cli(project, "send-digest", SCHEDULE)
    assert_database_error(first, db, "full", "disk I/O error")
    if when == "full-before-the-run":
        assert "disk" in first.stderr
    sent_before = Counter(box.by_recipient())
    free_space(small_disk)

    # Nothing is recorded as sent that was not; a half-recorded issue never exists.
    assert_ledger_not_ahead_of_the_wire(db, sent_before)
    if when == "fills-mid-send":
        assert 20 <= len(box.messages) < DB_READERS, "the disk did not fill mid-send"
        assert issues(db) == [(1, "sending")]
    else:
        assert box.messages == [] and issues(db) == [], f"{issues(db)}, {len(box.messages)} sent"

    box.data_delay = 0  # slow only so that the disk fills mid-send; the next run need not be
    second, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(second, 0)
    assert f"sent {DB_READERS}, pending 0, failed 0" in second.stdout, output(second)
    counts = box.by_recipient()
    assert set(counts) == set(everyone), "someone got nothing"
    assert sum(n - 1 for n in counts.values()) <= (1 if when == "fills-mid-send" else 0)
    assert issues(db) == [(1, "complete")]


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=20)
for line in sys.stdin:
    db.execute({"lock": "BEGIN EXCLUSIVE", "release": "ROLLBACK"}[line.strip()])
    print(line.strip() + "ed", flush=True)
"""


class DatabaseLocker:
    """Another process that holds the state database with BEGIN EXCLUSIVE while told to."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _tell(self, what: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == what + "ed"

    def lock(self) -> None:
        self._tell("lock")

    def release(self) -> None:
        self._tell("release")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def lockers() -> Iterator[list[DatabaseLocker]]:
    made: list[DatabaseLocker] = []
    yield made
    for locker in made:
        locker.close()


# The lock tests set the store's busy timeout to this (the default is 30 s): the runs below must
# give up soon after it, so a run that ignored the setting would fail their bounds.
STORE_LOCK_WAIT = 1


def test_database_locked_before_the_run_is_a_clear_error_and_the_next_run_sends_once(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    lockers: list[DatabaseLocker],
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    everyone = readers(MAIL_READERS)
    configure(
        project,
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        subscribers=everyone,
        busy_timeout=STORE_LOCK_WAIT,
    )
    db = project.root / "state.db"
    assert_clean_exit(cli_here(project, "fetch")[0], 0)
    locker = DatabaseLocker(db)
    lockers.append(locker)
    locker.lock()
    first, took = cli(project, "send-digest", SCHEDULE, timeout=STORE_LOCK_WAIT + 30)
    assert took < STORE_LOCK_WAIT + 10, f"gave up after {took:.0f} s"
    assert_database_error(first, db, "locked")
    assert box.messages == [] and issues(db) == []
    locker.release()
    second, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(second, 0)
    assert box.by_recipient() == dict.fromkeys(everyone, 1)
    assert issues(db) == [(1, "complete")]


def test_database_locked_mid_send_is_a_clear_error_and_the_next_run_finishes(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    lockers: list[DatabaseLocker],
) -> None:
    box, port = smtp_server
    box.data_delay = 0.01
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    everyone = readers(DB_READERS)
    configure(
        project,
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        subscribers=everyone,
        busy_timeout=STORE_LOCK_WAIT,
    )
    db = project.root / "state.db"
    assert_clean_exit(cli_here(project, "fetch")[0], 0)
    locker = DatabaseLocker(db)
    lockers.append(locker)
    proc = start(project, "send-digest", SCHEDULE)
    deadline = time.monotonic() + 30
    while len(box.messages) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, "the send never got going"
        time.sleep(0.002)
    locker.lock()
    locked_at = time.monotonic()
    # The other process keeps the lock until this run is over; past what a run should need to
    # give up (the store's wait plus 25 s) it lets go, so a run that hangs still ends here.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STORE_LOCK_WAIT + 25)
    gave_up_after = time.monotonic() - locked_at
    ended_by_itself = proc.poll() is not None
    locker.release()
    out, err = proc.communicate(timeout=STORE_LOCK_WAIT + 10)
    first = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    sent_before = Counter(box.by_recipient())
    assert 10 <= len(box.messages) < DB_READERS
    assert_ledger_not_ahead_of_the_wire(db, sent_before)
    assert issues(db) == [(1, "sending")]

    box.data_delay = 0  # slow only so that the lock lands mid-send; the next run need not be
    second, _ = cli_here(project, "send-digest", SCHEDULE)
    assert_clean_exit(second, 0)
    assert f"sent {DB_READERS}, pending 0, failed 0" in second.stdout, output(second)
    counts = box.by_recipient()
    assert set(counts) == set(everyone), "someone got nothing"
    assert sum(n - 1 for n in counts.values()) <= 1, "more than the message in flight was sent twice"
    assert issues(db) == [(1, "complete")]

    # How the locked run ended: by itself, soon after the store stopped waiting, with an error
    # naming the database and no traceback.
    assert ended_by_itself and gave_up_after < STORE_LOCK_WAIT + 10, (
        f"the run was still going {gave_up_after:.0f} s after the database was locked"
        f" (the store gives up after {STORE_LOCK_WAIT} s)\n{output(first)}"
    )
    assert_database_error(first, db, "locked")
