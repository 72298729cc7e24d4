"""Numbered schema migrations: ``migrations/<backend>/NNNN_name.sql``, applied in order at open.

Each backend keeps its own SQL under the same numbers, so migration 3 means the same change
in SQLite and in PostgreSQL. What a database has applied is in its ``schema_migrations``
table; a migration and its row are committed together, so a crash halfway leaves the
database at the previous number, not between two.

SQLite applies them at open. PostgreSQL, shared by several machines, applies them only when
asked (``newsletter db migrate``): each in its own transaction, behind an advisory lock, so
two machines migrating at once apply each migration once.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from ..model import now

if TYPE_CHECKING:
    import psycopg

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


@functools.cache  # every open checks them: read the files once per process
def load(backend: str) -> tuple[Migration, ...]:
    """The backend's migrations in order; their numbers run 1, 2, 3... without a gap."""
    found = []
    for path in sorted((MIGRATIONS_DIR / backend).glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise StoreError(f"{path}: a migration is named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    if [m.number for m in found] != list(range(1, len(found) + 1)):
        raise StoreError(f"{MIGRATIONS_DIR / backend}: migrations must be numbered 1, 2, 3... without a gap")
    return tuple(found)


def statements(script: str, where: str = "migration") -> Iterator[str]:
    """The SQL statements of a script, one at a time (comments and blank lines dropped)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise StoreError(f"{where} ends inside a statement: {pending.strip()[:60]!r}")


# Databases made before numbered migrations had no schema_migrations table: every open ran
# the whole schema with IF NOT EXISTS, then added feeds.ttl if it was missing. 0001 is written
# to run again on those; a later step whose change such a database already has is recorded
# as applied without running. Keyed by migration number.
_ALREADY_THERE: dict[int, Callable[[sqlite3.Connection], bool]] = {
    2: lambda db: "ttl" in {r[1] for r in db.execute("PRAGMA table_info(feeds)")},
}


def _applied(db: sqlite3.Connection) -> int:
    try:
        return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
    except sqlite3.OperationalError:  # no such table: a new database, or one made before migrations
        return 0


def migrate_sqlite(db: sqlite3.Connection, path: str) -> None:
    """Bring ``db`` (autocommit mode) up to the newest migration; a no-op, one query, if it is."""
    migrations = load("sqlite")
    newest = migrations[-1].number
    if (version := _applied(db)) == newest:
        return
    if version > newest:
        raise StoreError(
            f"{path}: the state database is at schema {version}, this version knows up to {newest}",
            hint="it was written by a newer newsletter: upgrade this one",
        )
    # One write transaction for all of them: two processes starting at once apply each once.
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(TABLE)
        version = _applied(db)
        legacy = version == 0 and _has_tables(db)
        for m in migrations[version:]:
            if not (legacy and m.number in _ALREADY_THERE and _ALREADY_THERE[m.number](db)):
                where = f"migration {m.number:04d}_{m.name}"
                for statement in statements(m.sql, where):
                    try:
                        db.execute(statement)
                    except sqlite3.Error as exc:
                        raise StoreError(f"{path}: {where}: {exc}") from None
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (m.number, m.name, now().isoformat(timespec="seconds")),
            )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def applied_sqlite(url: str) -> int:
    """The newest migration the SQLite file at ``url`` has, read without creating or changing
    it; 0 when there is no such file yet."""
    path = Path(url.removeprefix("sqlite:///"))
    if url.endswith(":memory:") or not path.is_file():
        return 0
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return _applied(db)
    finally:
        db.close()


def _has_tables(db: sqlite3.Connection) -> bool:
    """Whether the database held our tables before any migration was recorded in it."""
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feeds'").fetchone()
        is not None
    )


# -- PostgreSQL ------------------------------------------------------------------------------

# pg_advisory_xact_lock key for migrating: a fixed number, the same in every process. Advisory
# locks belong to one database, so two databases on one server do not wait for each other.
MIGRATION_LOCK = 0x6E6C_6D69  # "nlmi"


def applied_postgres(conn: psycopg.Connection[Any]) -> int:
    """The newest migration the database has recorded; 0 for a new one."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not _first(row):
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(_first(row)) if row else 0


def pending_postgres(conn: psycopg.Connection[Any], where: str) -> list[Migration]:
    """The migrations the database does not have yet, in order; refused if it is newer."""
    migrations = load("postgres")
    version = applied_postgres(conn)
    _not_newer(version, migrations, where)
    return list(migrations[version:])


def migrate_postgres(conn: psycopg.Connection[Any], where: str) -> list[Migration]:
    """Apply what the database lacks on ``conn`` (autocommit mode); return what was applied.

    One transaction per migration, each first taking the migration lock and reading the
    version again under it: a second migrator waits, then finds the work done."""
    migrations = load("postgres")
    done: list[Migration] = []
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(TABLE)
            version = applied_postgres(conn)
            _not_newer(version, migrations, where)
            if version == len(migrations):
                return done
            m = migrations[version]
            try:
                # The whole file in one call: without parameters PostgreSQL takes several
                # statements at once, and they are all in this transaction.
                conn.execute(m.sql)
            except Exception as exc:
                raise StoreError(f"{where}: migration {m.number:04d}_{m.name}: {_one_line(exc)}") from None
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (m.number, m.name, now().isoformat(timespec="seconds")),
            )
        done.append(m)


def _not_newer(version: int, migrations: tuple[Migration, ...], where: str) -> None:
    if version > len(migrations):
        raise StoreError(
            f"{where}: the state database is at schema {version}, this version knows up to {len(migrations)}",
            hint="it was written by a newer newsletter: upgrade this one",
        )


def _first(row: Any) -> Any:
    # Rows come as dicts or tuples depending on the connection's row factory.
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
