"""`newsletter run` as a real process: schedules fire, signals stop it cleanly, locks hold.

The commands run beside it (a fetch to set up, a send by hand) run in this process: they are
another process to the daemon all the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Daemon, FeedServer, Mailbox, Project, Route, item, rss
from newsletter.config import load_config
from newsletter.store import Store


def start_slow_send(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
    count: int,
) -> tuple[Daemon, list[str]]:
    """A daemon sending one issue every second to ``count`` readers through a slowish server."""
    box, port = smtp_server
    box.data_delay = 0.02
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    addresses = [f"r{i:03d}@example.com" for i in range(count)]
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        subscribers=addresses,
        fetch_extra="  interval: 1s\n",
        extra_schedule="    when: every 1 second\n",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    return daemon, addresses


def test_digests_arrive_new_entries_follow_and_sigterm_exits_0(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        fetch_extra="  interval: 1s\n",
        extra_schedule="    when: every 1 second\n",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: len(box.messages) >= 3, why="the first digest")
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}

    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2), item(3)]))
    daemon.wait_for(lambda: len(box.messages) >= 6, why="the digest of the new entry")
    second = [m for m in box.parsed() if "#2" in str(m["Subject"])]
    assert len(second) == 3
    for m in second:
        text = m.get_body(("plain",)).get_content()
        assert "Post 3" in text and "Post 2\n" not in text

    assert daemon.terminate() == 0
    assert "event=stop" in daemon.log and "schedule=weekly issue=2 sent=3 pending=0 failed=0" in daemon.log
    assert box.by_recipient() == {"ann@example.com": 2, "bob@example.com": 2, "cy@example.com": 2}


def test_sigterm_mid_send_stops_between_messages_and_the_rest_is_sent_later(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, _ = smtp_server
    daemon, addresses = start_slow_send(project, feed_server, smtp_server, daemons, 200)
    daemon.wait_for(lambda: len(box.messages) >= 20, why="the send to start")
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 10
    stopped_at = len(box.messages)
    assert stopped_at < 200, "the send finished before the signal; nothing was tested"
    assert "stopped; undelivered messages stay pending" in daemon.log
    box.data_delay = 0  # slow only so that the signal lands mid-send; the rest need not be

    status = project.run_in_process("status")
    assert f"deliveries waiting for a retry: {200 - stopped_at}" in status.stdout

    rest = project.run_in_process("send-digest", "weekly")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert box.by_recipient() == {a: 1 for a in addresses}


def _state_with_a_missed_run(project: Project, feed_server: FeedServer, port: int, grace: str) -> None:
    """A daily schedule whose fire time passed an hour ago while no daemon ran."""
    fire = datetime.now(UTC) - timedelta(hours=1)
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        extra_schedule=f"    when: daily at {fire:%H:%M}\n    misfire_grace: {grace}\n",
    )
    assert project.run_in_process("fetch").returncode == 0
    store = Store(load_config(project.config).database_url)
    store.set_last_run("weekly", fire - timedelta(days=1) + timedelta(minutes=1))
    store.close()


def test_a_missed_run_within_grace_is_sent_once_at_start_up(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    _state_with_a_missed_run(project, feed_server, port, "3h")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: len(box.messages) >= 3, why="the caught-up digest")
    daemon.wait_for(lambda: "event=digest schedule=weekly issue=1" in daemon.log, why="the digest log line")
    assert "event=catch-up" in daemon.log
    assert daemon.terminate() == 0

    again = Daemon(project)
    daemons.append(again)
    again.wait_for(lambda: "next digest at" in again.log, why="start-up")
    time.sleep(1)  # give a wrongly scheduled catch-up the chance to show itself
    assert again.terminate() == 0
    assert "event=catch-up" not in again.log
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1}


def test_a_missed_run_older_than_grace_is_skipped_and_logged(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    _state_with_a_missed_run(project, feed_server, port, "30m")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "next digest at" in daemon.log, why="start-up")
    time.sleep(1)
    assert daemon.terminate() == 0
    assert "event=missed schedule=weekly skipped the digest due at" in daemon.log
    assert box.messages == []


def test_send_digest_by_hand_while_the_daemon_sends_joins_it_and_never_doubles_a_copy(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, _ = smtp_server
    daemon, addresses = start_slow_send(project, feed_server, smtp_server, daemons, 150)
    daemon.wait_for(lambda: len(box.messages) >= 10, why="the daemon's send to start")

    # The daemon holds the whole list in one batch: the hand-started run builds nothing new,
    # finds nothing free to send, and says who is sending the rest, without failing.
    joined = project.run_in_process("send-digest", "weekly")
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert "nothing new" not in joined.stdout
    assert "(the rest is being sent by another process)" in joined.stdout
    daemon.wait_for(lambda: len(box.messages) >= len(addresses), why="the daemon to finish")
    assert daemon.terminate() == 0
    assert box.by_recipient() == {a: 1 for a in addresses}


def test_sighup_with_a_bad_config_keeps_the_old_one(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    _box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port, extra_schedule="    when: daily at 08:00\n")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "next digest at" in daemon.log, why="start-up")
    good = project.config.read_text()
    project.config.write_text(good.replace("daily at 08:00", "dialy at 08:00"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda: "kept the old configuration" in daemon.log, why="the reload")
    assert "schedules.weekly.when: cannot read 'dialy at 08:00'" in daemon.log
    project.config.write_text(good.replace("daily at 08:00", "weekly on monday at 09:00"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda: "configuration reloaded" in daemon.log, why="the second reload")
    assert daemon.terminate() == 0
    assert daemon.log.count("next digest at") == 2


# -- runs in threads at once, feeds pulled before a digest, log lines that cannot be forged --------


class DaemonWith(Daemon):
    """The daemon with extra arguments (``--log-format json``), stderr kept apart from stdout."""

    def __init__(self, project: Project, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "--config", str(project.config), "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ},
        )
        self.raw: list[bytes] = []
        self.lines = []
        self.reader = threading.Thread(target=self._read_bytes, daemon=True)
        self.reader.start()

    def _read_bytes(self) -> None:
        # Bytes, split on LF only: text mode would turn a bare CR into a line break of its own.
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.raw.append(line)
            self.lines.append(line.decode("utf-8", "replace"))


def test_two_schedules_on_one_smtp_sender_due_together_deliver_each_copy_once(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    box.data_delay = 0.005  # each send lasts long enough for the other to start in the middle
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    readers = {name: [f"{name}{i:02d}@example.com" for i in range(50)] for name in ("a", "b")}
    schedules = ""
    for name, addresses in readers.items():
        project.write_subscribers(addresses, name=f"readers-{name}")
        schedules += f"""\
  {name}:
    feeds: ["{feed_server.url("/feed.xml")}"]
    subscribers: readers-{name}
    sender: mail
    from: News <news@example.net>
    unsubscribe_url: https://news.example.net/u/{{token}}
    when: every 1 second
