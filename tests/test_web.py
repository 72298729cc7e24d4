"""The public app over real HTTP: GET asks, one-click POST unsubscribes, forgeries change nothing.

Most tests run it on waitress with the limits `newsletter serve` gives it: in a thread here, and
as `newsletter serve` itself, a real process, where the server's own body limits are the
point. The rest run on werkzeug in a thread, standing for any other WSGI server.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
import waitress
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from conftest import FeedServer, Project, Route, WebServer, free_port, item, rss, sent_messages
from newsletter.config import load_config
from newsletter.store import Store
from newsletter.tokens import SALT
from newsletter.web import WAITRESS_LIMITS, create_public_app

CONFIGURED = "https://news.example.net"
PRIVATE = """\
    archive: true
  private:
    title: Private Notes
    feeds:
      - {feed}
    subscribers: readers
    sender: main
    from: Notes <notes@example.net>
    unsubscribe_url: https://news.example.net/unsubscribe/{{token}}
"""


@pytest.fixture
def sent(project: Project, feed_server: FeedServer) -> Project:
    """Issue #1 of `weekly` (in the public archive) and of `private` (not in it) sent."""
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    feed = feed_server.url("/feed.xml")
    project.setup([feed], extra_schedule=PRIVATE.format(feed=feed))
    assert project.run("send-digest", "private").exit_code == 0
    assert project.run("send-digest", "weekly").exit_code == 0
    return project


@pytest.fixture
def site(sent: Project) -> Iterator[tuple[Project, WebServer]]:
    server = WebServer(create_public_app(str(sent.config)))
    yield sent, server
    server.close()


class Waitress:
    """The public app on waitress in a thread, as `newsletter serve` runs it (same limits)."""

    def __init__(self, config: str) -> None:
        self.server = waitress.create_server(
            create_public_app(config),
            host="127.0.0.1",
            port=0,
            threads=4,
            # How often the loop wakes when idle: often, so that close() is not a second's wait.
            asyncore_loop_timeout=0.05,
            **WAITRESS_LIMITS,
        )
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.effective_port}"

    def _run(self) -> None:
        try:
            self.server.run()
        except (OSError, ValueError):
            # Closing the sockets under the loop is how it is stopped; anything else is news.
            if not self.stopping:
                raise

    def close(self) -> None:
        # waitress has no stop(): close every channel (the listener too) and the loop ends.
        self.stopping = True
        self.server.logger.setLevel(logging.CRITICAL)
        while self.server._map:
            for channel in list(self.server._map.values()):
                channel.handle_close()
        self.server.task_dispatcher.shutdown()
        self.thread.join(5)


@pytest.fixture
def waitress_site(sent: Project) -> Iterator[tuple[Project, str]]:
    server = Waitress(str(sent.config))
    yield sent, server.base
    server.close()


