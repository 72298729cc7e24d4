"""The SQLite connection under the store: opening it privately, migrations, transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import StoreError
from ..files import create_private
from .migrate import migrate_sqlite


class Database:
    """One connection to ``sqlite:///path``, with the transactions written down, not guessed."""

    def __init__(self, url: str, busy_timeout: float = 30.0) -> None:
        if not url.startswith("sqlite:///"):
            # Never the URL itself: one meant for another driver may carry a password.
            scheme = url.partition("://")[0] if "://" in url else "(no scheme)"
            raise StoreError(
                f"unsupported database URL (scheme {scheme[:40]!r})",
                hint="use sqlite:///path or postgresql://user@host:5432/db (password in PGPASSWORD)",
            )
        self.path = url[len("sqlite:///") :]
        if sqlite3.sqlite_version_info < (3, 35):
            # Outcomes that come together are written with UPDATE ... FROM ... RETURNING.
            raise StoreError(
                f"{self.path}: SQLite {sqlite3.sqlite_version} is too old (3.35 or newer is needed)",
                hint="use a Python built against a newer SQLite (Debian 12 ships 3.40)",
            )
        try:
            # It holds every address and the unsubscribe secret: 0600 from its first byte on.
            if self.path != ":memory:" and not self.path.startswith("file:"):
                create_private(self.path)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the state database: {exc.strerror}") from None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so what is one
            # transaction is written down here and not left to the driver's guesses.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (not a power cut) and spares an
            # fsync per delivery.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrate_sqlite(self.db, self.path)
        except (sqlite3.Error, StoreError) as exc:
            if hasattr(self, "db"):
                self.db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from None
        self._depth = 0

    def pending_migrations(self) -> list[str]:
        return []  # applied as the file was opened

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, write: bool = True, serial: bool = True) -> Iterator[None]:
        """One transaction (nested ones join the outer). ``write=False`` begins deferred: one
        snapshot to read and temporary tables to write, no lock held on the database. SQLite
        has one writer at a time whatever ``serial`` says."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.execute("COMMIT")
        finally:
            self._depth = 0

    @contextmanager
    def rolled_back(self) -> Iterator[None]:
        """Run a whole pipeline and then forget it: what --dry-run and --to use."""
        self.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        finally:
            self.db.execute("ROLLBACK")
            self._depth = 0

    def execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        """Run one statement; a locked or broken database is a StoreError that says so."""
        try:
            return self.db.execute(sql, tuple(args))
        except sqlite3.OperationalError as exc:
            raise self._error(exc) from None

    def _error(self, exc: sqlite3.OperationalError) -> StoreError:
        hint = "another newsletter process may hold it; try again" if "locked" in str(exc) else ""
        return StoreError(f"{self.path}: {exc}", hint=hint)
