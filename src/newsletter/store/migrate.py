"""Numbered schema migrations: ``migrations/<backend>/NNNN_name.sql``, applied in order at open.

Each backend keeps its own SQL under the same numbers, so migration 3 means the same change
in SQLite and in PostgreSQL. What a database has applied is in its ``schema_migrations``
table; a migration and its row are committed together, so a crash halfway leaves the
database at the previous number, not between two.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ..model import now

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


def _has_tables(db: sqlite3.Connection) -> bool:
    """Whether the database held our tables before any migration was recorded in it."""
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feeds'").fetchone()
        is not None
    )
