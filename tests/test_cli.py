"""The commands as a user runs them: real processes, clear messages, the documented exit codes."""

from __future__ import annotations

from conftest import FeedServer, Mailbox, Project, Route, item, rss


def assert_clean_failure(result, code: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, (needle, output)


def test_bad_yaml_unknown_key_and_missing_sender_exit_2_naming_file_and_key(project: Project) -> None:
    project.setup(["feed.xml"])
    good = project.config.read_text()
    cases = [
        (good.replace("    sender: main", "    sender: [main"), "schedules.yaml:", "bad YAML"),
        (
            good.replace("    sender: main", "    sender: main\n    sendr: main"),
            "schedules.weekly.sendr: unknown key",
        ),
        (
            good.replace("    sender: main", "    sender: nowhere"),
            "schedules.weekly.sender: no sender named 'nowhere'",
        ),
    ]
    for text, *needles in cases:
        project.config.write_text(text)
        for command in (["check"], ["send-digest", "weekly"]):
            assert_clean_failure(project.run_process(*command), 2, str(project.config), *needles)


def test_check_reports_bad_subscriber_rows_with_file_and_line(project: Project) -> None:
    project.setup(["feed.xml"], subscribers=["ann@example.com,Ann", "bogus,Bad", "ann@EXAMPLE.com,Dup"])
    result = project.run_process("check")
    assert result.returncode == 0, result.stderr
    assert "readers.csv:3: invalid address 'bogus'" in result.stderr
    assert "readers.csv:4: ann@example.com already on line 2" in result.stderr
    assert "weekly: 1 subscriber(s)" in result.stdout


def test_malformed_and_failing_feeds_are_reported_not_raised(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/bad.xml"] = Route(b"<rss><channel><item><title>cut")
    feed_server.routes["/err.xml"] = Route(b"no", status=500, content_type="text/plain")
    project.setup([feed_server.url("/bad.xml"), feed_server.url("/err.xml")])
    result = project.run_process("fetch")
    assert_clean_failure(result, 0, "/bad.xml: not a feed", "/err.xml: HTTP 500", "2 error(s)")
    digest = project.run_process("send-digest", "weekly")
    assert_clean_failure(digest, 0, "nothing new")


def test_unknown_schedule_is_a_usage_error(project: Project) -> None:
    project.setup(["feed.xml"])
    assert_clean_failure(
        project.run_process("send-digest", "monthly"), 2, "no schedule named 'monthly'", "weekly"
    )


def test_missing_config_points_at_the_option(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "newsletter", "--config", str(tmp_path / "none.yaml"), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_failure(result, 2, "no such file", "--config")


def test_status_shows_issues_deliveries_and_feed_health(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {"cy@example.com": "550 no"}
    sent = project.run_process("send-digest", "weekly")
    assert sent.returncode == 1
    status = project.run_process("status")
    assert status.returncode == 0
    assert "weekly: 3 subscriber(s), 0 new entries waiting" in status.stdout
    assert "#1" in status.stdout and "sent 2, pending 0, failed 1" in status.stdout
    assert f"feed {feed_server.url('/feed.xml')}: ok" in status.stdout
