"""Several `newsletter run` daemons on one PostgreSQL, as real processes: a due time fires once
across them, they share an issue's sending, and nothing is lost when one dies, freezes, or
the database restarts under them.

The daemons all run on this host, so a killed one's batches are reaped as soon as its pid is
seen gone; a frozen one (SIGSTOP) is alive by its pid, so only its lease running out (by the
database's clock) gives its batches to the others. Every test is bounded in time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import Daemon, FeedServer, Mailbox, Project, Route, item, rss
from newsletter.store import Store
from pg import Cluster

pytestmark = pytest.mark.timeout(150)


def fleet(
    project: Project,
    database: str,
    feed_server: FeedServer,
    port: int,
    readers: int,
    *,
    when: str = "every 5 seconds",
    lease: str = "30s",
    size: int = 100,
) -> list[str]:
    """A project on ``database`` whose digest is due ``when``; its readers' addresses."""
    if "/feed.xml" not in feed_server.routes:
        feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    addresses = [f"r{i:04d}@example.com" for i in range(readers)]
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        subscribers=addresses,
        fetch_extra="  interval: 1s\n",
        extra_schedule=f"    when: {when}\n",
    )
    text = project.config.read_text()
    text = text.replace("database: sqlite:///state.db", f"database: {database}")
    batches = f"batches:\n  size: {size}\n  lease: {lease}\n  join_every: 1s\n"
    project.config.write_text(text.replace("senders:", batches + "senders:", 1))
    return addresses


def start(project: Project, daemons: list[Daemon], n: int) -> list[Daemon]:
    started = [Daemon(project) for _ in range(n)]
    daemons.extend(started)
    for d in started:
        d.wait_for(lambda d=d: "event=scheduled" in d.log, why="start-up")  # type: ignore[misc]
    return started


def wait(what: object, timeout: float, why: str, fleet: list[Daemon]) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {why}:\n" + "\n----\n".join(
            d.log[-3000:] for d in fleet
        )
        time.sleep(0.05)


def issues(database: str) -> list[int]:
    with Store(database) as store:
        return [i.number for i in store.issues("weekly", limit=100)]


def test_three_daemons_share_an_issue_and_the_two_left_finish_when_one_is_killed(
    project: Project,
    pg_database: str,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
) -> None:
    box, port = smtp_server
    addresses = fleet(project, pg_database, feed_server, port, 1500)
    three = start(project, daemons, 3)
    wait(lambda: len(box.messages) >= 500, 60, "a third to be sent", three)
    three[0].kill()  # SIGKILL, mid-send: up to 10 messages on its connections go unanswered
    wait(lambda: len(box.by_recipient()) == len(addresses), 60, "every reader", three)
    time.sleep(1)  # anything sent twice would arrive now
    counts = box.by_recipient()
    assert set(counts) == set(addresses)
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= 10, f"{duplicates} duplicates for one kill of 10 connections"
    assert issues(pg_database) == [1]
    # The survivors took part (joining, or building and sending), and the issue was built once.
    for d in three[1:]:
        assert "schedule=weekly issue=1 " in d.log, d.log
    assert sum("event=fired-elsewhere" in d.log for d in three) >= 1
    for d in three[1:]:
        assert d.terminate() == 0


def test_daemons_due_at_the_same_times_build_one_issue_per_due_time(
    project: Project,
    pg_database: str,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
) -> None:
    box, port = smtp_server
    posts = [item(1)]
    feed_server.routes["/feed.xml"] = Route(rss(posts))
    addresses = fleet(project, pg_database, feed_server, port, 3, when="every 2 seconds")
    stop = threading.Event()

    def publish() -> None:  # a new post twice a second: every due time has something new
        while not stop.wait(0.5):
            posts.append(item(len(posts) + 1))
            feed_server.routes["/feed.xml"] = Route(rss(list(posts)))

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        three = start(project, daemons, 3)
        began = time.monotonic()
        wait(lambda: len(issues(pg_database)) >= 4, 40, "four issues", three)
        took = time.monotonic() - began
    finally:
        stop.set()
        publisher.join()
    for d in three:
        assert d.terminate() == 0
    built = issues(pg_database)
    # One issue per due time at most (a due time every 2 s, something new at each): three
    # daemons building each would make up to three times as many.
    assert len(built) <= took / 2 + 2, f"{len(built)} issues in {took:.1f} s"
    assert sorted(built) == list(range(1, len(built) + 1))
    assert sum(d.log.count("event=fired-elsewhere") for d in three) >= 1  # they did race
    counts = box.by_recipient()
    assert max(counts.values()) <= len(built) and set(counts) == set(addresses)


