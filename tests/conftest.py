"""Real servers on 127.0.0.1 for the tests: an HTTP server for feeds, aiosmtpd for mail."""

from __future__ import annotations

import asyncio
import compileall
import email
import email.policy
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner, Result

import newsletter
from newsletter.cli import main
from newsletter.redact import forget_all

ROOT = Path(__file__).resolve().parent.parent

# Where PYTHONDONTWRITEBYTECODE is set (these machines set it), pytest rewrites every test module
# again in every worker, a second each time; cached in tests/__pycache__ it is done once.
sys.dont_write_bytecode = False


def pytest_configure(config: pytest.Config) -> None:
    # Every `python -m newsletter` the tests start would otherwise compile the whole package
    # from source (no bytecode is written under PYTHONDONTWRITEBYTECODE, and a fresh clone has
    # none), a third of its start-up. Compiled once here, before the workers start, it is read
    # by all of them. Only what is missing or stale is compiled.
    if not hasattr(config, "workerinput"):
        compileall.compile_dir(Path(newsletter.__file__).parent, quiet=2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden/ from the current output"
    )


# -- the CLI in this process -------------------------------------------------------------------


def run_in_process(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`newsletter ARGS` run in this process and answered as a finished process would be.

    A command costs milliseconds here against a second of interpreter start-up and imports in
    a subprocess. What a real process would print that this one might not is printed all the
    same: an exception that escaped becomes the traceback on stderr, and so does one raised in
    a thread. Remembered secrets are forgotten before and after, as a new process starts with
    none: a secret left from an earlier command must not blank the output of this one.
    Where the process boundary is the point (signals, kills, umask, hangs, start-up), tests run
    `python -m newsletter` instead.
    """
    in_threads: list[str] = []

    def hook(failure: threading.ExceptHookArgs) -> None:
        name = failure.thread.name if failure.thread else "?"
        lines = traceback.format_exception(failure.exc_type, failure.exc_value, failure.exc_traceback)
        in_threads.append(f"Exception in thread {name}:\n" + "".join(lines))

    forget_all()
    previous = threading.excepthook
    threading.excepthook = hook
    try:
        result = CliRunner().invoke(main, list(args), env=dict(env or {}), catch_exceptions=True)
    finally:
        threading.excepthook = previous
        forget_all()
    stderr = result.stderr
    if result.exc_info and result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    stderr += "".join(in_threads)
    return subprocess.CompletedProcess(["newsletter", *args], result.exit_code, result.stdout, stderr)


# -- feeds over HTTP -------------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "application/rss+xml; charset=utf-8"
    status: int = 200
    etag: str | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class FeedServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.delay:
                    time.sleep(route.delay)
                if route.etag and self.headers.get("If-None-Match") == route.etag:
                    self.send_response(304)
                    self.send_header("ETag", route.etag)
                    self.end_headers()
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                if route.etag:
                    self.send_header("ETag", route.etag)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(route.body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that hung up early (its own timeout, under load) is its business:
                # socketserver's traceback on stderr would land in a CLI run's captured output.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def hits(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


def rss(items: list[dict[str, str]], title: str = "Test Feed", link: str = "https://blog.test/") -> bytes:
    """An RSS 2.0 document; each item may have title, link, guid, description, date."""
    parts = []
    for it in items:
        xml = [f"<title>{it['title']}</title>"] if "title" in it else []
        if "link" in it:
            xml.append(f"<link>{it['link']}</link>")
        if "guid" in it:
            xml.append(f'<guid isPermaLink="false">{it["guid"]}</guid>')
        if "date" in it:
            xml.append(f"<pubDate>{it['date']}</pubDate>")
        if "description" in it:
            xml.append(f"<description><![CDATA[{it['description']}]]></description>")
        parts.append("<item>" + "".join(xml) + "</item>")
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        f"<title>{title}</title><link>{link}</link><description>d</description>"
        + "".join(parts)
        + "</channel></rss>"
    ).encode()


def item(n: int, **extra: str) -> dict[str, str]:
    """A dated item; higher n is newer."""
    date = format_datetime(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n))
    return {
        "title": f"Post {n}",
        "link": f"https://blog.test/posts/{n}",
        "guid": f"post-{n}",
        "date": date,
        "description": f"<p>Body of post {n}.</p>",
        **extra,
    }


# -- mail over SMTP --------------------------------------------------------------------------------


class Mailbox:
    """aiosmtpd handler: records every message and answers chosen recipients with a code."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.arrivals: list[tuple[float, int]] = []  # each message's time.monotonic() and client port
        self.rcpt_replies: dict[str, str] = {}
        self.data_delay = 0.0
        self.sessions = 0  # EHLOs: how many connections a client opened
        self.lock = threading.Lock()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        with self.lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            self.arrivals.append((time.monotonic(), session.peer[1]))
        return "250 2.0.0 Message accepted"

    def parsed(self) -> list[EmailMessage]:
        with self.lock:
            raw = [m[2] for m in self.messages]
        return [email.message_from_bytes(r, policy=email.policy.default) for r in raw]  # type: ignore[misc]

    def by_recipient(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self.lock:
            for _, rcpts, _ in self.messages:
                for r in rcpts:
                    counts[r.lower()] = counts.get(r.lower(), 0) + 1
        return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


# -- a project folder ---------------------------------------------------------------------------


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "subscribers").mkdir()

    @property
    def config(self) -> Path:
        return self.root / "schedules.yaml"

    def write_config(self, text: str) -> None:
        self.config.write_text(textwrap.dedent(text), encoding="utf-8")

    def write_subscribers(self, rows: list[str], name: str = "readers") -> Path:
        path = self.root / "subscribers" / f"{name}.csv"
        path.write_text("email,name\n" + "\n".join(rows) + "\n", encoding="utf-8")
        return path

    def setup(
        self,
        feeds: list[str],
        *,
        smtp_port: int | None = None,
        subscribers: list[str] | None = None,
        extra_schedule: str = "",
        templates: str = "null",
        fetch_extra: str = "",
    ) -> None:
        sender = (
            f"smtp\n    host: 127.0.0.1\n    port: {smtp_port}\n    timeout: 10"
            if smtp_port
            else "file\n    path: outbox"
        )
        feed_lines = "\n".join(f"          - {f}" for f in feeds)
        self.config.write_text(
            f"""\
database: sqlite:///state.db
templates: {templates}
fetch:
  timeout: 5
  first_fetch_newest: 50
{fetch_extra}senders:
  main:
    type: {sender}
schedules:
  weekly:
    title: Test Weekly
    feeds:
{feed_lines}
    subscribers: readers
    sender: main
    from: Test Weekly <news@example.net>
    unsubscribe_url: https://news.example.net/unsubscribe/{{token}}
{extra_schedule}""",
            encoding="utf-8",
        )
        self.write_subscribers(
            subscribers
            if subscribers is not None
            else ["ann@example.com,Ann", "bob@example.com,Bob", "cy@example.com,Cy"]
        )

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--config", str(self.config), *args], catch_exceptions=False)

    def run_in_process(self, *args: str) -> subprocess.CompletedProcess[str]:
        """What `run_process` answers, from a run in this process (see `run_in_process`)."""
        return run_in_process(["--config", str(self.config), *args], env={"NEWSLETTER_SECRET": "s"})

    def run_process(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "newsletter", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "NEWSLETTER_SECRET": "s"},
        )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.setenv("NEWSLETTER_SECRET", "test-secret")
    return Project(tmp_path)


# -- the web apps on a real HTTP server --------------------------------------------------------


class WebServer:
    """A WSGI app served by werkzeug on 127.0.0.1 in a thread."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sent_messages(folder: Path) -> dict[str, EmailMessage]:
    """The .eml files a `file` sender wrote, by recipient address."""
    found = {}
    for path in sorted(folder.rglob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        found[path.stem] = msg  # type: ignore[assignment]
    return found


# -- the daemon as a real process --------------------------------------------------------------


class Daemon:
    """The daemon in a subprocess, its log collected line by line."""

    def __init__(self, project: Project) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "--config", str(project.config), "run"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: Callable[[], bool], timeout: float = 30, why: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"daemon died:\n{self.log}"
            assert time.monotonic() < deadline, f"timed out waiting for {why}:\n{self.log}"
            time.sleep(0.05)

    def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


from pg import pg_cluster, pg_database, pg_empty, state_url  # noqa: E402, F401  (PostgreSQL fixtures)