"""
    project.config.write_text(
        "database: sqlite:///state.db\ntemplates: null\nfetch:\n  first_fetch_newest: 50\n"
        f"senders:\n  mail:\n    type: smtp\n    host: 127.0.0.1\n    port: {port}\n    timeout: 10\n"
        f"schedules:\n{schedules}",
        encoding="utf-8",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    for name in readers:
        daemon.wait_for(
            lambda name=name: f"event=digest schedule={name} issue=1 " in daemon.log,  # type: ignore[misc]
            timeout=20,
            why=f"the digest of {name}",
        )
    assert daemon.terminate() == 0
    for name in readers:
        assert f"event=digest schedule={name} issue=1 sent=50 pending=0 failed=0" in daemon.log, daemon.log
    assert "job-error" not in daemon.log and "delivery-error" not in daemon.log, daemon.log
    assert box.by_recipient() == {a: 1 for a in readers["a"] + readers["b"]}


def test_a_digest_pulls_its_feeds_right_before_it_is_built(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]), etag='"v1"')
    # The poller would not look at the feed again for an hour: only the digest's own pull can
    # find the entry published a moment before the send.
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        fetch_extra="  interval: 1h\n",
        extra_schedule="    when: every 1 second\n",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "event=digest schedule=weekly issue=1 " in daemon.log, why="the first digest")
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), etag='"v2"')
    daemon.wait_for(
        lambda: "event=digest schedule=weekly issue=2 " in daemon.log,
        timeout=15,
        why="the new entry's digest",
    )
    assert daemon.terminate() == 0
    second = [m for m in box.parsed() if "#2" in str(m["Subject"])]
    assert len(second) == 3
    assert all("Post 2" in m.get_body(("plain",)).get_content() for m in second)
    # The pulls were conditional: an unchanged feed answered 304 and was not downloaded again.
    assert any(h.get("If-None-Match") == '"v1"' for h in feed_server.hits("/feed.xml"))


def test_a_feed_that_does_not_answer_in_time_is_used_as_stored_and_named_in_the_log(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        fetch_extra="  interval: 1h\n  digest_timeout: 1\n",
        extra_schedule="    when: every 1 second\n",
    )
    assert project.run_in_process("fetch").returncode == 0  # stored, and not due for an hour
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), delay=30)
    daemon = Daemon(project)
    daemons.append(daemon)
    # Well before the feed would answer, the digest is out, built from what was stored.
    daemon.wait_for(
        lambda: "event=digest schedule=weekly issue=1 " in daemon.log, timeout=10, why="the digest"
    )
    assert daemon.terminate() == 0
    assert "schedule=weekly issue=1 sent=3 pending=0 failed=0" in daemon.log
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}
    errors = [line for line in daemon.lines if "event=feed-error schedule=weekly" in line]
    assert errors and feed_server.url("/feed.xml") in errors[0], daemon.log
    assert "Traceback" not in daemon.log


@pytest.fixture
def hostile_server() -> Iterator[str]:
    """An HTTP server whose reason phrase carries a bare CR and a terminal escape."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(503, f"Down{FORGED}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


