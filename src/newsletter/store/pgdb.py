"""The PostgreSQL connection under the store: opening it, its errors, its transactions.

``postgresql://user@host:5432/db``: the password is never in the URL (it would be shown
wherever the URL is); libpq reads it from ``PGPASSWORD`` or ``~/.pgpass`` by itself. Every
error names the server as ``user@host:port/db`` and says what to check.

Opening does not migrate: with several machines on one database, the schema changes when
someone runs ``newsletter db migrate``. Until then every statement is refused with that hint,
rather than failing halfway through a send on a table that is not there yet.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from ..errors import StoreError
from .migrate import Migration, migrate_postgres, pending_postgres

SCHEMES = ("postgresql://", "postgres://")

# pg_advisory_xact_lock key that every write transaction takes first: what SQLite's
# BEGIN IMMEDIATE does, one writing transaction at a time, so a read-then-write (a lock, the
# next issue number, the secret) cannot interleave with another process's. Statements outside
# transaction() (a delivery's result) do not take it, as in SQLite they commit on their own.
WRITE_LOCK = 0x6E6C_7772  # "nlwr"
# The store's transactions never wait on anything but the database: one idle this long
# belongs to a process that has stopped (the server then ends its session).
IDLE_IN_TRANSACTION_MS = 10_000


def _where(url: str) -> tuple[str, str]:
    """(the URL as messages show it, without any password; the server as host:port)."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?", "?"  # unreadable: showing it might show a password
    user = str(parts.get("user") or os.environ.get("PGUSER", ""))
    host = parts.get("host") or os.environ.get("PGHOST", "localhost")
    port = parts.get("port") or os.environ.get("PGPORT", "5432")
    server = f"{host}:{port}"
    return f"postgresql://{user + '@' if user else ''}{server}/{parts.get('dbname') or ''}", server


def shown(url: str) -> str:
    """The URL as errors and logs show it: user, host, port, database, no password."""
    return _where(url)[0]


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """The store's statements use sqlite3's ``?`` (they are shared, see ``common.py``); psycopg
    wants ``%s``, and a literal ``%`` doubled. No statement has a ``?`` inside a string."""
    return sql.replace("%", "%%").replace("?", "%s") if "?" in sql else sql


def _params(args: Iterable[Any]) -> tuple[Any, ...]:
    """Statuses by their values, as sqlite3 stores a ``StrEnum``; and no NUL: PostgreSQL text
    cannot hold one, which SQLite keeps (a feed's id with one in it would make every fetch's
    write fail). Dropped here, the one way in."""
    return tuple(_param(a) for a in args)


def _param(a: Any) -> Any:
    if isinstance(a, enum.Enum):
        return a.value
    if isinstance(a, str) and "\x00" in a:
        return a.replace("\x00", "")
    return a


def _message(exc: BaseException) -> str:
    """psycopg's message on one line, with the password blanked should libpq ever echo it."""
    text = " ".join(str(exc).split())
    password = os.environ.get("PGPASSWORD")
    return text.replace(password, "***") if password else text


def _hint(exc: psycopg.Error, server: str) -> str:
    text = str(exc)
    if isinstance(exc, errors.LockNotAvailable):
        return "another newsletter process may hold it; try again"
    if "password authentication failed" in text or "no password supplied" in text:
        return "check the password in PGPASSWORD (libpq's variable) or ~/.pgpass, and the user name"
    if "does not exist" in text and not isinstance(exc, errors.UndefinedTable):
        return "create the database and the user first (createdb, createuser), or fix their names"
    if isinstance(exc, psycopg.OperationalError):
        return f"check that PostgreSQL runs at {server} and takes connections from this machine"
    return ""


