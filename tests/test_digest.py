"""The whole path, for real: feeds over HTTP on 127.0.0.1, mail to aiosmtpd on 127.0.0.1."""

from __future__ import annotations

import pytest

from conftest import FeedServer, Mailbox, Project, Route, item, rss
from newsletter.config import load_config
from newsletter.store import Store


def _bodies(box: Mailbox) -> list[str]:
    return [m.get_body(("plain",)).get_content() for m in box.parsed()]


def test_three_subscribers_one_digest_each_then_only_the_new_entry(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    items = [item(1), item(2), item(3)]
    feed_server.routes["/feed.xml"] = Route(rss(items))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)

    first = project.run("send-digest", "weekly")
    assert first.exit_code == 0, first.output
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1}
    for body in _bodies(box):
        assert all(f"Post {n}" in body for n in (1, 2, 3))

    second = project.run("send-digest", "weekly")
    assert second.exit_code == 0, second.output
    assert "nothing new" in second.output
    assert len(box.messages) == 3

    feed_server.routes["/feed.xml"] = Route(rss([*items, item(4)]))
    third = project.run("send-digest", "weekly")
    assert third.exit_code == 0, third.output
    assert box.by_recipient() == {"ann@example.com": 2, "bob@example.com": 2, "cy@example.com": 2}
    newest = _bodies(box)[3:]
    assert len(newest) == 3
    for body in newest:
        assert "Post 4" in body
        assert not any(f"Post {n}\n" in body for n in (1, 2, 3))


