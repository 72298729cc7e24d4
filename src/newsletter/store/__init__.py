"""The state database: feeds, entries, issues, the delivery ledger, lists, posts, locks.

``Store(url, busy_timeout=...)`` opens the backend the URL names: ``sqlite:///path`` or
``postgresql://user@host:5432/db`` (the password from ``PGPASSWORD``, libpq's own variable, or
``~/.pgpass``; never in the URL). What any backend offers is ``newsletter.storage.Storage``,
its schema changes are the numbered files under ``migrations/<backend>/``, and its rows are
``newsletter.model`` types. Importing this loads sqlite3 and the model, nothing of the
pipeline; psycopg is loaded only when a PostgreSQL URL is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from ..storage import Storage
    from .postgres import PostgresStore

POSTGRES = ("postgresql://", "postgres://")


def open_store(url: str, busy_timeout: float = 30.0) -> Storage:
    """A new connection to the state database at ``url``; close it when done."""
    if url.lower().startswith(POSTGRES):
        return _postgres(url, busy_timeout)
    return SQLiteStore(url, busy_timeout=busy_timeout)


def _postgres(url: str, busy_timeout: float) -> PostgresStore:
    from .postgres import PostgresStore  # psycopg loads here, for PostgreSQL users only

    return PostgresStore(url, busy_timeout=busy_timeout)


@dataclass(frozen=True)
class Migrated:
    where: str  # the database, as messages name it (no password)
    applied: list[str]  # NNNN_name of each migration applied now, in order
    version: int  # the schema the database is at now


def migrate_database(url: str, busy_timeout: float = 30.0) -> Migrated:
    """Apply the migrations the database at ``url`` lacks; say which."""
    from .migrate import applied_sqlite, load

    if url.lower().startswith(POSTGRES):
        with _postgres(url, busy_timeout) as pg:
            done = pg.migrate()
            return Migrated(pg.path, [f"{m.number:04d}_{m.name}" for m in done], len(load("postgres")))
    # SQLite migrates as it opens: what it lacked is what it had before against what it has now.
    before = applied_sqlite(url)
    with SQLiteStore(url, busy_timeout=busy_timeout) as lite:
        migrations = load("sqlite")
        return Migrated(lite.path, [f"{m.number:04d}_{m.name}" for m in migrations[before:]], len(migrations))


if TYPE_CHECKING:
    # What callers annotate with and call. Typed as the SQLite store, whose methods are the
    # Storage ones every backend has; open_store() is typed as what it is, a Storage.
    Store = SQLiteStore

    def _implements(store: SQLiteStore, pg: PostgresStore) -> tuple[Storage, Storage]:
        # mypy proves here, method by method, that both stores are a Storage.
        return store, pg

else:

    class Store:
        """Opens the backend the URL names: ``Store(url, busy_timeout=...)``."""

        def __new__(cls, url: str, busy_timeout: float = 30.0) -> Storage:
            return open_store(url, busy_timeout)


__all__ = ["Migrated", "SQLiteStore", "Store", "migrate_database", "open_store"]