class PgDatabase:
    """One connection to a PostgreSQL database, autocommit outside ``transaction()``."""

    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        # What every message names, as SQLite's name their file.
        self.path, self.server = _where(url)
        try:
            parts = conninfo_to_dict(url)
        except psycopg.Error:
            # libpq's own message quotes the URL, password and all: not repeated.
            raise StoreError(
                f"{self.path}: not a PostgreSQL URL libpq can read",
                hint="write it as postgresql://user@host:5432/dbname, the password in PGPASSWORD",
            ) from None
        if parts.get("password"):
            raise StoreError(
                f"{self.path}: the database URL holds a password",
                hint="take it out of the URL and set PGPASSWORD (libpq reads it) or use ~/.pgpass",
            )
        wait_ms = max(1, int(busy_timeout * 1000))
        idle_ms = max(IDLE_IN_TRANSACTION_MS, wait_ms // 2)
        try:
            self.db: psycopg.Connection[dict[str, Any]] = psycopg.connect(
                url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, math.ceil(min(busy_timeout, 10))),
                application_name="newsletter",
                # How long a statement waits for a lock held by another process (the write
                # lock above included) before it fails: the busy timeout, as in SQLite. And a
                # process frozen inside a transaction (SIGSTOP, a VM paused) is cut off by the
                # server before then, so its locks do not stop every other machine.
                options=f"-c lock_timeout={wait_ms} -c idle_in_transaction_session_timeout={idle_ms}",
            )
        except psycopg.Error as exc:
            raise StoreError(
                f"{self.path}: cannot connect: {_message(exc)}", hint=_hint(exc, self.server)
            ) from None
        self._depth = 0
        try:
            self._behind = pending_postgres(self.db, self.path)
        except psycopg.Error as exc:
            self.db.close()
            raise self._error(exc) from None
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    # -- migrations ------------------------------------------------------------------------------

    def pending_migrations(self) -> list[str]:
        """The migrations this database still lacks, as ``NNNN_name``."""
        return [f"{m.number:04d}_{m.name}" for m in self._behind]

    def migrate(self) -> list[Migration]:
        """Apply the pending migrations (safe with other migrators at once); what was applied."""
        try:
            done = migrate_postgres(self.db, self.path)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        self._behind = []
        return done

    # -- transactions ----------------------------------------------------------------------------

    @contextmanager
    def transaction(self, write: bool = True, serial: bool = True) -> Iterator[None]:
        """One transaction (nested ones join the outer). ``write=False``: one snapshot to read
        (and temporary tables to write), without the write lock. ``serial=False``: a writer
        without it either, for statements safe beside other writers (claims, fenced marks):
        a send shared by several machines must not take turns with all of them."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._begin(write, serial)
        try:
            yield
        except BaseException:
            self._end("ROLLBACK")
            raise
        else:
            self._end("COMMIT")

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        """Run a whole pipeline and then forget it: what --dry-run and --to use."""
        self._begin(True)
        try:
            # A dry run fetches feeds inside its transaction: it may sit idle for a while.
            self.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            yield
        finally:
            self._end("ROLLBACK")

    def _begin(self, write: bool, serial: bool = True) -> None:
        self.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ")
        self._depth = 1
        if write and serial:
            try:
                self.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            except BaseException:
                self._end("ROLLBACK")
                raise

    def _end(self, how: str) -> None:
        self._depth = 0
        try:
            self.db.execute(how)
        except psycopg.Error as exc:
            if how == "COMMIT":
                raise self._error(exc) from None
            # A rollback on a broken connection: the server drops the transaction anyway.

    # -- statements ------------------------------------------------------------------------------

    def execute(self, sql: str, args: Iterable[Any] = ()) -> psycopg.Cursor[dict[str, Any]]:
        """Run one statement; a database error is a StoreError that says what to check."""
        self._migrated()
        try:
            return self.db.execute(_pyformat(sql), _params(args) or None)
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def _migrated(self) -> None:
        if self._behind:
            names = ", ".join(self.pending_migrations())
            raise StoreError(
                f"{self.path}: the state database lacks migration(s) {names}",
                hint="run `newsletter db migrate` (once, from any one machine)",
            )

    def _error(self, exc: psycopg.Error) -> StoreError:
        return StoreError(f"{self.path}: {_message(exc)}", hint=_hint(exc, self.server))
