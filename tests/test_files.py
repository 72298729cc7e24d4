"""What the tool creates is private: files 0600, folders 0700, whatever the user's umask.

The state database holds every address and the unsubscribe secret; the outbox and the dry
run hold whole messages with working unsubscribe links. Other local users must not read them.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Project, item, rss
from newsletter import digest
from newsletter.config import load_config
from newsletter.context import RunContext
from newsletter.preview import export_archive
from newsletter.store import Store

LOOSE = 0o022  # the usual default: everything created is readable by every local user


def snapshot(root: Path) -> set[Path]:
    return {root, *root.rglob("*")}


def offenders(root: Path, before: set[Path]) -> list[str]:
    """Everything under ``root`` created since ``before`` whose mode is not private."""
    bad = []
    for path in sorted(snapshot(root) - before):
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            bad.append(f"{path.relative_to(root)}: {mode:o} (want {want:o})")
    return bad


def setup_project(project: Project) -> None:
    (project.root / "feed.xml").write_bytes(rss([item(1), item(2)]))
    project.setup(["feed.xml"])
    project.config.chmod(0o644)
    (project.root / "subscribers").chmod(0o755)


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "newsletter", "--config", str(project.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project.root,
        umask=LOOSE,
        env={**os.environ, "NEWSLETTER_SECRET": "test-secret"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_cli_creates_only_private_files_under_a_loose_umask(project: Project) -> None:
    setup_project(project)
    before = snapshot(project.root)
    cli(project, "send-digest", "weekly", "--dry-run")
    cli(project, "send-digest", "weekly")
    cli(project, "archive", "weekly", "--out", "site")
    cli(project, "subscribers", "export", "readers", "--out", "readers-export.csv")

    created = {p.relative_to(project.root).as_posix() for p in snapshot(project.root) - before}
    for expected in (
        "state.db",
        "outbox",
        "outbox/dry-run/weekly-1/ann@example.com.eml",
        "outbox/weekly-1/ann@example.com.eml",
        "site/index.html",
        "site/1.html",
        "readers-export.csv",
    ):
        assert expected in created, (expected, sorted(created))
    bad = offenders(project.root, before)
    assert not bad, "readable by others:\n" + "\n".join(bad)
    # What the user made keeps the mode the user gave it.
    assert stat.S_IMODE(project.config.stat().st_mode) == 0o644
    assert stat.S_IMODE((project.root / "subscribers").stat().st_mode) == 0o755


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(LOOSE)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_library_is_private_too_for_a_caller_with_a_loose_umask(
    project: Project, loose_umask: None
) -> None:
    setup_project(project)
    user_site = project.root / "site"
    user_site.mkdir()  # made by the user, published by their web server: left as it is
    before = snapshot(project.root)
    config = load_config(project.config)
    with Store(config.database_url) as store:
        ctx = RunContext(config, store)
        digest.send_digest(ctx, "weekly", dry_run=True)
        digest.send_digest(ctx, "weekly")
        export_archive(ctx, "weekly", user_site)
        export_archive(ctx, "weekly", project.root / "new" / "archive")
        # While a connection is open SQLite keeps its -wal and -shm files next to the database.
        db = Path(config.database_url.removeprefix("sqlite:///"))
        side_files = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side_files), list(db.parent.iterdir())
        bad = offenders(project.root, before)
        assert not bad, "readable by others:\n" + "\n".join(bad)
    assert (project.root / "outbox" / "dry-run" / "weekly-1" / "bob@example.com.eml").is_file()
    assert (project.root / "new" / "archive" / "1.html").is_file()
    assert stat.S_IMODE(user_site.stat().st_mode) == 0o755


def test_a_rewritten_file_loses_the_loose_mode_it_had(tmp_path: Path) -> None:
    from newsletter.files import write_private

    # An .eml or archive page written by an older version (0644) is replaced, not kept.
    page = tmp_path / "1.html"
    page.write_text("old")
    page.chmod(0o644)
    (tmp_path / "1.html.tmp").write_text("left by a killed run")
    (tmp_path / "1.html.tmp").chmod(0o666)
    write_private(page, b"new")
    assert page.read_bytes() == b"new"
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert not (tmp_path / "1.html.tmp").exists()
