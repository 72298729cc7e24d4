"""The preview in a real headless Chromium, and the proof that it shows what is sent."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from conftest import FeedServer, Mailbox, Project, Route, WebServer, item, rss
from newsletter.tokens import UnsubscribeTokens
from newsletter.web import create_preview_app

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
    server = WebServer(create_preview_app(str(project.config)))
    yield server
    server.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_index_issue_page_frames_text_and_size(browser, preview: WebServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1800, "height": 2600})
    page.set_default_timeout(15_000)
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
    shot(page, "preview-issue")
    page.close()


def test_the_page_reloads_when_a_template_is_saved(browser, project: Project, preview: WebServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(preview.base + "/schedules/weekly/")
    assert page.frame_locator("iframe#desktop").locator("text=Custom footer").count() == 0
    (project.root / "templates" / "footer.html").write_text("<p>Custom footer {{ unsubscribe_url }}</p>")
    expect(page.frame_locator("iframe#desktop").get_by_text("Custom footer")).to_be_visible()
    page.close()


def test_send_a_test_from_the_page(browser, preview: WebServer, smtp_server: tuple[Mailbox, int]) -> None:  # type: ignore[no-untyped-def]
    box, _ = smtp_server
    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(preview.base + "/schedules/weekly/")
    page.fill("input[name=address]", "editor@example.org")
    page.click("text=Send this issue to one address")
    assert "A test copy of #1 went to editor@example.org" in page.inner_text("#message")
    assert box.by_recipient() == {"editor@example.org": 1}
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
