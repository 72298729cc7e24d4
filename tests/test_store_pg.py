"""What only the PostgreSQL store has: migrations applied when asked and safe to run twice at
once, the write lock across connections, and errors that name the server but never a password.
The store's behaviour itself is tested on both backends in test_store.py and test_store_usage.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Project, free_port
from newsletter.errors import StoreError
from newsletter.store import Migrated, Store, migrate_database
from newsletter.store.migrate import MIGRATION_LOCK, load
from pg import Cluster

ALL = [f"{m.number:04d}_{m.name}" for m in load("postgres")]


def versions(cluster: Cluster, url: str) -> list[int]:
    import psycopg

    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(
        host="127.0.0.1", port=cluster.port, user="postgres", password=cluster.password, dbname=dbname
    ) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def wait_until(what: Callable[[], bool], why: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        time.sleep(0.02)


# -- migrations ----------------------------------------------------------------------------------


def test_a_new_database_is_refused_until_migrated_then_migrating_again_applies_nothing(
    pg_cluster: Cluster, pg_empty: str
) -> None:
    with Store(pg_empty) as store:
        assert store.pending_migrations() == ALL  # type: ignore[attr-defined]
        with pytest.raises(StoreError, match="lacks migration") as caught:
            store.meta("anything")
        assert "newsletter db migrate" in caught.value.hint
    first = migrate_database(pg_empty)
    assert first.applied == ALL and first.version == len(ALL)
    assert versions(pg_cluster, pg_empty) == list(range(1, len(ALL) + 1))
    assert migrate_database(pg_empty).applied == []
    assert versions(pg_cluster, pg_empty) == list(range(1, len(ALL) + 1))
    with Store(pg_empty) as store:
        assert store.pending_migrations() == []  # type: ignore[attr-defined]
        store.set_meta("k", "v")
        assert store.meta("k") == "v"


def test_two_migrators_at_once_apply_each_migration_once(pg_cluster: Cluster, pg_empty: str) -> None:
    import psycopg

    dbname = pg_empty.rsplit("/", 1)[1]
    results: list[Migrated | BaseException] = []

    def migrate() -> None:
        try:
            results.append(migrate_database(pg_empty, busy_timeout=30))
        except BaseException as exc:
            results.append(exc)

    # Hold the migration lock so both migrators are queued behind it, then let them race.
    with psycopg.connect(
        host="127.0.0.1", port=pg_cluster.port, user="postgres", password=pg_cluster.password, dbname=dbname
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        threads = [threading.Thread(target=migrate) for _ in range(2)]
        for t in threads:
            t.start()

        def waiting() -> bool:
            row = holder.execute(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            return row is not None and row[0] == 2

        wait_until(waiting, "both migrators to wait for the migration lock")
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        for t in threads:
            t.join(timeout=60)
    assert all(isinstance(r, Migrated) for r in results), results
    applied = [name for r in results if isinstance(r, Migrated) for name in r.applied]
    assert sorted(applied) == ALL  # each once, whichever of the two applied it
    assert versions(pg_cluster, pg_empty) == list(range(1, len(ALL) + 1))


def test_a_database_from_a_newer_version_is_refused(pg_cluster: Cluster, pg_database: str) -> None:
    with Store(pg_database) as store:
        store.execute("INSERT INTO schema_migrations VALUES (999, 'future', '2030-01-01')")
    for attempt in (lambda: Store(pg_database), lambda: migrate_database(pg_database)):
        with pytest.raises(StoreError, match="schema 999") as caught:
            attempt()
        assert "upgrade" in caught.value.hint


# -- transactions across connections -------------------------------------------------------------


def test_a_write_transaction_holds_off_another_connections_writer_until_it_ends(pg_database: str) -> None:
    with Store(pg_database) as first, Store(pg_database, busy_timeout=0.2) as second:
        with first.transaction():
            assert first.acquire_lock("schedule:w", "first", 60) is None
            # The second taker cannot read the lock row before the first has committed it.
            with pytest.raises(StoreError) as caught:
                second.acquire_lock("schedule:w", "second", 60)
            assert "another newsletter process" in caught.value.hint
        assert second.acquire_lock("schedule:w", "second", 60) == "first"
        # Outside a transaction a statement commits at once: the other connection sees it.
        second.set_meta("seen", "yes")
        assert first.meta("seen") == "yes"


def test_rolled_back_forgets_everything_and_a_failed_transaction_leaves_no_trace(pg_database: str) -> None:
    with Store(pg_database) as store:
        with store.rolled_back():
            store.set_meta("dry", "run")
            store.create_issue("weekly", watermark=0, entry_ids=[], subject="s", payload={}, list_name=None)
        assert store.meta("dry") is None and store.issues("weekly") == []
        with pytest.raises(RuntimeError), store.transaction():
            store.set_meta("half", "done")
            raise RuntimeError("stop")
        assert store.meta("half") is None
        store.set_meta("after", "ok")  # the connection is usable again
        assert store.meta("after") == "ok"


# -- errors name the server, never the password ----------------------------------------------------


def test_a_wrong_password_names_the_server_and_not_the_password(
    pg_cluster: Cluster, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "wrong-secret-123")
    with pytest.raises(StoreError) as caught:
        Store(pg_database)
    said = caught.value.with_hint()
    assert f"127.0.0.1:{pg_cluster.port}" in said and "PGPASSWORD" in caught.value.hint
    assert "wrong-secret-123" not in said and pg_cluster.password not in said


def test_an_unreachable_server_names_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "secret-456")
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}") as caught:
        Store(f"postgresql://news@127.0.0.1:{port}/news", busy_timeout=2)
    assert f"PostgreSQL runs at 127.0.0.1:{port}" in caught.value.hint
    assert "secret-456" not in caught.value.with_hint()


def test_a_password_in_the_url_is_refused_and_not_repeated(pg_cluster: Cluster) -> None:
    with pytest.raises(StoreError, match="holds a password") as caught:
        Store(f"postgresql://postgres:hunter2@127.0.0.1:{pg_cluster.port}/postgres")
    assert "hunter2" not in caught.value.with_hint() and "PGPASSWORD" in caught.value.hint


def test_a_sqlite_run_does_not_load_psycopg(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    code = (
        "import json, sys\n"
        "from newsletter.store import Store, migrate_database\n"
        f"Store({url!r}).close()\n"
        f"migrate_database({url!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []


# -- the commands ----------------------------------------------------------------------------------


def use_database(project: Project, url: str) -> None:
    text = project.config.read_text(encoding="utf-8")
    project.config.write_text(
        text.replace("database: sqlite:///state.db", f"database: {url}"), encoding="utf-8"
    )


def test_db_migrate_and_check_on_a_new_postgresql_database(project: Project, pg_empty: str) -> None:
    project.setup(["https://blog.test/feed.xml"])
    use_database(project, pg_empty)
    # The terminal blanks a URL's user part, as any credential-looking text.
    where = pg_empty.replace("//postgres@", "//***@")
    check = project.run_in_process("check")
    assert check.returncode == 1
    assert f"error: {where}: {len(ALL)} migration(s) to apply: {', '.join(ALL)}" in check.stderr
    assert "hint: run `newsletter db migrate`" in check.stderr

    first = project.run_in_process("db", "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [*(f"applied {n}" for n in ALL), f"{where}: schema {len(ALL)}"]
    again = project.run_in_process("db", "migrate")
    assert again.stdout.splitlines() == [f"{where}: schema {len(ALL)}, nothing to apply"]

    check = project.run_in_process("check")
    assert check.returncode == 0, check.stderr
    assert "weekly: 3 subscriber(s)" in check.stdout and "1 schedule(s) OK" in check.stdout


def test_db_migrate_on_sqlite_says_what_opening_applied(project: Project) -> None:
    project.setup(["https://blog.test/feed.xml"])
    first = project.run_in_process("db", "migrate")
    assert first.returncode == 0, first.stderr
    where = f"sqlite:///{project.root.resolve() / 'state.db'}".removeprefix("sqlite:///")
    assert first.stdout.splitlines() == [*(f"applied {n}" for n in ALL), f"{where}: schema {len(ALL)}"]
    assert project.run_in_process("db", "migrate").stdout.splitlines() == [
        f"{where}: schema {len(ALL)}, nothing to apply"
    ]
