"""schedules.yaml: every mistake names the file and the key; secrets come from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.config import load_config
from newsletter.errors import ConfigError

GOOD = """\
senders:
  mail:
    type: smtp
    host: ${SMTP_HOST}
    port: 2525
    starttls: true
    username: news@example.net
    password_env: SMTP_PASSWORD
schedules:
  weekly:
    feeds: [feeds/a.xml, "https://blog.example.org/feed"]
    subscribers: readers
    sender: mail
    from: News <news@example.net>
    unsubscribe_url: https://example.net/u/{token}
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "subscribers").mkdir()
    (tmp_path / "subscribers" / "readers.csv").write_text("email\nann@example.com\n")
    monkeypatch.setenv("SMTP_HOST", "mail.example.net")
    return tmp_path


def load(folder: Path, text: str):  # type: ignore[no-untyped-def]
    path = folder / "schedules.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def error(folder: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(folder, text)
    return str(info.value)


def test_a_good_config_resolves_paths_against_its_folder(folder: Path) -> None:
    config = load(folder, GOOD)
    schedule = config.schedule("weekly")
    assert config.feed_url(schedule.feeds[0]) == (folder / "feeds" / "a.xml").as_uri()
    assert config.feed_url(schedule.feeds[1]) == "https://blog.example.org/feed"
    assert config.database_url == f"sqlite:///{folder / 'newsletter.db'}"
    assert config.senders["mail"].options.host == "mail.example.net"  # type: ignore[attr-defined]
    assert schedule.max_articles == 20


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("max_articles: 20", "max_articles: many"),
            "schedules.weekly.max_articles: Input should be a valid integer",
        ),
        (("    sender: mail", "    sender: mail\n    colour: blue"), "schedules.weekly.colour: unknown key"),
        (("    port: 2525", "    port: 2525\n    hots: x"), "senders.mail.hots: unknown key"),
        (("    port: 2525", "    port: lots"), "senders.mail.port: Input should be a valid integer"),
        (
            ("    sender: mail", "    sender: post"),
            "schedules.weekly.sender: no sender named 'post' (known: mail)",
        ),
        (("    subscribers: readers", "    subscribers: nobody"), "schedules.weekly.subscribers: no file"),
        (("    type: smtp", "    type: pigeon"), "senders.mail.type: unknown sender type 'pigeon'"),
        (("    from: News <news@example.net>\n", ""), "schedules.weekly.from: missing required key"),
        (
            ("https://example.net/u/{token}", "http://example.net/u/{token}"),
            "schedules.weekly.unsubscribe_url: ",
        ),
        (("https://example.net/u/{token}", "https://example.net/u/"), "must contain {token}"),
        (
            ("    from: News <news@example.net>", "    from: nobody"),
            "schedules.weekly.from: Value error, not an email",
        ),
        (
            ("    from: News <news@example.net>", "    from: Zoë <zoë@exämple.net>"),
            "schedules.weekly.from: Value error, must be an ASCII address",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    list_id: weekly news"),
            "schedules.weekly.list_id: Value error, must be ASCII without spaces",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    misfire_grace: 0"),
            "schedules.weekly.misfire_grace: Value error, must be longer than zero",
        ),
        (
            ("${SMTP_HOST}", "${NOT_SET_ANYWHERE}"),
            "senders.mail.host: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    share:\n      template: '{title} {body}'"),
            "schedules.weekly.share.template: snippet template",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    share:\n      networks: [x, myspace]"),
            "schedules.weekly.share.networks: Value error, unknown network(s) ['myspace']",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    post:\n      - to: nowhere"),
            "schedules.weekly.post[0].to: no sender named 'nowhere'",
        ),
        (
            ("    max_articles: 20", "    max_articles: 20\n    post:\n      - to: mail"),
            "schedules.weekly.post[0].to: 'mail' is not a webhook sender",
        ),
    ],
)
def test_mistakes_name_the_file_and_the_key(folder: Path, change: tuple[str, str], expected: str) -> None:
    text = GOOD.replace("unsubscribe_url", "max_articles: 20\n    unsubscribe_url")
    old, new = change
    assert old in text
    message = error(folder, text.replace(old, new))
    assert str(folder / "schedules.yaml") in message
    assert expected in message


