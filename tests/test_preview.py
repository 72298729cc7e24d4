"""The preview in a real headless Chromium, and the proof that it shows what is sent."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import expect

from conftest import FeedServer, Mailbox, Project, Route, WebServer, free_port, item, rss
from newsletter.tokens import UnsubscribeTokens
from newsletter.web import create_preview_app, create_public_app

TOKEN = re.compile(r"/unsubscribe/([A-Za-z0-9_.-]+)")

pytestmark = pytest.mark.timeout(90)
SHOTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).parent.parent / "artifacts")) / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium on PATH: apt-get install chromium (CI's .ci/run does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def preview(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> Iterator[WebServer]:
    _, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2, title="Second &amp; last")]))
    (project.root / "templates").mkdir()
    project.setup([feed_server.url("/feed.xml")], smtp_port=port, templates="templates")
    assert project.run("fetch").exit_code == 0
    # The preview shows the list as a send or `check` last read it; it reads no CSV itself.
    assert project.run("check").exit_code == 0
    server = WebServer(create_preview_app(str(project.config)))
    yield server
    server.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def csp_watch(page) -> list[str]:  # type: ignore[no-untyped-def]
    """Chromium's console lines about the Content-Security-Policy (frames included), as they come."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text) if "Content Security Policy" in m.text else None)
    return seen


def test_index_issue_page_frames_text_and_size(browser, preview: WebServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1800, "height": 2600})
    page.set_default_timeout(15_000)
    violations = csp_watch(page)
    page.goto(preview.base + "/")
    assert page.locator("#schedules .schedule").count() == 1
    assert "Test Weekly" in page.inner_text("#schedules")
    assert "2" in page.locator("#schedules .schedule td").nth(2).inner_text()  # entries waiting
    shot(page, "preview-index")

    page.click("text=Test Weekly")
    page.wait_for_url("**/schedules/weekly/")
    assert page.title() == "Test Weekly #1: Second & last"
    for frame_id, width in (("desktop", 640), ("mobile", 375)):
        frame = page.locator(f"iframe#{frame_id}")
        assert frame.get_attribute("width") == str(width)
        inner = page.frame_locator(f"iframe#{frame_id}")
        expect(inner.get_by_role("heading", name="Post 1")).to_be_visible()
        expect(inner.get_by_text("ann@example.com")).to_be_visible()
    # The mobile frame really lays the email out narrow: the container fits in 375 px.
    box = page.frame_locator("iframe#mobile").locator("table.container").bounding_box()
    assert box is not None and box["width"] <= 375
    dark_bg = (
        page.frame_locator("iframe#dark")
        .locator("table.container")
        .evaluate("e => getComputedStyle(e).backgroundColor")
    )
    assert dark_bg == "rgb(31, 41, 55)"
    stripped = page.frame_locator("iframe#stripped").locator("style")
    assert stripped.count() == 0
    assert "Post 1" in page.inner_text("#text") and "Unsubscribe:" in page.inner_text("#text")
    assert "of Gmail's 102 KB clipping line" in page.inner_text("#size")
    assert "List-Unsubscribe-Post" in page.inner_text("#headers")
    snippets = page.locator("#snippets .snippet")
    assert snippets.count() == 2 * 10  # two articles, ten networks
    assert "x" in snippets.first.inner_text() and "/280" in snippets.first.inner_text()
    assert page.locator("#snippets .over").count() == 0
    # The page's own stylesheet applies under its CSP, and nothing on it was refused.
    assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(17, 24, 39)"
    assert violations == []
    shot(page, "preview-issue")
    page.close()


