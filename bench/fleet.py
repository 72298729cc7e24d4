"""Several daemons on one PostgreSQL, watched from outside: one killed mid-send.

    .venv/bin/python bench/fleet.py [--readers 3000] [--minutes 2] [--keep]

Three ``newsletter run`` processes share a throwaway PostgreSQL cluster (initdb in a temporary
folder, default settings, a free port on 127.0.0.1) and one project: an ``every 1 minute``
schedule, ``--readers`` subscribers, an smtp sender to aiosmtpd in this process (each message's
recipients recorded, with the time it arrived) and a feed served over HTTP from this process.
After each issue is built a new item is published, so every due time has something new.

Once a third of the readers have issue #1, the daemon that built it is SIGKILLed. Then:

- every reader has issue #1 within 120 s of its due time;
- at most 20 messages went twice (what was on the killed daemon's connections);
- each of the ``--minutes`` due times watched built exactly one issue, with three daemons due.

Each figure stands beside its limit, met or NOT MET; the exit status is 1 if any is not met.
The survivors are stopped with SIGTERM, the cluster is stopped and the temporary folder removed
(``--keep`` leaves it, with each daemon's log, for inspection), also when something fails.
Every wait is bounded.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _support import LOOPBACK, free_port, line_buffered

SCHEDULE = "fleet"
DAEMONS = 3
LIMIT_SECONDS = 120.0  # due time to the last reader having the issue
LIMIT_DUPLICATES = 20
MINUTE = 60.0
START_MARGIN = 20.0  # daemons start at least this long before a due time, so all await the same one
PG_USER = "postgres"


class Failed(Exception):
    """A wait ran out or a step failed: the run cannot measure what it is for."""


def wait_until(what: Callable[[], bool], timeout: float, why: str, step: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {why}")
        time.sleep(step)


# -- PostgreSQL ------------------------------------------------------------------------------------


def pg_bin(program: str) -> str:
    """``program`` on PATH, else under Debian's /usr/lib/postgresql/N/bin, the newest N."""
    found = shutil.which(program)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{program}")
    candidates.sort(key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if not candidates:
        raise Failed(f"PostgreSQL's {program} is not installed (tests/system-packages.sh installs it)")
    return candidates[-1]


class Cluster:
    """A PostgreSQL cluster of its own in ``folder``, owned by ``postgres`` when we are root
    (PostgreSQL refuses to run as root). Password checks over TCP, where the daemons connect."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.password = secrets.token_urlsafe(16)
        self.as_user: list[str] = []
        self.pg_ctl = pg_bin("pg_ctl")
        self.port = 0
        self.started = False

    def start(self) -> None:
        initdb = pg_bin("initdb")
        self.folder.mkdir()
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(PG_USER)
            except KeyError:
                raise Failed(f"running as root, PostgreSQL needs the {PG_USER!r} user") from None
            for path in (self.folder, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", PG_USER, "--"]
        done = subprocess.run(
            [*self.as_user, initdb, "-D", str(self.folder / "data"), "-U", PG_USER, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode:
            raise Failed(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        for _attempt in range(3):  # the port may be taken between choosing it and binding it
            self.port = free_port()
            options = f"-p {self.port} -c listen_addresses={LOOPBACK} -k {self.folder}"
            done = self._ctl("start", "-l", str(self.folder / "log"), "-o", options)
            if done.returncode == 0:
                self.started = True
                return
        log = (self.folder / "log").read_text(errors="replace")[-2000:]
        raise Failed(f"pg_ctl start failed three times:\n{done.stdout}{done.stderr}{log}")

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*self.as_user, self.pg_ctl, "-D", str(self.folder / "data"), "-w", "-t", "60", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)

    def url(self, dbname: str) -> str:
        return f"postgresql://{PG_USER}@{LOOPBACK}:{self.port}/{dbname}"

    def connect(self, dbname: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=LOOPBACK, port=self.port, user=PG_USER, password=self.password, dbname=dbname,
            autocommit=True, connect_timeout=10,
        )  # fmt: skip

    def stop(self) -> None:
        if self.started and self._ctl("stop", "-m", "fast").returncode != 0:
            self._ctl("stop", "-m", "immediate")
        self.started = False


# -- mail and the feed -----------------------------------------------------------------------------


class Mailbox:
    """aiosmtpd handler: for each issue (read from the Subject), when each recipient first got
    it and how many times."""

    SUBJECT = re.compile(rb"^Subject: [^\r\n]*#(\d+)", re.MULTILINE)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: dict[int, dict[str, float]] = {}
        self.count: dict[int, dict[str, int]] = {}
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        stamp = time.time()
        match = self.SUBJECT.search(envelope.content)
        number = int(match.group(1)) if match else 0
        with self.lock:
            self.messages += 1
            first = self.first.setdefault(number, {})
            count = self.count.setdefault(number, {})
            for rcpt in envelope.rcpt_tos:
                key = rcpt.lower()
                first.setdefault(key, stamp)
                count[key] = count.get(key, 0) + 1
        return "250 2.0.0 Message accepted"

    def readers(self, number: int) -> int:
        with self.lock:
            return len(self.first.get(number, {}))

    def last_first(self, number: int) -> float:
        """When the last reader to get issue ``number`` got it (Unix time)."""
        with self.lock:
            return max(self.first.get(number, {}).values(), default=0.0)

    def earliest(self, number: int) -> float:
        with self.lock:
            return min(self.first.get(number, {}).values(), default=0.0)

    def duplicates(self, number: int) -> int:
        with self.lock:
            return sum(n - 1 for n in self.count.get(number, {}).values())

    def recipients(self, number: int) -> set[str]:
        with self.lock:
            return set(self.first.get(number, {}))


def rss(posts: int) -> bytes:
    """An RSS 2.0 feed of ``posts`` dated items, the newest last added."""
    items = []
    for n in range(1, posts + 1):
        date = format_datetime(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n))
        items.append(
            f"<item><title>Post {n}</title><link>https://blog.test/posts/{n}</link>"
            f'<guid isPermaLink="false">post-{n}</guid><pubDate>{date}</pubDate>'
            f"<description><![CDATA[<p>Body of post {n}.</p>]]></description></item>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        "<title>Fleet Feed</title><link>https://blog.test/</link><description>d</description>"
        + "".join(items)
        + "</channel></rss>"
    ).encode()


class Feed:
    """The feed over HTTP on 127.0.0.1, in a thread; ``publish`` adds an item."""

    def __init__(self) -> None:
        self.posts = 1
        self.body = rss(self.posts)
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = feed.body
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.2,), daemon=True)
        self.thread.start()
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}/feed.xml"

    def publish(self) -> None:
        self.posts += 1
        self.body = rss(self.posts)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the project and its daemons -------------------------------------------------------------------


def write_project(root: Path, database: str, smtp_port: int, feed_url: str, readers: int) -> Path:
    config = root / "schedules.yaml"
    config.write_text(
        f"""\
database: {database}
templates: null
fetch:
  timeout: 5
  first_fetch_newest: 50
batches:
  size: 200
  lease: 30s
  join_every: 5s
senders:
  main:
    type: smtp
    host: {LOOPBACK}
    port: {smtp_port}
    timeout: 10
schedules:
  {SCHEDULE}:
    title: Fleet Weekly
    feeds:
      - {feed_url}
    subscribers: readers
    sender: main
    from: Fleet Weekly <news@example.net>
    unsubscribe_url: https://news.example.net/unsubscribe/{{token}}
    when: every 1 minute
""",
        encoding="utf-8",
    )
    (root / "subscribers").mkdir()
    rows = "".join(f"r{i:05d}@example.com,Reader {i}\n" for i in range(readers))
    (root / "subscribers" / "readers.csv").write_text("email,name\n" + rows, encoding="utf-8")
    return config


class Daemon:
    """``newsletter run`` in a subprocess, its log in a file of the project folder."""

    def __init__(self, index: int, config: Path, env: dict[str, str]) -> None:
        self.index = index
        self.path = config.parent / f"daemon-{index}.log"
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "newsletter", "--config", str(config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=config.parent,
                env=env,
            )
        self.killed = False

    @property
    def log(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True

    def terminate(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` s; the exit status SIGTERM got (None: it hung)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


def next_due(now: float) -> float:
    return (now // MINUTE + 1) * MINUTE


def stamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%H:%M:%S")


# -- the run ---------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, root: Path, stack: ExitStack) -> None:
        self.args = args
        self.root = root
        self.stack = stack
        self.daemons: list[Daemon] = []
        self.results: list[tuple[str, str, str, bool]] = []  # figure, value, limit, met

    def check(self, figure: str, value: str, limit: str, ok: bool) -> None:
        self.results.append((figure, value, limit, ok))
        print(f"  {figure:<46} {value:>16}   limit {limit:<10} {'met' if ok else 'NOT MET'}")

    def fires(self) -> list[float]:
        rows = self.db.execute(
            "SELECT fire_at FROM fires WHERE job = %s ORDER BY fire_at", (f"digest:{SCHEDULE}",)
        ).fetchall()
        return [datetime.fromisoformat(r[0]).timestamp() for r in rows]

    def issues(self) -> list[tuple[int, float]]:
        rows = self.db.execute(
            "SELECT number, created_at FROM issues WHERE schedule = %s ORDER BY number", (SCHEDULE,)
        ).fetchall()
        return [(int(r[0]), datetime.fromisoformat(r[1]).timestamp()) for r in rows]

    def batch_rows(self) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT b.pid, COUNT(d.recipient) FROM batches b"
            " LEFT JOIN deliveries d ON d.claimed_by = b.id GROUP BY b.pid"
        ).fetchall()
        return {int(pid): int(n) for pid, n in rows}

    def setup(self) -> None:
        from aiosmtpd.controller import Controller

        print(
            f"{DAEMONS} daemons, {self.args.readers:,} readers, `when: every 1 minute`,"
            f" {self.args.minutes} due times watched"
        )
        began = time.monotonic()
        cluster = Cluster(self.root / "pg")
        self.stack.callback(cluster.stop)
        cluster.start()
        with cluster.connect("postgres") as admin:
            admin.execute("CREATE DATABASE newsletter")
        self.db = cluster.connect("newsletter")
        self.stack.callback(self.db.close)
        pg_version = self.db.execute("SHOW server_version").fetchone()[0]
        print(f"  PostgreSQL {pg_version} on {LOOPBACK}:{cluster.port}, default settings")

        self.mailbox = Mailbox()
        smtp_port = free_port()
        controller = Controller(self.mailbox, hostname=LOOPBACK, port=smtp_port)
        controller.start()
        self.stack.callback(controller.stop)
        self.feed = Feed()
        self.stack.callback(self.feed.close)
        print(f"  aiosmtpd on {LOOPBACK}:{smtp_port} (this process), feed at {self.feed.url}")

        project = self.root / "project"
        project.mkdir()
        self.config = write_project(
            project, cluster.url("newsletter"), smtp_port, self.feed.url, self.args.readers
        )
        self.env = {**os.environ, "PGPASSWORD": cluster.password, "NEWSLETTER_SECRET": secrets.token_hex(16)}
        done = subprocess.run(
            [sys.executable, "-m", "newsletter", "--config", str(self.config), "db", "migrate"],
            capture_output=True, text=True, timeout=120, env=self.env, cwd=project, check=False,
        )  # fmt: skip
        if done.returncode:
            raise Failed(f"newsletter db migrate failed:\n{done.stdout}\n{done.stderr}")
        print(f"  newsletter db migrate: {done.stdout.strip().splitlines()[-1]}")
        print(f"  set up in {time.monotonic() - began:.1f} s; project in {project}")

    def start_daemons(self) -> float:
        """Start the daemons well before a due time; that due time (Unix time)."""
        now = time.time()
        if next_due(now) - now < START_MARGIN:
            time.sleep(next_due(now) - now + 0.5)
        due = next_due(time.time())
        for i in range(DAEMONS):
            self.daemons.append(Daemon(i, self.config, self.env))
        self.stack.callback(self.stop_daemons)
        began = time.monotonic()
        for d in self.daemons:
            wait_until(
                lambda d=d: "event=scheduled" in d.log or not d.alive(), 60, f"daemon {d.index} to start"
            )
            if not d.alive():
                raise Failed(f"daemon {d.index} exited with {d.proc.returncode}")
        nexts = {
            m.group(1) for d in self.daemons for m in [re.search(r"next digest at (\S+ \S+)", d.log)] if m
        }
        pids = ", ".join(str(d.proc.pid) for d in self.daemons)
        print(
            f"  daemons (pids {pids}) up in {time.monotonic() - began:.1f} s;"
            f" next digest at {', '.join(sorted(nexts))} UTC"
        )
        if time.time() > due - 1:
            raise Failed("the daemons took so long to start that the first due time passed")
        return due

    def stop_daemons(self) -> None:
        for d in self.daemons:
            if d.alive():
                d.terminate()

    def watch(self) -> None:
        readers = self.args.readers
        due = self.start_daemons()
        dues: list[float] = []
        delivered: dict[int, float | None] = {}
        for k in range(1, self.args.minutes + 1):
            print(f"due time {k}: {stamp(due)} UTC")
            wait_until(
                lambda due=due: due in self.fires(), due - time.time() + 30, f"the fire due at {stamp(due)}"
            )
            dues.append(due)
            wait_until(lambda k=k: any(n == k for n, _ in self.issues()), 60, f"issue #{k} to be built")
            built = dict(self.issues())[k]
            # Something new for the next due time, published only once this one's issue exists.
            self.feed.publish()
            # created_at is kept to the second: "+0 s" is within the due time's second.
            print(
                f"  issue #{k} recorded at {stamp(built)} (+{built - due:.0f} s);"
                f" post {self.feed.posts} published"
            )
            wait_until(lambda k=k: self.mailbox.readers(k) > 0, 60, f"the first message of issue #{k}")
            print(f"  first message {self.mailbox.earliest(k) - due:.2f} s after the due time")
            if k == 1:
                self.kill_one(due)
            try:
                wait_until(
                    lambda k=k: self.mailbox.readers(k) >= readers,
                    due + 180 - time.time(),
                    f"every reader to have issue #{k}",
                )
                delivered[k] = self.mailbox.last_first(k) - due
                print(f"  every reader has issue #{k} {delivered[k]:.1f} s after the due time")
            except Failed as exc:
                delivered[k] = None
                print(f"  {exc}: {self.mailbox.readers(k):,} of {readers:,}")
            due += MINUTE
            if k < self.args.minutes and time.time() > due:
                raise Failed(f"issue #{k} was still being sent when the next due time came")
        time.sleep(3)  # anything sent twice would have arrived by now
        self.report(dues, delivered)

    def kill_one(self, due: float) -> None:
        """SIGKILL the daemon that built issue #1 (the one that did not see it fired elsewhere),
        once a third of the readers have it."""
        third = self.args.readers // 3
        wait_until(
            lambda: self.mailbox.readers(1) >= third,
            due + 120 - time.time(),
            "a third to have issue #1",
            0.05,
        )
        helpers = [d for d in self.daemons if "event=fired-elsewhere" in d.log]
        builders = [d for d in self.daemons if d not in helpers]
        if len(builders) == 1:
            victim, why = builders[0], "it built issue #1"
        else:  # not told apart from their logs: the one holding the most deliveries
            held = self.batch_rows()
            victim = max(self.daemons, key=lambda d: held.get(d.proc.pid, 0))
            why = "it held the most deliveries"
        held = self.batch_rows()
        victim.kill()
        got = self.mailbox.readers(1)
        print(
            f"  SIGKILLed daemon {victim.index} (pid {victim.proc.pid}; {why}) at {got:,} readers,"
            f" {time.time() - due:.1f} s after the due time; its batches held {held.get(victim.proc.pid, 0)}"
            " deliveries"
        )

    def report(self, dues: list[float], delivered: dict[int, float | None]) -> None:
        readers = self.args.readers
        expected = {f"r{i:05d}@example.com" for i in range(readers)}
        issues = self.issues()
        print("results")
        for k, took in delivered.items():
            got = self.mailbox.recipients(k)
            everyone = got == expected
            value = (
                f"{took:.1f} s" if took is not None and everyone else f"{len(got & expected):,}/{readers:,}"
            )
            self.check(
                f"issue #{k}: due time to every reader",
                value,
                f"{LIMIT_SECONDS:.0f} s",
                everyone and took is not None and took <= LIMIT_SECONDS,
            )
            dups = self.mailbox.duplicates(k)
            self.check(f"issue #{k}: duplicates", str(dups), str(LIMIT_DUPLICATES), dups <= LIMIT_DUPLICATES)
        for due in dues:
            built = sum(due <= at < due + MINUTE for _, at in issues)
            self.check(f"issues built for the due time {stamp(due)} UTC", str(built), "1", built == 1)
        early = sum(at < dues[0] for _, at in issues) if dues else 0
        self.check("issues built before the first due time", str(early), "0", early == 0)
        print(
            f"  messages received: {self.mailbox.messages:,};"
            f" issues in the database: {[n for n, _ in issues]}"
        )
        survivors = [d for d in self.daemons if not d.killed]
        died = [d.index for d in survivors if not d.alive()]
        codes = [d.terminate() for d in survivors]
        self.check(
            "survivors: running, then exit 0 on SIGTERM",
            " ".join(map(str, codes)),
            "0 each",
            not died and all(c == 0 for c in codes),
        )

    def passed(self) -> bool:
        return bool(self.results) and all(ok for *_, ok in self.results)

    def tails(self) -> None:
        for d in self.daemons:
            lines = d.log.splitlines()[-15:]
            print(f"--- daemon {d.index} (pid {d.proc.pid}), last lines:")
            print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=3000, help="subscribers (default 3000)")
    parser.add_argument("--minutes", type=int, default=2, help="due times to watch (default 2)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, project, cluster data)"
    )
    args = parser.parse_args()
    if args.readers < 3 or args.minutes < 1:
        parser.error("--readers must be at least 3 and --minutes at least 1")
    line_buffered()
    # SIGTERM unwinds like Ctrl-C, so the daemons and the cluster are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="newsletter-fleet-"))
    root.chmod(0o755)  # the cluster's owner (postgres) must reach its folder inside
    try:
        with ExitStack() as stack:
            run = Run(args, root, stack)
            try:
                run.setup()
                run.watch()
            except Failed as exc:
                print(f"FAILED: {exc}")
                run.tails()
                return 1
            if not run.passed():
                run.tails()
                return 1
            return 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        print(f"took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
