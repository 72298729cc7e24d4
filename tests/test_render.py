"""Rendering: golden files for the bundled templates, sanitising, size, template safety."""

from __future__ import annotations

import difflib
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from newsletter.config import Schedule
from newsletter.model import StoredEntry
from newsletter.render import GMAIL_CLIP_BYTES, Section, article, render_issue
from newsletter.social import decorate

GOLDEN = Path(__file__).parent / "golden"
DATE = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def entry(n: int, summary: str = "", **kw: object) -> StoredEntry:
    fields: dict[str, object] = {
        "id": n,
        "feed_url": "https://blog.example.org/feed.xml",
        "title": f"Article number {n}",
        "link": f"https://blog.example.org/posts/{n}",
        "summary_html": summary
        or f"<p>The summary of article {n}, with <a href='https://x.example/{n}'>a link</a>.</p>",
        "author": "Ana Ruiz",
        "published": datetime(2026, 11, 20, 12, n % 60, tzinfo=UTC),
        "image_url": "",
        "categories": ["Email"],
        "first_seen": DATE,
    }
    fields.update(kw)
    return StoredEntry(**fields)  # type: ignore[arg-type]


SCHEDULE = Schedule.model_validate(
    {
        "feeds": ["https://blog.example.org/feed.xml"],
        "subscribers": "readers",
        "sender": "mail",
        "from": "Example Weekly <news@example.org>",
        "unsubscribe_url": "https://news.example.org/u/{token}",
        "utm": {"source": "example-weekly"},
        "share": {
            "networks": ["x", "mastodon", "bluesky", "linkedin", "email"],
            "mastodon_instance": "mastodon.social",
        },
    }
)


def render(
    entries: list[StoredEntry], sections: int = 1, excerpt_chars: int = 600, shared: bool = False
) -> tuple[str, str, str]:
    secs = [Section(f"Feed {i}", f"https://feed{i}.example.org/") for i in range(sections)]
    for i, e in enumerate(entries):
        a = article(e, secs[i % sections].title, excerpt_chars)
        if shared:
            decorate(a, SCHEDULE, "weekly", 7)
        secs[i % sections].articles.append(a)
    rendered = render_issue(
        templates_dir=None,
        title="Example Weekly",
        subject_template="{{ title }} #{{ issue.number }}: {{ issue.top_title }}",
        number=7,
        date=DATE,
        sections=secs,
    )
    # The placeholder prefix is random per issue; pin it so the golden file is stable.
    norm = lambda s: s.replace(rendered.prefix, "NLTOKEN")  # noqa: E731
    return rendered.subject, norm(rendered.html), norm(rendered.text)


def check_golden(name: str, actual: str, request: pytest.FixtureRequest) -> None:
    path = GOLDEN / name
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"{path} missing: run pytest --update-golden and review the file"
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True), str(path), "rendered"
            )
        )
        pytest.fail(f"{name} differs from the golden file (pytest --update-golden rewrites it):\n{diff}")


def test_golden_digest_html_and_text(request: pytest.FixtureRequest) -> None:
    entries = [
        entry(3, image_url="https://blog.example.org/img/3.png"),
        entry(2, author=""),
        entry(1, summary="<p>A <strong>bold</strong> claim &amp; a <code>code</code> sample.</p>"),
    ]
    subject, html, text = render(entries, shared=True)
    assert subject == "Example Weekly #7: Article number 3"
    check_golden("digest.html", html, request)
    check_golden("digest.txt", text, request)


def test_golden_digest_with_sections(request: pytest.FixtureRequest) -> None:
    _, html, text = render([entry(4), entry(3), entry(2), entry(1)], sections=2)
    check_golden("digest-sections.html", html, request)
    check_golden("digest-sections.txt", text, request)


HOSTILE = (
    '<p onclick="steal()">Hello<script>alert(1)</script></p>'
    '<img src="https://x.example/a.png" onerror="steal()" alt="a">'
    '<a href="javascript:alert(1)">js link</a>'
    '<a href="JaVaScRiPt:alert(1)">js link 2</a>'
    '<form action="https://evil.example/"><input name="pw"></form>'
    '<iframe src="https://evil.example/"></iframe>'
    '<img src="https://track.example/p.gif" width="1" height="1">'
    '<img src="https://track.example/q.gif" width="0" height="0" alt="">'
    "<style>body{display:none}</style>"
    '<object data="x.swf"></object><embed src="x.swf">'
    '<a href="data:text/html;base64,PHNjcmlwdD4=">data link</a>'
    '<svg onload="steal()"><circle r="1"/></svg>'
)


def test_feed_html_is_sanitised_before_it_reaches_the_email() -> None:
    _, html, text = render([entry(1, summary=HOSTILE)])
    lowered = html.lower()
    for bad in (
        "<script",
        "onclick",
        "onerror",
        "onload",
        "javascript:",
        "<form",
        "<input",
        "<iframe",
        "track.example",
        "<object",
        "<embed",
        "data:text",
        "<svg",
        "display:none}",
    ):
        assert bad not in lowered, bad
    assert "Hello" in html and "https://x.example/a.png" in html
    assert "alert(1)" not in text and "steal" not in text


def test_feed_text_never_acts_as_template_code() -> None:
    e = entry(1, title="{{ 7*7 }} {% if true %}yes{% endif %}", summary="<p>{{ config }} {{ 6*6 }}</p>")
    subject, html, text = render([e])
    assert "{{ 7*7 }}" in subject and "49" not in subject
    assert "{{ 7*7 }}" in html and "{{ 6*6 }}" in html and "36" not in html
    assert "{{ 6*6 }}" in text


