"""`newsletter run` as a real process: schedules fire, signals stop it cleanly, locks hold."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

from conftest import Daemon, FeedServer, Mailbox, Project, Route, item, rss
from newsletter.config import load_config
from newsletter.store import Store


def start_slow_send(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    daemons: list[Daemon],
    count: int,
) -> tuple[Daemon, list[str]]:
    """A daemon sending one issue every 2 s to ``count`` readers through a slowish server."""
    box, port = smtp_server
    box.data_delay = 0.02
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    addresses = [f"r{i:03d}@example.com" for i in range(count)]
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        subscribers=addresses,
        fetch_extra="  interval: 1s\n",
        extra_schedule="    when: every 2 seconds\n",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    return daemon, addresses


def test_digests_arrive_new_entries_follow_and_sigterm_exits_0(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        fetch_extra="  interval: 1s\n",
        extra_schedule="    when: every 2 seconds\n",
    )
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: len(box.messages) >= 3, why="the first digest")
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}

    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2), item(3)]))
    daemon.wait_for(lambda: len(box.messages) >= 6, why="the digest of the new entry")
    second = [m for m in box.parsed() if "#2" in str(m["Subject"])]
    assert len(second) == 3
    for m in second:
        text = m.get_body(("plain",)).get_content()
        assert "Post 3" in text and "Post 2\n" not in text

    assert daemon.terminate() == 0
    assert "event=stop" in daemon.log and "schedule=weekly issue=2 sent=3 pending=0 failed=0" in daemon.log
    assert box.by_recipient() == {"ann@example.com": 2, "bob@example.com": 2, "cy@example.com": 2}


def test_sigterm_mid_send_stops_between_messages_and_the_rest_is_sent_later(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, _ = smtp_server
    daemon, addresses = start_slow_send(project, feed_server, smtp_server, daemons, 200)
    daemon.wait_for(lambda: len(box.messages) >= 20, why="the send to start")
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 10
    stopped_at = len(box.messages)
    assert stopped_at < 200, "the send finished before the signal; nothing was tested"
    assert "stopped; undelivered messages stay pending" in daemon.log

    status = project.run_process("status")
    assert f"deliveries waiting for a retry: {200 - stopped_at}" in status.stdout

    rest = project.run_process("send-digest", "weekly")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert box.by_recipient() == {a: 1 for a in addresses}


def _state_with_a_missed_run(project: Project, feed_server: FeedServer, port: int, grace: str) -> None:
    """A daily schedule whose fire time passed an hour ago while no daemon ran."""
    fire = datetime.now(UTC) - timedelta(hours=1)
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup(
        [feed_server.url("/feed.xml")],
        smtp_port=port,
        extra_schedule=f"    when: daily at {fire:%H:%M}\n    misfire_grace: {grace}\n",
    )
    assert project.run_process("fetch").returncode == 0
    store = Store(load_config(project.config).database_url)
    store.set_last_run("weekly", fire - timedelta(days=1) + timedelta(minutes=1))
    store.close()


def test_a_missed_run_within_grace_is_sent_once_at_start_up(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    _state_with_a_missed_run(project, feed_server, port, "3h")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: len(box.messages) >= 3, why="the caught-up digest")
    daemon.wait_for(lambda: "event=digest schedule=weekly issue=1" in daemon.log, why="the digest log line")
    assert "event=catch-up" in daemon.log
    assert daemon.terminate() == 0

    again = Daemon(project)
    daemons.append(again)
    again.wait_for(lambda: "next digest at" in again.log, why="start-up")
    time.sleep(1)  # give a wrongly scheduled catch-up the chance to show itself
    assert again.terminate() == 0
    assert "event=catch-up" not in again.log
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1}


def test_a_missed_run_older_than_grace_is_skipped_and_logged(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, port = smtp_server
    _state_with_a_missed_run(project, feed_server, port, "30m")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "next digest at" in daemon.log, why="start-up")
    time.sleep(1)
    assert daemon.terminate() == 0
    assert "event=missed schedule=weekly skipped the digest due at" in daemon.log
    assert box.messages == []


def test_send_digest_by_hand_while_the_daemon_sends_never_doubles_a_copy(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    box, _ = smtp_server
    daemon, addresses = start_slow_send(project, feed_server, smtp_server, daemons, 150)
    daemon.wait_for(lambda: len(box.messages) >= 10, why="the daemon's send to start")

    busy = project.run_process("send-digest", "weekly")
    assert busy.returncode == 1
    assert "'weekly' is being sent by another process" in busy.stderr and "Traceback" not in busy.stderr

    waited = project.run_process("send-digest", "weekly", "--wait", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "nothing new" in waited.stdout
    assert daemon.terminate() == 0
    assert box.by_recipient() == {a: 1 for a in addresses}


def test_sighup_with_a_bad_config_keeps_the_old_one(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int], daemons: list[Daemon]
) -> None:
    _box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port, extra_schedule="    when: daily at 08:00\n")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: "next digest at" in daemon.log, why="start-up")
    good = project.config.read_text()
    project.config.write_text(good.replace("daily at 08:00", "dialy at 08:00"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda: "kept the old configuration" in daemon.log, why="the reload")
    assert "schedules.weekly.when: cannot read 'dialy at 08:00'" in daemon.log
    project.config.write_text(good.replace("daily at 08:00", "weekly on monday at 09:00"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda: "configuration reloaded" in daemon.log, why="the second reload")
    assert daemon.terminate() == 0
    assert daemon.log.count("next digest at") == 2