@pytest.fixture
def served(sent: Project) -> Iterator[tuple[Project, str]]:
    """`newsletter serve` as a real process on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "--config", str(sent.config), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "newsletter serve did not start"
            time.sleep(0.05)
    yield sent, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def unsubscribe_url(project: Project, base: str, address: str) -> str:
    msg = sent_messages(project.root / "outbox")[address]
    url = str(msg["List-Unsubscribe"]).strip("<>")
    assert url.startswith(CONFIGURED + "/unsubscribe/")
    # The email's visible link is the same URL.
    assert url in msg.get_body(("html",)).get_content()
    return url.replace(CONFIGURED, base)


def suppressed(project: Project) -> set[str]:
    store = Store(load_config(project.config).database_url)
    try:
        return {s.address for s in store.suppressed("readers")}
    finally:
        store.close()


def raw_http(url: str, head: str, body: list[bytes] = []) -> bytes:  # noqa: B006 - never mutated
    """Send a hand-made request and read the answer until the server closes (or 5 s pass)."""
    parts = urlsplit(url)
    assert parts.port
    with socket.create_connection(("127.0.0.1", parts.port), timeout=5) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode())
        try:
            for chunk in body:
                conn.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on the body: its answer is still there to read
        answer = b""
        try:
            while data := conn.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"no answer in 5 s (the server is still reading the body); got {answer[:200]!r}")
    return answer


def test_get_shows_a_confirmation_and_changes_nothing(site: tuple[Project, WebServer]) -> None:
    project, server = site
    url = unsubscribe_url(project, server.base, "ann@example.com")
    page = requests.get(url, timeout=10)
    assert page.status_code == 200
    assert "ann@example.com" in page.text and 'method="post"' in page.text
    assert suppressed(project) == set()


def test_one_click_post_unsubscribes_and_the_next_send_skips_the_address(
    site: tuple[Project, WebServer], feed_server: FeedServer
) -> None:
    project, server = site
    url = unsubscribe_url(project, server.base, "bob@example.com")
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
    url = unsubscribe_url(project, server.base, "cy@example.com")
    assert requests.post(url, data={}, timeout=10).status_code == 200
    assert suppressed(project) == {"cy@example.com"}


@pytest.mark.parametrize("damage", ["flip", "other-secret", "garbage", "expired"])
def test_forged_tampered_or_expired_tokens_are_refused_and_change_nothing(
    site: tuple[Project, WebServer], damage: str
) -> None:
    project, server = site
    url = unsubscribe_url(project, server.base, "ann@example.com")
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


# -- only a POST changes anything ----------------------------------------------------------------


def test_head_get_and_options_only_show_and_post_unsubscribes(waitress_site: tuple[Project, str]) -> None:
    project, base = waitress_site
    url = unsubscribe_url(project, base, "ann@example.com")
    # Link scanners and prefetchers send HEAD (curl -I), browsers preflight with OPTIONS.
    for method in ("HEAD", "GET", "OPTIONS", "HEAD"):
        answer = requests.request(method, url, timeout=10)
        assert answer.status_code == 200, method
        assert suppressed(project) == set(), f"a {method} unsubscribed"
    answer = requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert answer.status_code == 200 and "will get no more email" in answer.text
    assert suppressed(project) == {"ann@example.com"}


# -- bodies are capped before they are parsed -------------------------------------------------------


def test_serve_refuses_a_huge_declared_body_without_waiting_for_it(served: tuple[Project, str]) -> None:
    project, base = served
    url = unsubscribe_url(project, base, "ann@example.com")
    path = urlsplit(url).path
    # 200 MB announced and none of it sent: the answer comes at once, nothing is buffered.
    answer = raw_http(
        url,
        f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/x-www-form-urlencoded\n"
        "Content-Length: 200000000\n\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert suppressed(project) == set()


def test_serve_refuses_a_chunked_body_over_the_cap(served: tuple[Project, str]) -> None:
    project, base = served
    url = unsubscribe_url(project, base, "bob@example.com")
    path = urlsplit(url).path
    # No Content-Length: only counting while reading can stop it.
    form = b"List-Unsubscribe=One-Click&pad=" + b"x" * 64 * 1024
    chunks = [
        b"%x\r\n%s\r\n" % (len(form[i : i + 4096]), form[i : i + 4096]) for i in range(0, len(form), 4096)
    ]
    answer = raw_http(
        url,
        f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/x-www-form-urlencoded\n"
        "Transfer-Encoding: chunked\nConnection: close\n\n",
        [*chunks, b"0\r\n\r\n"],
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert suppressed(project) == set()
    # The RFC 8058 body itself, chunked, is fine.
    answer = raw_http(
        url,
        f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/x-www-form-urlencoded\n"
        "Transfer-Encoding: chunked\nConnection: close\n\n",
        [b"1a\r\nList-Unsubscribe=One-Click\r\n0\r\n\r\n"],
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert suppressed(project) == {"bob@example.com"}


def test_the_app_caps_bodies_under_any_wsgi_server(site: tuple[Project, WebServer]) -> None:
    project, server = site
    url = unsubscribe_url(project, server.base, "cy@example.com")
    big = {"List-Unsubscribe": "One-Click", "pad": "x" * 5000}
    assert requests.post(url, data=big, timeout=10).status_code == 413
    # Chunked (a generator body has no length): werkzeug counts while it reads.
    chunked = (part.encode() for part in ["List-Unsubscribe=One-Click&pad=", "x" * 5000])
    answer = requests.post(
        url, data=chunked, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10
    )
    assert answer.status_code == 413
    assert suppressed(project) == set()
    one_click = (part for part in [b"List-Unsubscribe=", b"One-Click"])
    answer = requests.post(
        url, data=one_click, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10
    )
    assert answer.status_code == 200
    assert suppressed(project) == {"cy@example.com"}


# -- unknown things are a plain 404 -------------------------------------------------------------------


def test_unknown_schedules_and_issues_are_a_plain_404(waitress_site: tuple[Project, str]) -> None:
    project, base = waitress_site
    for path in ("/archive/nope/1/", "/archive/weekly/9/", "/archive/private/1/", "/archive/x/"):
        answer = requests.get(base + path, timeout=10)
        assert answer.status_code == 404, path
        # Nothing about the configuration: no path, no schedule names, no hint.
        for secret in (str(project.root), "schedules.yaml", "weekly", "private", "known"):
            assert secret not in answer.text, (path, secret)


def test_only_schedules_that_opt_in_are_in_the_archive(waitress_site: tuple[Project, str]) -> None:
    _, base = waitress_site
    index = requests.get(f"{base}/archive/", timeout=10)
    assert index.status_code == 200
    assert "Test Weekly #1: Post 1" in index.text
    assert "Private" not in index.text and "/archive/private/" not in index.text
    assert requests.get(f"{base}/archive/weekly/1/", timeout=10).status_code == 200
    assert requests.get(f"{base}/archive/private/1/", timeout=10).status_code == 404


def test_the_archive_reads_no_subscriber_list(waitress_site: tuple[Project, str]) -> None:
    project, base = waitress_site
    # An edit broke the list (not UTF-8): the archive has nothing to do with it.
    (project.root / "subscribers" / "readers.csv").write_bytes(b"email,name\n\xff\xfe broken\n")
    page = requests.get(f"{base}/archive/weekly/1/", timeout=10)
    assert page.status_code == 200 and "Post 1" in page.text
    assert requests.get(f"{base}/archive/", timeout=10).status_code == 200
    # The next send does read it, and says what is wrong.
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 2 and "not UTF-8" in result.output


# -- headers on every response --------------------------------------------------------------------


def test_every_response_carries_security_headers(waitress_site: tuple[Project, str]) -> None:
    project, base = waitress_site
    url = unsubscribe_url(project, base, "ann@example.com")
    answers = {
        "unsubscribe page": requests.get(url, timeout=10),
        "refused token": requests.get(url[:-4] + "AAAA", timeout=10),
        "archive index": requests.get(f"{base}/archive/", timeout=10),
        "archive issue": requests.get(f"{base}/archive/weekly/1/", timeout=10),
        "not found": requests.get(f"{base}/nothing", timeout=10),
        "too large": requests.post(url, data={"pad": "x" * 5000}, timeout=10),
        "unsubscribed": requests.post(url, timeout=10),
    }
    for what, answer in answers.items():
        csp = answer.headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (what, csp)
        assert "script-src" not in csp, what
        assert answer.headers.get("X-Content-Type-Options") == "nosniff", what
        assert answer.headers.get("Referrer-Policy") == "no-referrer", what
    for what in ("unsubscribe page", "refused token", "unsubscribed"):
        assert answers[what].headers.get("Cache-Control") == "no-store", what
    # An archived email may use what an email uses: inline styles and https images.
    email_csp = answers["archive issue"].headers["Content-Security-Policy"]
    assert "style-src 'unsafe-inline'" in email_csp and "img-src https:" in email_csp
    # An app page allows only its own (nonce'd) stylesheet.
    page_csp = answers["unsubscribe page"].headers["Content-Security-Policy"]
    nonce = page_csp.split("'nonce-")[1].split("'")[0]
    assert f'<style nonce="{nonce}">' in answers["unsubscribe page"].text
    # Public pages are not the preview.
    for what in ("unsubscribe page", "archive index", "unsubscribed"):
        assert "preview" not in answers[what].text.lower(), what