FORGED = "\x1b[31m\r2026-01-01T00:00:00+00:00 ERROR   event=forged it worked"
TOKEN = "tok3n-that-must-not-leak"


def _hostile_project(project: Project, feed_server: FeedServer, hostile: str, port: int) -> None:
    title = "Hello\r\n2026-01-01T00:00:00+00:00 INFO    event=forged \x1b[31mred"
    feed = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": "JSON feed",
        "items": [{"id": "1", "title": title, "url": "https://blog.test/1", "content_html": "<p>x</p>"}],
    }
    feed_server.routes["/feed.json"] = Route(json.dumps(feed).encode(), content_type="application/feed+json")
    project.setup(
        [feed_server.url("/feed.json"), f"{hostile}/down.xml?token={TOKEN}"],
        smtp_port=port,
        # Not every second: the pull of the failing feed can outlast one, and APScheduler's own
        # "skipped: maximum number of running instances" line is not JSON.
        extra_schedule="    when: every 2 seconds\n",
    )


def _assert_clean(raw: list[bytes]) -> None:
    for line in raw:
        assert b"\r" not in line and b"\x1b" not in line, line
        assert not line.lstrip().startswith(b"2026-01-01T00:00:00"), line
        assert TOKEN.encode() not in line, line


def test_feed_text_cannot_forge_a_log_line_or_drive_the_terminal(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    hostile_server: str,
    daemons: list[Daemon],
) -> None:
    _box, port = smtp_server
    _hostile_project(project, feed_server, hostile_server, port)
    daemon = DaemonWith(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "event=digest schedule=weekly issue=1 " in daemon.log, why="the digest")
    daemon.wait_for(lambda: "event=poll" in daemon.log, why="the poll")
    assert daemon.terminate() == 0
    _assert_clean(daemon.raw)
    failed = [line for line in daemon.lines if "/down.xml" in line and "event=feed-error" in line]
    assert failed and "HTTP 503 Down" in failed[0] and "token=***" in failed[0], daemon.log
    assert "Traceback" not in daemon.log


def test_json_logs_escape_feed_text_and_blank_secrets(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    hostile_server: str,
    daemons: list[Daemon],
) -> None:
    _box, port = smtp_server
    _hostile_project(project, feed_server, hostile_server, port)
    daemon = DaemonWith(project, "--log-format", "json")
    daemons.append(daemon)
    daemon.wait_for(lambda: '"event": "digest"' in daemon.log, why="the digest")
    assert daemon.terminate() == 0
    _assert_clean(daemon.raw)
    events = [json.loads(line) for line in daemon.raw]
    failed = [e for e in events if e.get("event") == "feed-error" and "/down.xml" in e["message"]]
    assert failed and "token=***" in failed[0]["message"]


def test_a_job_that_breaks_is_one_log_line_naming_it_and_the_other_jobs_go_on(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        extra_schedule="    when: every 1 second\n",
    )
    # A subject template that parses but fails as it renders: not an error the library knows.
    broken = project.config.read_text().split("schedules:\n", 1)[1].replace("  weekly:", "  broken:")
    broken = broken.replace("    title: Test Weekly", "    title: Broken\n    subject: '{{ 1 // 0 }}'")
    project.config.write_text(project.config.read_text() + broken.replace("readers", "others"))
    project.write_subscribers(["dee@example.com"], name="others")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "event=digest schedule=weekly issue=1 " in daemon.log, why="the good digest")
    daemon.wait_for(lambda: daemon.log.count("job digest:broken") >= 2, why="the broken job, twice")
    assert daemon.terminate() == 0
    failures = [line for line in daemon.lines if "event=job-error" in line]
    assert all("job digest:broken" in line and "ZeroDivision" in line for line in failures), failures
    assert "Traceback" not in daemon.log and "dee@example.com" not in box.by_recipient()
    assert len(box.messages) == 3