def test_bad_yaml_names_the_line(folder: Path) -> None:
    message = error(folder, GOOD.replace("    port: 2525", "    port: [2525"))
    assert "schedules.yaml:" in message and "bad YAML" in message


def test_default_from_environment_variable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMTP_HOST")
    config = load(folder, GOOD.replace("${SMTP_HOST}", "${SMTP_HOST:-localhost}"))
    assert config.senders["mail"].options.host == "localhost"  # type: ignore[attr-defined]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_smtp_cannot_be_both_starttls_and_ssl(folder: Path) -> None:
    message = error(
        folder, GOOD.replace("    port: 2525", "    port: 2525\n    starttls: true\n    ssl: true")
    )
    assert "senders.mail" in message and "not both" in message


def test_a_feed_may_carry_its_own_polling_interval(folder: Path) -> None:
    text = GOOD.replace(
        'feeds: [feeds/a.xml, "https://blog.example.org/feed"]',
        'feeds: [feeds/a.xml, {url: "https://blog.example.org/feed", interval: 2h}]',
    )
    config = load(folder, text.replace("unsubscribe_url", "max_articles: 20\n    unsubscribe_url"))
    from datetime import timedelta

    assert config.feed_interval("https://blog.example.org/feed") == timedelta(hours=2)
    assert config.feed_interval((folder / "feeds" / "a.xml").as_uri()) == timedelta(minutes=15)
    bad = text.replace("interval: 2h", "interval: often")
    assert "not a duration: 'often'" in error(folder, bad)


def test_each_run_gets_its_own_sender_and_the_config_holds_none_that_is_live(folder: Path) -> None:
    from newsletter.senders import Sender
    from newsletter.senders.smtp import SmtpSender

    config = load(folder, GOOD)
    # Threads of the daemon and the web apps share one Config; a shared live sender mixed up
    # two runs' SMTP conversations.
    assert not any(isinstance(s, Sender) for s in config.senders.values())
    first, second = config.sender("mail"), config.sender("mail")
    assert isinstance(first, SmtpSender) and isinstance(second, SmtpSender)
    assert first is not second and first.options is not second.options
    assert first.options.host == second.options.host == "mail.example.net"
    with pytest.raises(ConfigError, match="no sender named 'post'") as info:
        config.sender("post")
    assert str(folder / "schedules.yaml") in str(info.value)


def test_the_digest_fetch_deadline_is_a_setting(folder: Path) -> None:
    assert load(folder, GOOD).settings.fetch.digest_timeout == 5
    config = load(folder, "fetch:\n  digest_timeout: 1.5\n" + GOOD)
    assert config.settings.fetch.digest_timeout == 1.5
    assert "fetch.digest_timeout: Input should be greater than 0" in error(
        folder, "fetch:\n  digest_timeout: 0\n" + GOOD
    )


def test_the_store_busy_timeout_is_a_setting_and_the_config_opens_its_stores_with_it(folder: Path) -> None:
    from datetime import timedelta

    assert load(folder, GOOD).settings.busy_timeout == timedelta(seconds=30)
    config = load(folder, "busy_timeout: 2s\n" + GOOD)
    assert config.settings.busy_timeout == timedelta(seconds=2)
    assert load(folder, "busy_timeout: 1.5\n" + GOOD).settings.busy_timeout == timedelta(seconds=1.5)
    assert "busy_timeout: Value error, not a duration: 'soon'" in error(folder, "busy_timeout: soon\n" + GOOD)
    assert "busy_timeout: Input should be greater than 0" in error(folder, "busy_timeout: 0\n" + GOOD)
    # Every command, daemon job and web request opens its store here (the fault suite's lock
    # tests show the wait end to end); this is the value that reaches the store.
    with config.open_store() as store:
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 2000  # milliseconds
    with config.open_store(busy_timeout=0.5) as store:  # a lock heartbeat's short fuse
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 500