def test_each_message_is_addressed_to_its_own_subscriber(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    assert project.run("send-digest", "weekly").exit_code == 0
    for mail_from, rcpts, _raw in box.messages:
        assert mail_from == "news@example.net"
        msg = next(m for m in box.parsed() if rcpts[0] in str(m["To"]))
        assert rcpts[0] in msg.get_body(("plain",)).get_content()
        assert rcpts[0] in msg.get_body(("html",)).get_content()


def test_451_stays_pending_550_fails_and_the_next_run_sends_only_the_451(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {
        "bob@example.com": "451 4.7.1 Greylisted, try again later",
        "cy@example.com": "550 5.1.1 No such user",
    }
    first = project.run("send-digest", "weekly")
    assert first.exit_code == 1
    assert box.by_recipient() == {"ann@example.com": 1}
    assert "550 5.1.1 No such user" in first.output
    assert "451 4.7.1" in first.output
    assert "pending 1, failed 1" in first.output

    box.rcpt_replies = {}
    second = project.run("send-digest", "weekly")
    assert second.exit_code == 1  # the 550 stays failed; it is reported, not retried
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1}

    status = project.run("status", "weekly")
    assert "sent 2, pending 0, failed 1" in status.output


def test_a_join_leaves_deferred_deliveries_to_the_retry_and_opens_no_connection_for_them(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    from newsletter.context import RunContext
    from newsletter.digest import send_digest

    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {"bob@example.com": "451 4.7.1 Greylisted, try again later"}
    assert project.run("send-digest", "weekly").exit_code == 1
    box.rcpt_replies, before = {}, box.sessions
    config = load_config(project.config)
    # A daemon's join job, every few seconds: nothing never tried is left, so no connection.
    with RunContext.open(config) as ctx:
        joined = send_digest(ctx, "weekly", build=False, join=True)
    assert box.sessions == before and [i.sent_here for i in joined.issues] == [0]
    # The retry job does send it.
    with RunContext.open(config) as ctx:
        retried = send_digest(ctx, "weekly", build=False)
    assert [i.sent_here for i in retried.issues] == [1] and box.sessions > before
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1}


def test_a_list_longer_than_a_page_with_edits_and_unsubscribes_between_runs(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    # Deliveries are read a page (500) at a time: everyone on 1,201 rows gets exactly one copy.
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    rows = [f"r{n:04}@example.com,Reader {n}" for n in range(1201)]
    project.setup([feed_server.url("/feed.xml")], smtp_port=port, subscribers=rows)
    # Greylisted at the first try: these stay pending for the next run.
    box.rcpt_replies = {f"r{n:04}@example.com": "451 4.7.1 Try later" for n in (3, 600, 1200)}
    first = project.run("send-digest", "weekly")
    assert first.exit_code == 1
    assert "sent 1198, pending 3, failed 0" in first.output
    assert set(box.by_recipient().values()) == {1} and len(box.by_recipient()) == 1198

    # Before the retry: r0003 leaves the file, r0600 unsubscribes, a new reader is added.
    project.write_subscribers([r for r in rows if not r.startswith("r0003@")] + ["new@example.com,New"])
    assert project.run("subscribers", "list", "readers").exit_code == 0
    with Store(load_config(project.config).database_url) as store:
        store.suppress("readers", "r0600@example.com", "page")
    box.rcpt_replies = {}
    second = project.run("send-digest", "weekly")
    assert second.exit_code == 0, second.output
    got = box.by_recipient()
    assert got["r1200@example.com"] == 1
    assert "r0003@example.com" not in got and "r0600@example.com" not in got
    assert "new@example.com" not in got  # joined after issue #1 was built
    assert "sent 1199, pending 0, failed 0" in project.run("status", "weekly").output


def test_a_feed_that_is_down_does_not_stop_the_others(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    feed_server.routes["/down.xml"] = Route(b"oops", status=500, content_type="text/plain")
    feed_server.routes["/broken.xml"] = Route(b"<rss><channel><item><title>unclosed")
    project.setup([feed_server.url(p) for p in ("/down.xml", "/broken.xml", "/good.xml")], smtp_port=port)
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 0, result.output
    assert "HTTP 500" in result.output
    assert "/broken.xml" in result.output and "not a feed" in result.output
    assert len(box.messages) == 3
    status = project.run("status")
    assert "error (1 in a row)" in status.output


def test_unfinished_issue_is_finished_before_a_new_one_is_built(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {"cy@example.com": "452 4.2.2 Mailbox full"}
    assert project.run("send-digest", "weekly").exit_code == 1
    box.rcpt_replies = {}
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 0, result.output
    subjects = [(str(m["To"]), str(m["Subject"])) for m in box.parsed()]
    cy = [s for to, s in subjects if "cy@" in to]
    assert cy == ["Test Weekly #1: Post 1", "Test Weekly #2: Post 2"]
    assert box.by_recipient() == {"ann@example.com": 2, "bob@example.com": 2, "cy@example.com": 2}


def test_dry_run_writes_the_outbox_and_changes_nothing(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    result = project.run("send-digest", "weekly", "--dry-run")
    assert result.exit_code == 0, result.output
    files = sorted((project.root / "outbox" / "dry-run").rglob("*.eml"))
    assert [f.name for f in files] == ["ann@example.com.eml", "bob@example.com.eml", "cy@example.com.eml"]
    assert box.messages == []
    with Store(load_config(project.config).database_url) as store:
        assert store.issues("weekly") == [] and store.subscriber_source("readers") is None
    # No state changed: the real run still finds the entry new and sends issue #1.
    real = project.run("send-digest", "weekly")
    assert "#1" in real.output and len(box.messages) == 3


def test_to_sends_one_test_copy_outside_the_ledger(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    result = project.run("send-digest", "weekly", "--to", "editor@example.com")
    assert result.exit_code == 0, result.output
    assert box.by_recipient() == {"editor@example.com": 1}
    assert project.run("send-digest", "weekly").exit_code == 0
    assert len(box.messages) == 4


def test_force_builds_an_issue_when_nothing_is_new(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    project.run("send-digest", "weekly")
    assert "nothing new" in project.run("send-digest", "weekly").output
    forced = project.run("send-digest", "weekly", "--force")
    assert forced.exit_code == 0 and "#2" in forced.output
    assert len(box.messages) == 6


def test_smtp_server_down_is_a_clear_error_and_loses_nothing(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    from conftest import free_port

    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=free_port())
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 1
    assert "cannot talk to 127.0.0.1" in result.output
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    again = project.run("send-digest", "weekly")
    assert again.exit_code == 0, again.output
    assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1, "cy@example.com": 1}


def test_a_server_reply_quoting_a_secret_is_stored_and_shown_blanked(
    project: Project,
    feed_server: FeedServer,
    smtp_server: tuple[Mailbox, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    box, port = smtp_server
    monkeypatch.setenv("NEWSLETTER_SECRET", "Sign1ngKeyNobodySees")
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {"cy@example.com": "550 5.7.1 refused: Sign1ngKeyNobodySees"}
    first = project.run("send-digest", "weekly")
    assert first.exit_code == 1 and "550 5.7.1 refused" in first.output
    assert "Sign1ngKeyNobodySees" not in first.output
    with sqlite3.connect(project.root / "state.db") as db:
        errors = [e for (e,) in db.execute("SELECT last_error FROM deliveries WHERE status = 'failed'")]
    assert len(errors) == 1 and "550 5.7.1 refused" in errors[0]
    assert "Sign1ngKeyNobodySees" not in errors[0]
