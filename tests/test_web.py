"""Unsubscribing over real HTTP: GET asks, one-click POST unsubscribes, forgeries change nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from conftest import FeedServer, Project, Route, WebServer, item, rss, sent_messages
from newsletter.config import load_config
from newsletter.store import Store
from newsletter.tokens import SALT
from newsletter.web import create_public_app

CONFIGURED = "https://news.example.net"


@pytest.fixture
def site(project: Project, feed_server: FeedServer) -> Iterator[tuple[Project, WebServer]]:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")])
    assert project.run("send-digest", "weekly").exit_code == 0
    server = WebServer(create_public_app(str(project.config)))
    yield project, server
    server.close()


def unsubscribe_url(project: Project, server: WebServer, address: str) -> str:
    msg = sent_messages(project.root / "outbox")[address]
    url = str(msg["List-Unsubscribe"]).strip("<>")
    assert url.startswith(CONFIGURED + "/unsubscribe/")
    # The email's visible link is the same URL.
    assert url in msg.get_body(("html",)).get_content()
    return url.replace(CONFIGURED, server.base)


def suppressed(project: Project) -> set[str]:
    store = Store(load_config(project.config).database_url)
    try:
        return set(store.suppressed("readers"))
    finally:
        store.close()


def test_get_shows_a_confirmation_and_changes_nothing(site: tuple[Project, WebServer]) -> None:
    project, server = site
    url = unsubscribe_url(project, server, "ann@example.com")
    page = requests.get(url, timeout=10)
    assert page.status_code == 200
    assert "ann@example.com" in page.text and 'method="post"' in page.text
    assert suppressed(project) == set()


def test_one_click_post_unsubscribes_and_the_next_send_skips_the_address(
    site: tuple[Project, WebServer], feed_server: FeedServer
) -> None:
    project, server = site
    url = unsubscribe_url(project, server, "bob@example.com")
    # RFC 8058: the mailbox provider POSTs this body to the List-Unsubscribe URL.
    answer = requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert answer.status_code == 200
    assert suppressed(project) == {"bob@example.com"}
    # Twice is harmless.
    assert requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10).status_code == 200

    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 0, result.output
    second = [p.stem for p in (project.root / "outbox" / "weekly-2").glob("*.eml")]
    assert sorted(second) == ["ann@example.com", "cy@example.com"]

    listing = project.run("subscribers", "list", "readers")
    assert "unsubscribed  bob@example.com" in listing.output
    export = project.run("subscribers", "export", "readers")
    assert "bob@example.com" not in export.output and "ann@example.com,Ann" in export.output
    assert "one-click bob@example.com" in project.run("subscribers", "suppressed", "readers").output


def test_the_pages_button_unsubscribes_too(site: tuple[Project, WebServer]) -> None:
    project, server = site
    url = unsubscribe_url(project, server, "cy@example.com")
    assert requests.post(url, data={}, timeout=10).status_code == 200
    assert suppressed(project) == {"cy@example.com"}


@pytest.mark.parametrize("damage", ["flip", "other-secret", "garbage", "expired"])
def test_forged_tampered_or_expired_tokens_are_refused_and_change_nothing(
    site: tuple[Project, WebServer], damage: str
) -> None:
    project, server = site
    url = unsubscribe_url(project, server, "ann@example.com")
    base, token = url.rsplit("/", 1)
    if damage == "flip":
        token = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    elif damage == "other-secret":
        token = URLSafeTimedSerializer("not-the-secret", salt=SALT).dumps(["readers", "ann@example.com"])
    elif damage == "garbage":
        token = "not-a-token"
    else:

        class LastYear(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(time.time()) - 400 * 86400

        token = URLSafeTimedSerializer("test-secret", salt=SALT, signer=LastYear).dumps(
            ["readers", "ann@example.com"]
        )
    for method in (requests.get, requests.post):
        answer = method(f"{base}/{token}", data={"List-Unsubscribe": "One-Click"}, timeout=10)
        assert answer.status_code == 400
        assert ("expired" if damage == "expired" else "not valid") in answer.text
    assert suppressed(project) == set()


def test_the_archive_shows_past_issues_without_anyones_address(site: tuple[Project, WebServer]) -> None:
    project, server = site
    index = requests.get(f"{server.base}/archive/", timeout=10)
    assert index.status_code == 200 and "Test Weekly #1: Post 1" in index.text
    page = requests.get(f"{server.base}/archive/weekly/1/", timeout=10)
    assert page.status_code == 200 and "Post 1" in page.text
    assert "@example.com" not in page.text and "/unsubscribe/" not in page.text
    assert requests.get(f"{server.base}/archive/weekly/9/", timeout=10).status_code == 404

    out = project.root / "site"
    assert project.run("archive", "weekly", "--out", str(out)).exit_code == 0
    assert (out / "1.html").read_text() == page.text
    assert 'href="1.html"' in (out / "index.html").read_text()