def test_the_page_reloads_when_a_template_is_saved(browser, project: Project, preview: WebServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.set_default_timeout(15_000)
    violations = csp_watch(page)
    page.goto(preview.base + "/schedules/weekly/")
    assert page.frame_locator("iframe#desktop").locator("text=Custom footer").count() == 0
    (project.root / "templates" / "footer.html").write_text("<p>Custom footer {{ unsubscribe_url }}</p>")
    # The reload script runs under the page's CSP (nonce'd, polling its own origin).
    expect(page.frame_locator("iframe#desktop").get_by_text("Custom footer")).to_be_visible()
    assert violations == []
    page.close()


def test_send_a_test_from_the_page(browser, preview: WebServer, smtp_server: tuple[Mailbox, int]) -> None:  # type: ignore[no-untyped-def]
    box, _ = smtp_server
    page = browser.new_page()
    page.set_default_timeout(15_000)
    violations = csp_watch(page)
    page.goto(preview.base + "/schedules/weekly/")
    page.fill("input[name=address]", "editor@example.org")
    page.click("text=Send this issue to one address")
    assert "A test copy of #1 went to editor@example.org" in page.inner_text("#message")
    assert box.by_recipient() == {"editor@example.org": 1}
    assert violations == []
    page.close()


def test_preview_html_is_byte_identical_to_what_send_digest_sends(
    project: Project, preview: WebServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, _ = smtp_server
    shown = {
        a: requests.get(
            f"{preview.base}/schedules/weekly/email.html", params={"subscriber": a}, timeout=30
        ).text
        for a in ("ann@example.com", "bob@example.com")
    }
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 0, result.output
    sent = {str(m["To"].addresses[0].addr_spec): m for m in box.parsed()}
    tokens = UnsubscribeTokens("test-secret")
    for address, html in shown.items():
        part = sent[address].get_body(("html",)).get_content().replace("\r\n", "\n")
        # The unsubscribe token is the one per-subscriber value that carries the second it was
        # signed in; both must name this reader, and everything else must match byte for byte.
        found = [TOKEN.findall(h) for h in (html, part)]
        assert all(tokens.read(t) == ("readers", address) for ts in found for t in ts) and found[0]
        assert TOKEN.sub("/unsubscribe/T", part) == TOKEN.sub("/unsubscribe/T", html)


def test_choosing_a_reader_still_switches_the_frames(browser, preview: WebServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.set_default_timeout(15_000)
    violations = csp_watch(page)
    page.goto(preview.base + "/schedules/weekly/")
    # The select submits itself from the page's script, not from an inline handler.
    page.select_option("select[name=subscriber]", "bob@example.com")
    page.wait_for_url("**/schedules/weekly/?subscriber=bob%40example.com")
    expect(page.frame_locator("iframe#desktop").get_by_text("bob@example.com")).to_be_visible()
    assert violations == []
    page.close()


def test_the_public_unsubscribe_page_works_under_its_csp(
    browser, project: Project, preview: WebServer
) -> None:  # type: ignore[no-untyped-def]
    public = WebServer(create_public_app(str(project.config)))
    try:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        violations = csp_watch(page)
        token = UnsubscribeTokens("test-secret").make("readers", "ann@example.com")
        page.goto(f"{public.base}/unsubscribe/{token}")
        assert "Stop sending Test Weekly to ann@example.com?" in page.inner_text("main")
        assert page.locator("header").count() == 0  # no preview chrome on a public page
        assert (
            page.locator("body").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(249, 250, 251)"
        )
        page.click("button:has-text('Unsubscribe')")
        assert "ann@example.com will get no more email" in page.inner_text("#message")
        assert violations == []
        page.close()
    finally:
        public.close()


# -- the preview is for this machine only ------------------------------------------------------------


def form_token(preview: WebServer) -> str:
    """The token of the page's test-send form, as only a page of the preview itself can read it."""
    page = requests.get(f"{preview.base}/schedules/weekly/", timeout=30).text
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    return found.group(1) if found else ""


def test_cross_site_test_sends_are_refused_and_send_nothing(
    preview: WebServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, _ = smtp_server
    url = f"{preview.base}/schedules/weekly/test"
    token = form_token(preview)
    victim = "victim@example.org"
    forged = [
        ({}, {"address": victim}),  # a plain cross-site form: no token
        ({}, {"address": victim, "csrf": "not-the-token"}),
        ({}, {"address": victim, "csrf": "ünïcode"}),
        ({"Origin": "https://evil.example"}, {"address": victim, "csrf": token}),
        ({"Origin": "null"}, {"address": victim, "csrf": token}),
        ({"Sec-Fetch-Site": "cross-site"}, {"address": victim, "csrf": token}),
        # Another port on this machine is the same site, not the same origin.
        ({"Sec-Fetch-Site": "same-site"}, {"address": victim, "csrf": token}),
    ]
    for headers, form in forged:
        answer = requests.post(url, data=form, headers=headers, timeout=30)
        assert answer.status_code == 403, (headers, form, answer.text[:200])
    assert box.messages == []
    assert len(token) >= 32, "the test-send form carries no token"
    # The page's own form, as a browser sends it, goes through.
    own = {"Origin": preview.base, "Sec-Fetch-Site": "same-origin"}
    answer = requests.post(
        url, data={"address": "editor@example.org", "csrf": token}, headers=own, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert box.by_recipient() == {"editor@example.org": 1}


def test_only_loopback_host_names_are_answered(preview: WebServer, smtp_server: tuple[Mailbox, int]) -> None:
    box, _ = smtp_server
    port = urlsplit(preview.base).port
    token = form_token(preview)
    for host in (
        "rebind.example",
        f"rebind.example:{port}",
        f"127.0.0.1.nip.io:{port}",
        f"a.localhost:{port}",
    ):
        # A DNS-rebinding page talks to 127.0.0.1 under its own name.
        for path in ("/", "/schedules/weekly/", "/schedules/weekly/email.html", "/_stamp"):
            answer = requests.get(preview.base + path, headers={"Host": host}, timeout=30)
            assert answer.status_code == 400, (host, path)
            assert "@example.com" not in answer.text and "/unsubscribe/" not in answer.text
        answer = requests.post(
            f"{preview.base}/schedules/weekly/test",
            data={"address": "editor@example.org", "csrf": token},
            headers={"Host": host, "Origin": f"http://{host}"},
            timeout=30,
        )
        assert answer.status_code == 400
    assert box.messages == []
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}", "localhost"):
        answer = requests.get(f"{preview.base}/schedules/weekly/", headers={"Host": host}, timeout=30)
        assert answer.status_code == 200, host
        assert "ann@example.com" in answer.text


def test_preview_answers_to_the_host_it_was_started_on(project: Project, preview: WebServer) -> None:
    port = free_port()
    args = ["preview", "--host", "127.0.0.2", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "--config", str(project.config), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "newsletter preview exited"
            try:
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "newsletter preview did not start"
                time.sleep(0.05)
        base = f"http://127.0.0.2:{port}"
        assert requests.get(f"{base}/schedules/weekly/", timeout=30).status_code == 200
        assert requests.get(f"{base}/", headers={"Host": "rebind.example"}, timeout=30).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_test_send_goes_to_one_valid_address(preview: WebServer, smtp_server: tuple[Mailbox, int]) -> None:
    box, _ = smtp_server
    token = form_token(preview)
    url = f"{preview.base}/schedules/weekly/test"
    for given in (
        "a@example.org, b@example.org",
        "a@example.org b@example.org",
        "Ann <a@example.org>",
        "a@b@example.org",
        "not-an-address",
        "a@example.org\r\nBcc: b@example.org",
        "",
    ):
        answer = requests.post(url, data={"address": given, "csrf": token}, timeout=30)
        assert answer.status_code == 400, given
    assert box.messages == []


def test_test_sends_are_rate_limited(preview: WebServer, smtp_server: tuple[Mailbox, int]) -> None:
    box, _ = smtp_server
    token = form_token(preview)
    url = f"{preview.base}/schedules/weekly/test"
    for n in range(5):
        answer = requests.post(url, data={"address": f"editor{n}@example.org", "csrf": token}, timeout=30)
        assert answer.status_code == 200, answer.text
    answer = requests.post(url, data={"address": "editor9@example.org", "csrf": token}, timeout=30)
    assert answer.status_code == 429
    wait = int(answer.headers["Retry-After"])
    assert 0 < wait <= 60 and f"Try again in {wait} seconds" in answer.text
    assert len(box.messages) == 5


def test_preview_pages_and_email_frames_carry_their_own_policies(preview: WebServer) -> None:
    page = requests.get(f"{preview.base}/schedules/weekly/", timeout=30)
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'nonce-" in csp
    assert "unsafe-inline" not in csp
    # The email frames are embedded by the page itself, and nothing in them may run.
    frame = requests.get(f"{preview.base}/schedules/weekly/email.html", timeout=30)
    csp = frame.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in csp and "script-src" not in csp and "default-src 'none'" in csp
    for answer in (page, frame, requests.get(f"{preview.base}/_stamp", timeout=30)):
        assert answer.headers["Cache-Control"] == "no-store"  # every preview page shows addresses
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        # Same origin only (no-referrer would make Chromium send "Origin: null" on the form).
        assert answer.headers["Referrer-Policy"] == "same-origin"
    assert requests.get(f"{preview.base}/schedules/nope/", timeout=30).status_code == 404


def test_past_issues_show_in_the_preview_without_being_public(
    project: Project, preview: WebServer, smtp_server: tuple[Mailbox, int]
) -> None:
    assert project.run("send-digest", "weekly").exit_code == 0
    page = requests.get(f"{preview.base}/schedules/weekly/issues/1/", timeout=30)
    assert page.status_code == 200 and "Not in the public archive" in page.text
    frame = requests.get(f"{preview.base}/schedules/weekly/issues/1/email.html", timeout=30)
    assert frame.status_code == 200 and "Post 1" in frame.text and "@example.com" not in frame.text
    assert "frame-ancestors 'self'" in frame.headers["Content-Security-Policy"]
    # The schedule did not opt in to the archive: its issues are not public, even here.
    assert requests.get(f"{preview.base}/archive/weekly/1/", timeout=30).status_code == 404


def test_the_preview_reads_no_subscriber_list(project: Project, preview: WebServer) -> None:
    # An edit broke the list: the preview keeps showing the copy last read, and says so.
    (project.root / "subscribers" / "readers.csv").write_bytes(b"email,name\n\xff\xfe broken\n")
    assert requests.get(f"{preview.base}/", timeout=30).status_code == 200
    page = requests.get(f"{preview.base}/schedules/weekly/", timeout=30)
    assert page.status_code == 200 and "ann@example.com" in page.text
    assert "readers.csv changed since it was last read" in page.text
    assert requests.get(f"{preview.base}/schedules/weekly/email.html", timeout=30).status_code == 200


def test_a_list_never_read_shows_a_sample_reader_and_says_how_to_read_it(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")])
    assert project.run("fetch").exit_code == 0
    server = WebServer(create_preview_app(str(project.config)))
    try:
        page = requests.get(f"{server.base}/schedules/weekly/", timeout=30)
        assert page.status_code == 200
        assert "readers.csv has not been read yet" in page.text and "newsletter check" in page.text
        assert (
            "reader@example.com"
            in requests.get(f"{server.base}/schedules/weekly/email.html", timeout=30).text
        )
    finally:
        server.close()
