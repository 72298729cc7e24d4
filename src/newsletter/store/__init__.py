"""The state database: feeds, entries, issues, the delivery ledger, lists, posts, locks.

``Store(url, busy_timeout=...)`` opens it. SQLite is the one backend so far (``sqlite:///path``);
what any backend must offer is ``newsletter.storage.Storage``, its schema changes are the
numbered files under ``migrations/<backend>/``, and its rows are ``newsletter.model`` types.
Importing this loads sqlite3 and the model, nothing of the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sqlite import SQLiteStore

# What the pipeline constructs. A PostgreSQL backend (next) gets picked here by URL scheme.
Store = SQLiteStore

if TYPE_CHECKING:
    from ..storage import Storage

    def _implements(store: SQLiteStore) -> Storage:
        # mypy proves here, method by method, that the SQLite store is a Storage.
        return store


__all__ = ["SQLiteStore", "Store"]