def test_a_daemon_frozen_past_its_lease_sends_nothing_the_other_took_over(
    project: Project,
    pg_database: str,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
) -> None:
    box, port = smtp_server
    box.data_delay = 0.02  # slow enough that both daemons hold batches for a while
    addresses = fleet(project, pg_database, feed_server, port, 2000, lease="3s", size=50)
    two = start(project, daemons, 2)

    def holders() -> set[int]:
        with Store(pg_database) as store:
            return {b.pid for b in store.batches()}

    wait(lambda: len(holders()) == 2, 60, "both daemons to hold batches", two)
    frozen = two[0]
    stopped = time.monotonic()
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        # Its lease runs out (3 s), and a transaction it was frozen in is ended by the server
        # (15 s): the other daemon reaps its batches and sends them, all while it is frozen.
        wait(lambda: len(box.by_recipient()) == len(addresses), 90, "the other daemon to send all", two)
        assert frozen.proc.pid not in holders()
    finally:
        thawed = time.monotonic()
        frozen.proc.send_signal(signal.SIGCONT)
    # What the thawed one had queued or half-sent would go now: it must not, and says so.
    frozen.wait_for(
        lambda: "event=lease-lost" in frozen.log or "event=job-error" in frozen.log, 60, "its word"
    )
    time.sleep(1)
    counts = box.by_recipient()
    duplicates = sum(n - 1 for n in counts.values())
    # At most the messages on its 10 connections whose end of data had gone when it froze.
    assert duplicates <= 10, f"{duplicates} duplicates\n" + copies(box, stopped, thawed, two)
    assert set(counts) == set(addresses)
    with Store(pg_database) as store:
        counts_now = store.delivery_counts(store.issues("weekly")[0].id)
    assert (counts_now.sent, counts_now.pending) == (len(addresses), 0)
    for d in two:
        assert d.proc.poll() is None, d.log
        assert d.terminate() == 0


def copies(box: Mailbox, stopped: float, thawed: float, fleet: list[Daemon]) -> str:
    """Each address sent more than once: when each copy came (seconds from the SIGSTOP; the
    SIGCONT came at ``thawed``) and from which client port; then the daemons' logs."""
    seen: dict[str, list[str]] = {}
    with box.lock:
        for (_, rcpts, _), (at, port) in zip(box.messages, box.arrivals, strict=True):
            for r in rcpts:
                seen.setdefault(r.lower(), []).append(f"{at - stopped:+.2f}s:{port}")
    lines = [f"SIGCONT at {thawed - stopped:+.2f}s"]
    lines += [f"{r} {' '.join(c)}" for r, c in sorted(seen.items()) if len(c) > 1]
    return "\n".join(lines) + "\n" + "\n----\n".join(d.log[-4000:] for d in fleet)


@contextmanager
def restarted(cluster: Cluster, down: float) -> Iterator[None]:
    cluster.restart(down)
    yield


def test_daemons_carry_on_after_postgresql_restarts_mid_send(
    project: Project,
    pg_cluster: Cluster,
    pg_database: str,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
) -> None:
    box, port = smtp_server
    box.data_delay = 0.005
    addresses = fleet(project, pg_database, feed_server, port, 1000, lease="5s")
    two = start(project, daemons, 2)
    wait(lambda: len(box.messages) >= 200, 60, "the send to start", two)
    pg_cluster.restart(down=2)
    wait(lambda: len(box.by_recipient()) == len(addresses), 90, "every reader", two)
    time.sleep(1)
    counts = box.by_recipient()
    duplicates = sum(n - 1 for n in counts.values())
    # Whatever was on the wire when the database went: 10 connections a daemon.
    assert duplicates <= 20, f"{duplicates} duplicates"
    assert any("event=job-error" in d.log for d in two), "the restart was not even noticed"
    for d in two:
        assert d.proc.poll() is None, d.log
    with Store(pg_database) as store:
        issue = store.issues("weekly")[0]
        assert store.delivery_counts(issue.id).pending == 0
    for d in two:
        assert d.terminate() == 0
