"""Benchmark: one issue delivered by 1, 2 and 4 processes sharing one PostgreSQL, on 127.0.0.1.

    .venv/bin/python bench/bench_pg.py [--recipients 50000] [--articles 3] [--processes 1,2,4]
        [--group 10] [--quick]

50,000 recipients by default, about four minutes on a 2-core machine; the 100,000 the figures
are wanted at (``--recipients 100000``) take about twice that. ``--quick``: 5,000.

A throwaway PostgreSQL cluster is made here (initdb in a temporary folder, pg_ctl on a free
port of 127.0.0.1, as ``postgres`` when run as root) with the server's defaults (fsync,
synchronous_commit, full_page_writes on), printed as used. The mail server is Postfix's
smtp-sink (installed from Debian's postfix when missing, as root).

The issue is built once per backend, in this process, as ``send_digest``'s build step does it
(feed, list, render, a pending delivery per recipient) but sent by nobody; PostgreSQL's copy is
then analysed, as autovacuum does to a list that has been there a while. Every run starts from
a fresh copy of it (``CREATE DATABASE ... TEMPLATE``; a copy of the file for SQLite) and is
checked after: every row marked once (attempts = 1), no batch left; for full runs also the issue
complete and smtp-sink's own count equal to the recipients.

1. full runs: N processes started at once, each ``send_digest(ctx, name, build=False,
   fetch_feeds=False)``: what a process joining a send does (claim batches until none is free,
   send over the smtp sender's default connections, mark each row fenced by its batch,
   release). msg/s: recipients over the wall time from the first start to the last exit,
   start-up included. Beside it the rate at smtp-sink (first message to last), the same
   messages from N reference clients with no store (``refclient.py``, pipelined, as many
   connections), and the ratio to the same run on SQLite in one process.
2. store only, no SMTP: N processes drive ``Claims`` directly: claim, a fenced
   ``record_deliveries`` of ``--group`` marks (one statement) and the day's
   count (``count_sent``) to a transaction as the pipelined sender's loop writes them,
   release; timed from the moment all N are connected. The limit beside it: N processes
   updating the same rows by key, ``--group`` to a transaction too, and nothing else; and
   SQLite's store in one process.

A measuring script, not a test: it prints figures, and exits non-zero when a run did not
deliver what it should have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from time import perf_counter
from typing import Any

from _support import (
    BENCH_DIR,
    TimedSmtpSink,
    exit_on_problems,
    free_port,
    line_buffered,
    require_smtp_sink,
    stop_process,
)

SCHEDULE, SENDER = "bench", "local"  # bench_digest.write_project's schedule and smtp sender
PG_USER = "postgres"
RUN_TIMEOUT = 1800.0  # a run slower than this is stuck: its processes are ended
# A run of a few minutes on 2 cores; the figures are wanted at 100,000 (about twice as long).
DEFAULT_RECIPIENTS, TARGET_RECIPIENTS = 50_000, 100_000
SETTINGS = ["server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level",
            "shared_buffers", "max_wal_size", "checkpoint_timeout", "autovacuum"]  # fmt: skip
UPDATE = "UPDATE deliveries SET attempts = attempts + 1 WHERE issue_id = %s AND recipient = %s"
ME = str(Path(__file__).resolve())


# -- the PostgreSQL cluster ----------------------------------------------------------------------


def pg_bin(program: str) -> str | None:
    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{program}"), key=lambda p: int(p.split("/")[4]))
    return shutil.which(program) or (candidates[-1] if candidates else None)


class PgServer:
    """A cluster of its own with the server's default settings; password auth over TCP."""

    def __init__(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            sys.exit("CANNOT RUN: PostgreSQL's initdb and pg_ctl are missing (tests/system-packages.sh)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        # Not under the bench's temporary folder (root's, 0700): the postgres user must reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pg-cluster-"))
        self.password = secrets.token_urlsafe(16)
        self.as_user: list[str] = []
        self.port = free_port()

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=180, check=False
        )
        if done.returncode:
            log = self.folder / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stdout}\n{done.stderr}\n{tail}")

    def __enter__(self) -> PgServer:
        pwfile, data = self.folder / "pw", str(self.folder / "data")
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            owner = pwd.getpwnam(PG_USER)
            for path in (self.folder, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", PG_USER, "--"]
        # Only where it listens is set: every other setting is the server's default.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        try:
            self._run(self.initdb, "-D", data, "-U", PG_USER, f"--pwfile={pwfile}", "-E", "UTF8",
                      "--auth-host=scram-sha-256", "--auth-local=trust", "--locale=C.UTF-8")  # fmt: skip
            log = str(self.folder / "log")
            self._run(self.pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
        except BaseException:
            self.__exit__()
            raise
        os.environ["PGPASSWORD"] = self.password  # how the store and the children get in
        return self

    def __exit__(self, *exc: object) -> None:
        stop = [*self.as_user, self.pg_ctl, "-D", str(self.folder / "data"), "stop", "-m", "fast", "-w"]
        subprocess.run(stop, capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement)
            return list(cur.fetchall()) if cur.description else []

    def settings(self) -> str:
        return ", ".join(f"{name}={self.sql(f'SHOW {name}')[0][0]}" for name in SETTINGS)


# -- the databases: one built issue per backend, copied for each run ----------------------------


@dataclass
class Built:
    issue_id: int
    list_name: str
    recipients: int
    seconds: float


def build_issue(config_file: Path) -> Built:
    """The issue and its pending deliveries, recorded as ``send_digest``'s build step does;
    nothing else runs yet, so without the schedule lock, and nothing is sent."""
    from newsletter import digest
    from newsletter.config import load_config
    from newsletter.context import RunContext

    start = perf_counter()
    with RunContext.open(load_config(config_file)) as ctx:
        ctx.tokens  # noqa: B018 - the install's secret, made once as by the first run
        digest.fetch(ctx, [SCHEDULE])
        send = digest._start(ctx, SCHEDULE, None)
        issue = send.record_issue(force=False)
        if issue is None:
            sys.exit(f"{config_file.name}: no issue built (nothing new in the feed?)")
        pending = ctx.store.delivery_counts(issue.id).pending
        return Built(issue.id, send.builder.list_name, pending, perf_counter() - start)


class Databases:
    """A backend's built issue (``build``), and a fresh copy of it per run (``fresh``)."""

    def __init__(self, root: Path, base_config: Path, pg: PgServer | None) -> None:
        self.root, self.base_config, self.pg = root, base_config, pg

    def _url(self, name: str) -> str:
        return self.pg.url(name) if self.pg else f"sqlite:///{self.root / name}.db"

    def config(self, name: str) -> Path:
        path = self.root / f"schedules-{name}.yaml"
        text = self.base_config.read_text(encoding="utf-8")
        path.write_text(text.replace("database: sqlite:///state.db", f"database: {self._url(name)}"))
        return path

    def build(self) -> Built:
        if self.pg:
            from newsletter.store import migrate_database

            self.pg.sql("CREATE DATABASE base TEMPLATE template0")
            migrate_database(self.pg.url("base"))
        built = build_issue(self.config("base"))
        if self.pg:
            self.pg.sql("VACUUM ANALYZE", "base")
        return built

    def fresh(self, name: str) -> tuple[str, Path]:
        if self.pg:
            self.pg.sql(f"CREATE DATABASE {name} TEMPLATE base")
        else:
            shutil.copyfile(self.root / "base.db", self.root / f"{name}.db")
        return self._url(name), self.config(name)

    def drop(self, name: str) -> None:
        if self.pg:
            self.pg.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.root / name}.db{suffix}").unlink(missing_ok=True)


def query(url: str, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """A read of the ledger outside the store: the check does not trust what it checks."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as conn:
            return list(conn.execute(sql.replace("?", "%s"), tuple(args)).fetchall())
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)) as lite:
        return list(lite.execute(sql, tuple(args)).fetchall())


def check_ledger(
    url: str, issue_id: int, expected: int, status: str = "sent", complete: bool = True
) -> tuple[list[str], Counter[str]]:
    """(what is wrong, rows marked per pid): every recipient's row in ``status`` after exactly
    one attempt, no batch left, and with ``complete`` the issue finished."""
    rows = query(url, "SELECT status, attempts, claimed_by FROM deliveries WHERE issue_id = ?", (issue_id,))
    problems = []
    good = sum(1 for state, tries, _ in rows if state == status and tries == 1)
    if len(rows) != expected or good != expected:
        states = Counter(f"{state}/{tries}" for state, tries, _ in rows)
        problems.append(f"{good:,} of {expected:,} rows {status} after one attempt: {dict(states)}")
    held = query(url, "SELECT COUNT(*) FROM batches")[0][0]
    if held:
        problems.append(f"{held} batch(es) left behind")
    state = query(url, "SELECT status FROM issues WHERE id = ?", (issue_id,))[0][0]
    if complete and state != "complete":
        problems.append(f"issue is {state!r}, not complete")
    # A marked row keeps the batch that marked it: host:pid:nonce.
    return problems, Counter(str(by).split(":")[1] for _, _, by in rows if by)


# -- child processes -----------------------------------------------------------------------------


def worker(kind: str, args: list[str]) -> None:
    """A child: ``join CONFIG``, ``claim URL ISSUE LIST SIZE LEASE GROUP`` or ``update URL ISSUE
    INDEX OF GROUP``; it prints one JSON line."""
    if kind == "join":
        from newsletter.config import load_config
        from newsletter.context import RunContext
        from newsletter.digest import send_digest

        with RunContext.open(load_config(args[0])) as ctx:
            report = send_digest(ctx, SCHEDULE, build=False, fetch_feeds=False)
        done = {"ok": report.ok, "aborted": report.aborted, "rows": sum(i.sent_here for i in report.issues)}
        done["errors"] = [e for i in report.issues for e in i.errors][:3]
        done["refused"] = sum(i.refused for i in report.issues)
    elif kind == "claim":
        done = claim_worker(args[0], int(args[1]), args[2], int(args[3]), float(args[4]), int(args[5]))
    elif kind == "update":
        done = update_worker(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
    else:
        sys.exit(f"unknown worker {kind!r}")
    print(json.dumps(done), flush=True)


def _ready() -> None:
    """Connected and set: the parent starts every child's clock at once."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)


def claim_worker(
    url: str, issue_id: int, list_name: str, size: int, lease: float, group: int
) -> dict[str, Any]:
    """The delivery loop's store work with the sending taken out."""
    from itertools import islice

    from newsletter.claims import Claims
    from newsletter.model import DeliveryStatus, now
    from newsletter.store import open_store

    with open_store(url) as store:
        _ready()
        start = perf_counter()
        claims = Claims(store, issue_id, list_name, size=size, lease=lease)
        marked = refused = 0
        rows = claims.rows()
        try:
            # Claimed outside the marks' transaction, as the loop hands messages out before it
            # writes the outcomes that came back together; renewed between two such writes.
            while chunk := list(islice(rows, group)):
                with store.transaction(serial=False):
                    group_of = [(r.recipient, claims.batch_of(r.recipient)) for r in chunk]
                    marks = [(key, DeliveryStatus.SENT, "", b) for key, b in group_of if b is not None]
                    answers = store.record_deliveries(issue_id, marks)
                    done = dict(zip([m[0] for m in marks], answers, strict=True))
                    for key, _ in group_of:
                        written = done.get(key, False)
                        marked += written
                        refused += not written
                        claims.answered(key, written)
                    store.count_sent(SENDER, now(), len(chunk))
                claims.renew()
        finally:
            claims.release()
        return {"rows": marked, "refused": refused, "seconds": perf_counter() - start}


def update_worker(url: str, issue_id: int, index: int, of: int, group: int) -> dict[str, Any]:
    """The limit: this share's rows updated by primary key, ``group`` to a transaction."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        every = "SELECT recipient FROM deliveries WHERE issue_id = %s ORDER BY recipient"
        mine = [r for (r,) in conn.execute(every, (issue_id,)).fetchall()]
        share = -(-len(mine) // of)
        mine = mine[index * share : (index + 1) * share]  # a contiguous range, as a batch is
        _ready()
        start, updated = perf_counter(), 0
        for at in range(0, len(mine), group):
            with conn.transaction():
                for recipient in mine[at : at + group]:
                    updated += conn.execute(UPDATE, (issue_id, recipient)).rowcount
    return {"rows": updated, "refused": 0, "seconds": perf_counter() - start}


def _spawn(cmd: list[str], cwd: Path | None = None, told: bool = False) -> subprocess.Popen[str]:
    """A child; ``told``: it waits for "go" on stdin (``communicate`` closes it later)."""
    stdin = subprocess.PIPE if told else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)  # fmt: skip


def _collect(procs: list[subprocess.Popen[str]]) -> tuple[float, list[dict[str, Any]]]:
    """Every child waited for (ended by its handle when stuck): (when the last ended, reports)."""
    deadline, reports = time.monotonic() + RUN_TIMEOUT, []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                stop_process(p)
            out, err = "", "did not finish in time"
        lines = out.strip().splitlines()
        try:
            data: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            data = {}
        if proc.returncode != 0 or not data:
            data = {"crashed": f"exit {proc.returncode}: " + (err.strip().splitlines() or ["?"])[-1][:300]}
        reports.append(data)
    return perf_counter(), reports


# -- the runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    backend: str
    processes: int
    rows: int
    seconds: float
    at_sink: float | None = None  # smtp-sink: first message to last
    shares: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 and not self.problems else 0.0


class Bench:
    def __init__(self, sink: TimedSmtpSink, project: Path, message: Path) -> None:
        self.sink, self.project, self.message = sink, project, message
        self.problems: list[str] = []

    def _judge(
        self, run: Run, reports: list[dict[str, Any]], url: str, built: Built, status: str = ""
    ) -> Run:
        """Each process's report, the ledger (``status``: the store-only runs' rows; none: a
        full run's, every row sent and the issue complete)."""
        for report in reports:
            if "crashed" in report:
                run.problems.append(report["crashed"])
            elif report.get("ok") is False or report.get("aborted") or report.get("errors"):
                run.problems.append(f"a process reported {report}")
            elif report["refused"]:
                run.problems.append(f"{report['refused']} outcome(s) refused by the fence")
        done = sum(r.get("rows", 0) for r in reports)
        if done != built.recipients:
            run.problems.append(f"the processes say they did {done:,} rows of {built.recipients:,}")
        problems, shares = check_ledger(url, built.issue_id, built.recipients, status or "sent", not status)
        run.problems += problems
        run.shares = sorted(shares.values(), reverse=True)
        self.problems += [f"{run.backend}, {run.processes} process(es): {p}" for p in run.problems]
        return run

    def full(self, dbs: Databases, backend: str, n: int, built: Built) -> Run:
        url, config = dbs.fresh(f"full_{n}")
        before = self.sink.received()
        start = perf_counter()
        end, reports = _collect([_spawn([sys.executable, ME, "worker", "join", str(config)], self.project)
                                 for _ in range(n)])  # fmt: skip
        run = Run(backend, n, built.recipients, end - start)
        counted = self.sink.wait_for(before + built.recipients) - before
        span = self.sink.span(before, before + built.recipients)
        run.at_sink = span[1] - span[0] if span else None
        if counted != built.recipients:
            run.problems.append(f"smtp-sink counted {counted:,} messages for {built.recipients:,} recipients")
        self._judge(run, reports, url, built)
        dbs.drop(f"full_{n}")
        return run

    def store_only(self, dbs: Databases, backend: str, n: int, built: Built, kind: str, group: int) -> Run:
        from newsletter.config import load_config

        url, config = dbs.fresh(f"{kind}_{n}")
        bs = load_config(config).settings.batches
        me = [sys.executable, ME, "worker", kind, url, str(built.issue_id)]
        if kind == "claim":
            cmds = [[*me, built.list_name, str(bs.size), str(bs.lease.total_seconds()), str(group)]] * n
        else:
            cmds = [[*me, str(i), str(n), str(group)] for i in range(n)]
        procs = [_spawn(cmd, told=True) for cmd in cmds]
        ready = [p.stdout.readline().strip() if p.stdout else "" for p in procs]
        start = perf_counter()
        for proc, said in zip(procs, ready, strict=True):
            assert proc.stdin is not None
            proc.stdin.write("go\n" if said == "ready" else "\n")
            proc.stdin.flush()
        end, reports = _collect(procs)
        # The limit's UPDATE leaves the rows pending, tried once.
        run = self._judge(Run(backend, n, built.recipients, end - start), reports, url, built,
                          "sent" if kind == "claim" else "pending")  # fmt: skip
        dbs.drop(f"{kind}_{n}")
        return run

    def smtp_alone(self, total: int, n: int, connections: int) -> Run:
        """The same messages from n reference clients, no store: SMTP on this machine."""
        before = self.sink.received()
        ref = [sys.executable, str(BENCH_DIR / "refclient.py"), "--client", "pipelined"]
        ref += [
            "--port",
            str(self.sink.port),
            "--message",
            str(self.message),
            "--connections",
            str(connections),
        ]
        shares = [total // n + (i < total % n) for i in range(n)]
        start = perf_counter()
        end, reports = _collect([_spawn([*ref, "--messages", str(k)]) for k in shares])
        run = Run("SMTP alone", n, total, end - start)
        for report, k in zip(reports, shares, strict=True):
            if "crashed" in report or report.get("sent") != k or report.get("failed"):
                run.problems.append(f"a reference client reported {report}")
        counted = self.sink.wait_for(before + total) - before
        if counted != total:
            run.problems.append(f"smtp-sink counted {counted:,} of {total:,}")
        self.problems += [f"reference clients, {n}: {p}" for p in run.problems]
        return run


def sample_message(root: Path, articles: int) -> Path:
    """One real message of the project (a dry run), for the reference clients."""
    from bench_digest import write_project

    where = root / "dry-run"
    where.mkdir()
    config = write_project(where, 1, articles, 25)  # a dry run never connects
    cmd = [sys.executable, "-m", "newsletter", "--config", str(config), "send-digest", SCHEDULE, "--dry-run"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=where, timeout=120, check=False)
    files = sorted((where / "outbox").rglob("*.eml"))
    if done.returncode != 0 or not files:
        sys.exit(f"the dry run wrote no message: {done.stdout.strip()} {done.stderr.strip()}")
    return files[0]


# -- output --------------------------------------------------------------------------------------


def fig(run: Run | None, unit: str = "") -> str:
    return "-" if run is None else "FAILED" if run.problems else f"{run.rate:,.0f}{unit}"


def ratio(a: Run | None, b: Run | None) -> str:
    return f"{a.rate / b.rate:.2f}" if a and b and a.rate and b.rate else "-"


def header(*columns: str) -> None:
    print(f"  {'':<10} {'N':>2} {'s':>7} {'rate':>7}" + "".join(f" {c:>10}" for c in columns) + "  notes")


def line(run: Run, *columns: str, notes: Sequence[str] = ()) -> None:
    shares = "shares " + "/".join(f"{k / run.rows:.0%}" for k in run.shares) if len(run.shares) > 1 else ""
    said = "; ".join(filter(None, [shares, *run.problems, *notes]))
    cells = "".join(f" {c:>10}" for c in columns)
    print(f"  {run.backend:<10} {run.processes:>2} {run.seconds:>7.1f} {fig(run):>7}{cells}  {said}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=DEFAULT_RECIPIENTS, help="default 50000")
    parser.add_argument("--articles", type=int, default=3, help="articles in the digest (default 3)")
    parser.add_argument("--processes", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument("--group", type=int, default=10, help="store only: marks a transaction (default 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 recipients")
    args = parser.parse_args()
    if args.quick:
        args.recipients = 5000
    try:
        counts = [int(x) for x in args.processes.split(",") if x.strip()]
    except ValueError:
        parser.error("--processes takes comma-separated numbers")
    if not counts or min(counts) < 1 or args.recipients < max(counts) or not 1 <= args.articles <= 500:
        parser.error("need process counts >= 1, --recipients >= the largest, --articles 1 to 500")
    if args.group < 1:
        parser.error("--group must be at least 1")
    line_buffered()
    began = perf_counter()
    print(
        f"PostgreSQL fan-out benchmark: {args.recipients:,} recipients, {args.articles}-article digest,"
        f" processes {args.processes}; Python {platform.python_version()}, {os.cpu_count()} CPUs, 127.0.0.1"
    )
    if args.recipients < TARGET_RECIPIENTS:
        print(
            f"  fewer than the {TARGET_RECIPIENTS:,} the figures are wanted at: --recipients"
            f" {TARGET_RECIPIENTS} (about twice the default run's four minutes on 2 cores)"
        )
    path = require_smtp_sink("mail server")
    with (
        tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp,
        TimedSmtpSink(path) as sink,
        PgServer() as pg,
    ):
        bench = run_all(args, counts, Path(tmp), sink, pg)
    print(f"\nwhole run: {perf_counter() - began:,.0f} s")
    exit_on_problems(bench.problems)
    print(f"every run checked: ledger rows, batches, and smtp-sink's own count ({sink.received():,} in all)")


def run_all(
    args: argparse.Namespace, counts: list[int], root: Path, sink: TimedSmtpSink, pg: PgServer
) -> Bench:
    from bench_digest import write_project

    from newsletter.config import load_config

    print(f"PostgreSQL (127.0.0.1:{pg.port}), the server's defaults: {pg.settings()}")
    message = sample_message(root, args.articles)
    project = root / "project"
    project.mkdir()
    base_config = write_project(project, args.recipients, args.articles, sink.port)
    settings = load_config(base_config)
    connections = int(getattr(settings.senders[SENDER].options, "connections", 1))
    bs = settings.settings.batches
    print(
        f"message: {message.stat().st_size / 1024:,.1f} KB; smtp sender: {connections} connections a"
        f" process; batches of {bs.size}, lease {bs.lease.total_seconds():g} s"
    )
    bench = Bench(sink, project, message)
    lite, post = Databases(project, base_config, None), Databases(project, base_config, pg)
    built = {}
    for label, dbs in (("SQLite", lite), ("PostgreSQL", post)):
        built[label] = b = dbs.build()
        print(f"issue built on {label}: {b.recipients:,} pending deliveries in {b.seconds:.1f} s")
        if b.recipients != args.recipients:
            sys.exit(f"{label}: {b.recipients} deliveries for {args.recipients} recipients")

    def at_sink(run: Run) -> str:
        return f"{run.rows / run.at_sink:,.0f}" if run.at_sink and not run.problems else "-"

    print("\n1. full runs, msg/s: N processes joining the issue, from the first start to the last exit")
    header("at sink", "SMTP alone", "/SQLite(1)")
    first = bench.full(lite, "SQLite", 1, built["SQLite"])
    alone = {1: bench.smtp_alone(args.recipients, 1, connections)}
    line(first, at_sink(first), fig(alone[1]), ratio(first, first))
    full = {}
    for n in counts:
        full[n] = bench.full(post, "PostgreSQL", n, built["PostgreSQL"])
        alone[n] = alone.get(n) or bench.smtp_alone(args.recipients, n, connections)
        line(full[n], at_sink(full[n]), fig(alone[n]), ratio(full[n], first))
    print(
        "  at sink: msg/s from smtp-sink's first message to its last. SMTP alone: N reference clients"
        f"\n  (refclient.py, pipelined, {connections} connections each), the same message, no store at all."
    )

    print(f"\n2. store only, rows/s: claim + fenced marks ({args.group} a transaction with the day's count)")
    header("limit", "/limit", "/SQLite(1)")
    lite_store = bench.store_only(lite, "SQLite", 1, built["SQLite"], "claim", args.group)
    line(lite_store, "", "", ratio(lite_store, lite_store))
    store = {}
    for n in counts:
        store[n] = bench.store_only(post, "PostgreSQL", n, built["PostgreSQL"], "claim", args.group)
        limit = bench.store_only(post, "PostgreSQL", n, built["PostgreSQL"], "update", args.group)
        cells = fig(limit), ratio(store[n], limit), ratio(store[n], lite_store)
        line(store[n], *cells, notes=[f"limit: {p}" for p in limit.problems])
    print(
        "  + release, no SMTP, timed from go with every process connected. limit: N processes"
        f"\n  updating the same rows by primary key, {args.group} a transaction, and nothing else."
    )

    print("\nsummary")
    for n in counts:
        print(
            f"  {n} process(es) on PostgreSQL: {fig(full[n], ' msg/s')} delivered, {ratio(full[n], first)}"
            f" x SQLite in one process ({fig(first, ' msg/s')}); the store alone {fig(store[n], ' rows/s')}"
        )
    return bench


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