def test_layout_is_email_safe() -> None:
    _, html, _ = render([entry(1)])
    widths = [int(w) for w in re.findall(r'width="(\d+)"', html)]
    assert max(widths) <= 600
    assert 'class="preheader"' in html and "mso-hide:all" in html
    style = re.search(r"<style[^>]*>(.*?)</style>", html, re.S)
    assert style, "the @media rules must stay in a <style> block"
    assert "prefers-color-scheme: dark" in style.group(1)
    assert "max-width: 620px" in style.group(1)
    assert "!important" in style.group(1)
    # Inlined: the article cell carries its styles itself, for clients that drop <style>.
    assert re.search(r'<td class="article" style=["\'][^>]*font-size:16px', html)
    assert "<script" not in html.lower()


def test_images_have_alt_text_and_size() -> None:
    _, html, _ = render([entry(1, image_url="https://blog.example.org/i.png")])
    img = re.search(r"<img [^>]*src=\"https://blog.example.org/i.png\"[^>]*>", html)
    assert img and 'alt="Article number 1"' in img.group(0) and 'width="560"' in img.group(0)


def test_default_max_articles_of_long_posts_stays_under_gmail_clipping() -> None:
    long_post = (
        "<p>"
        + " ".join(["A long paragraph of text with <a href='https://x.example/'>links</a>."] * 200)
        + "</p>"
    )
    entries = [entry(n, summary=long_post, title="A title of a reasonable length " * 3) for n in range(20)]
    secs = [Section("Feed", "")]
    secs[0].articles = [article(e, "Feed", 600) for e in entries]
    rendered = render_issue(
        templates_dir=None,
        title="Example Weekly",
        subject_template="{{ title }}",
        number=1,
        date=DATE,
        sections=secs,
    )
    assert rendered.html_bytes < GMAIL_CLIP_BYTES
    assert not rendered.clipped


def test_long_summary_becomes_an_excerpt_cut_on_a_word() -> None:
    a = article(entry(1, summary="<p>" + "word " * 500 + "</p>"), "Feed", 100)
    assert a.summary_text.endswith("…") and len(a.summary_text) <= 101
    assert a.summary_text[:-1].split()[-1] == "word"


def test_user_templates_override_the_bundled_ones(tmp_path: Path) -> None:
    (tmp_path / "footer.html").write_text("<p>Custom footer for {{ subscriber.city }}</p>", encoding="utf-8")
    secs = [Section("Feed", "")]
    secs[0].articles = [article(entry(1), "Feed", 600)]
    rendered = render_issue(
        templates_dir=tmp_path, title="T", subject_template="{{ title }}", number=1, date=DATE, sections=secs
    )
    assert "Custom footer for" in rendered.html
    assert "city" in rendered.fields and "unsubscribe_url" in rendered.fields


def test_images_floated_by_a_custom_stylesheet_get_align_for_outlook(tmp_path: Path) -> None:
    # Outlook ignores CSS float; premailer turns it into align=, which must survive the shortcut
    # that skips the search when nothing floats.
    bundled = Path(render_issue.__code__.co_filename).parent / "templates" / "styles.html"
    styles = bundled.read_text(encoding="utf-8").replace(".article-image {", ".article-image { float: left;")
    (tmp_path / "styles.html").write_text(styles, encoding="utf-8")
    secs = [Section("Feed", "")]
    secs[0].articles = [article(entry(1, image_url="https://img.example.org/1.png"), "Feed", 600)]

    def image_tag(templates: Path | None) -> str:
        html = render_issue(
            templates_dir=templates, title="T", subject_template="T", number=1, date=DATE, sections=secs
        ).html
        return re.search(r'<img[^>]*src="https://img.example.org/1.png"[^>]*>', html)[0]  # type: ignore[index]

    assert 'align="left"' in image_tag(tmp_path)
    assert "align=" not in image_tag(None)


@pytest.mark.parametrize(
    "link", ["javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,x", "file:///etc/passwd"]
)
def test_an_entry_link_that_is_not_http_is_shown_without_a_link(link: str) -> None:
    _, html, text = render([entry(1, link=link, image_url="javascript:alert(2)")])
    assert "javascript:" not in html.lower() and "data:text" not in html and "file:" not in html
    assert "Article number 1" in html and "Read:" not in text


def test_preheader_is_hidden_without_tiny_fonts() -> None:
    _, html, text = render([entry(1), entry(2)])
    found = re.search(r'<div class="preheader" style="([^"]*)"[^>]*>(.*?)</div>', html, re.S)
    assert found and "Article number 2" in found.group(2)
    style = {k.strip(): v.strip() for k, v in (d.split(":", 1) for d in found.group(1).split(";") if d)}
    # SpamAssassin HTML_FONT_TINY_NORDNS scores text in a 1 px font; hide it the other ways.
    assert "font-size" not in style and "line-height" not in style
    assert not re.search(r"font-size:\s*[0-2](\.\d+)?(px|pt)?\s*[;\"'!]", html)
    assert style["display"] == "none" and style["max-height"] == "0" and style["opacity"] == "0"
    assert style["overflow"] == "hidden" and style["mso-hide"] == "all"
    assert "͏" not in text  # the preheader's padding is no part of the text part
