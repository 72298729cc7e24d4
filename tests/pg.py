"""A throwaway PostgreSQL for the tests: one cluster per test process, a database per test.

The cluster is made with initdb in a temporary folder and started with pg_ctl on a free port
on 127.0.0.1 (its socket in that folder too), as the ``postgres`` user when the tests run as
root, since PostgreSQL refuses to run as root. It starts on the first test that asks for it
and is stopped when the session ends. Each test gets a new database copied from a template
that has every migration applied, or an empty one for the tests of migrating itself.

Without PostgreSQL's programs these tests fail, so that CI cannot pass without running them;
``NEWSLETTER_TEST_PG=skip`` skips them instead (tests/system-packages.sh installs them).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BACKENDS = ["sqlite", "postgres"]
USER = "postgres"


def pg_bin(program: str) -> str | None:
    """Where ``program`` is: on PATH, else under Debian's /usr/lib/postgresql/N/bin, newest N."""
    found = shutil.which(program)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{program}")
    candidates.sort(key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    folder: Path
    port: int
    password: str
    as_user: list[str]  # the prefix that runs a program as the cluster's owner
    pg_ctl: str
    options: str = ""  # what the server was started with (pg_ctl -o)
    names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, dbname: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def create(self, template: str = "migrated") -> str:
        """A new database, a copy of ``template``: ``migrated`` (every migration) or ``empty``."""
        name = f"t{os.getpid()}_{next(self.names)}"
        source = "template0" if template == "empty" else "newsletter_migrated"
        with self.admin() as conn:
            # FILE_COPY: for a database this small, a copy of its files is quicker than
            # replaying it through the WAL (and fsync is off here).
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {source} STRATEGY FILE_COPY")
        return name

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def restart(self, down: float = 0.0) -> None:
        """Stop the server (every client cut off), stay down ``down`` seconds, start again on
        the same port: what a failover or an upgrade does to the daemons."""
        data = str(self.folder / "data")
        for args in (["stop", "-m", "fast"], ["start", "-l", str(self.folder / "log"), "-o", self.options]):
            done = subprocess.run(
                [*self.as_user, self.pg_ctl, "-D", data, "-w", "-t", "60", *args],
                capture_output=True, text=True, timeout=90, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"pg_ctl {args[0]} failed:\n{done.stdout}\n{done.stderr}"
            if args[0] == "stop":
                time.sleep(down)

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.folder / "data"), "stop", "-m", "immediate", "-w"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> Cluster:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        message = (
            "PostgreSQL's initdb and pg_ctl are not installed: run tests/system-packages.sh"
            " (or set NEWSLETTER_TEST_PG=skip to skip the PostgreSQL tests)"
        )
        if os.environ.get("NEWSLETTER_TEST_PG") == "skip":
            pytest.skip(message)
        pytest.fail(message)
    folder = Path(tempfile.mkdtemp(prefix="newsletter-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(USER)
        except KeyError:
            pytest.fail(f"running as root, PostgreSQL needs the {USER!r} user (Debian's package makes it)")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", USER, "--"]
    password = secrets.token_urlsafe(16)
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            pytest.fail(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    data = folder / "data"
    # Password checks over TCP, where the store connects; trust on the socket in the folder.
    run(
        initdb, "-D", str(data), "-U", USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
        "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
    )  # fmt: skip
    for attempt in range(3):
        port = _free_port()
        options = f"-F -c fsync=off -c full_page_writes=off -c synchronous_commit=off -p {port}"
        options += f" -c listen_addresses=127.0.0.1 -k {folder} -c max_connections=100"
        done = subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60",
             "-o", options, "start"],
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            break
        if attempt == 2:  # the port was taken between choosing and binding, thrice: give up
            log = (folder / "log").read_text(errors="replace") if (folder / "log").exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log}")
    cluster = Cluster(folder, port, password, as_user, pg_ctl, options)
    _make_template(cluster)
    return cluster


def _make_template(cluster: Cluster) -> None:
    """``newsletter_migrated``: a database with every migration, what a test database copies."""
    from newsletter.store import migrate_database

    with cluster.admin() as conn:
        conn.execute("CREATE DATABASE newsletter_migrated TEMPLATE template0")
    os.environ["PGPASSWORD"] = cluster.password
    try:
        migrate_database(cluster.url("newsletter_migrated"), busy_timeout=10)
    finally:
        del os.environ["PGPASSWORD"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_database(pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The URL of a new database with every migration applied; PGPASSWORD set to reach it."""
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    name = pg_cluster.create()
    yield pg_cluster.url(name)
    pg_cluster.drop(name)


@pytest.fixture
def pg_empty(pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The URL of a new database with no table at all; PGPASSWORD set to reach it."""
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)
    name = pg_cluster.create("empty")
    yield pg_cluster.url(name)
    pg_cluster.drop(name)


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new state database on each backend in turn: a SQLite file, a PostgreSQL database."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_database"))
    return f"sqlite:///{tmp_path / 'state.db'}"
