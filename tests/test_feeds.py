"""Fetching and parsing feeds, for real: HTTP on 127.0.0.1, files on disk, state in SQLite.

Nothing is mocked. Where conftest's Route cannot say something (no Content-Length, a body cut
short, a body that trickles in, a 304 on If-Modified-Since, requests that must overlap), a small
scripted server below answers with a function instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import FeedServer, Project, Route, free_port, item, rss
from newsletter.config import FetchSettings
from newsletter.feeds import fetch_all, fetch_feed, first_fetch_history, parse_feed
from newsletter.model import FeedEntry, FeedState, FetchResult
from newsletter.store import Store

# Every test is bounded: nothing here should take more than a few seconds.
pytestmark = pytest.mark.timeout(20)

SETTINGS = FetchSettings(timeout=5, first_fetch_newest=50)
RSS_TYPE = "application/rss+xml; charset=utf-8"
ATOM_TYPE = "application/atom+xml; charset=utf-8"
JSON_TYPE = "application/feed+json; charset=utf-8"
# 2026-01-02 03:04:05 at +02:00, the instant every dated sample below was published.
PUBLISHED = datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)


# -- a scripted HTTP server for what Route cannot say ------------------------------------------

Answer = Callable[[BaseHTTPRequestHandler], None]


class ScriptedServer:
    """An HTTP/1.0 server on 127.0.0.1 whose paths are answered by functions of the request."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                answer = server.answers.get(self.path)
                if answer is None:
                    self.send_error(404)
                    return
                # OSError: the client hung up, which is what some of these answers provoke.
                with contextlib.suppress(OSError):
                    answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def hits(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def without_length(body: bytes) -> Answer:
    """200 with no Content-Length: the body ends when the connection closes."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", RSS_TYPE)
        h.end_headers()
        h.wfile.write(body)

    return answer


def cut_short(body: bytes) -> Answer:
    """Promise the whole body in Content-Length, send half of it, hang up."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", RSS_TYPE)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])

    return answer


def trickle(closing: threading.Event) -> Answer:
    """Answer at once, then send a byte every 50 ms for up to 30 s: every read is quick, the
    download never ends. Only a deadline for the whole download stops it."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", RSS_TYPE)
        h.send_header("Content-Length", "1000000")
        h.end_headers()
        end = time.monotonic() + 30
        while time.monotonic() < end and not closing.is_set():
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.05)

    return answer


def last_modified(body: bytes, stamp: str) -> Answer:
    """200 with Last-Modified, or 304 when If-Modified-Since names that very stamp."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("If-Modified-Since") == stamp:
            h.send_response(304)
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Content-Type", RSS_TYPE)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Last-Modified", stamp)
        h.end_headers()
        h.wfile.write(body)

    return answer


def after_barrier(body: bytes, barrier: threading.Barrier) -> Answer:
    """Answer only once every party of the barrier is in flight at the same time, else 503."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            h.send_error(503, "requests did not overlap")
            return
        h.send_response(200)
        h.send_header("Content-Type", RSS_TYPE)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return answer


# -- the state database -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


def poll(store: Store, url: str, settings: FetchSettings = SETTINGS) -> tuple[FetchResult, int]:
    """One fetch of one feed the way `newsletter fetch` does it: state in, result recorded."""
    result = fetch_feed(store.feed_state(url), settings)
    history = first_fetch_history(result.entries, settings.first_fetch_newest, settings.first_fetch_days)
    new = store.record_fetch(result, history)
    return result, new


def titles(store: Store, url: str) -> list[str]:
    """Titles of the stored entries that may be mailed (history excluded), newest first."""
    return [e.title for e in store.new_entries([url], 0, store.max_entry_id(), 1000)]


def ago(days: float) -> str:
    return format_datetime(datetime.now(UTC) - timedelta(days=days))


# -- parsing the five formats ---------------------------------------------------------------------

RSS_091 = b"""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE rss PUBLIC "-//Netscape Communications//DTD RSS 0.91//EN"
  "http://my.netscape.com/publish/formats/rss-0.91.dtd">
<rss version="0.91"><channel>
  <title>Old School</title><link>https://old.test/</link><description>d</description>
  <language>en</language>
  <item>
    <title>Tea &amp; biscuits</title>
    <link>https://old.test/tea</link>
    <description>&lt;p&gt;Hello &lt;b&gt;world&lt;/b&gt;&lt;/p&gt;</description>
  </item>
</channel></rss>"""

RSS_10 = b"""<?xml version="1.0" encoding="utf-8"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
         xmlns="http://purl.org/rss/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel rdf:about="https://rdf.test/">
    <title>Resource Description</title><link>https://rdf.test/</link><description>d</description>
    <items><rdf:Seq><rdf:li rdf:resource="https://rdf.test/tea"/></rdf:Seq></items>
  </channel>
  <item rdf:about="https://rdf.test/tea">
    <title>Tea &amp; biscuits</title>
    <link>https://rdf.test/tea</link>
    <description>&lt;p&gt;Hello &lt;b&gt;world&lt;/b&gt;&lt;/p&gt;</description>
    <dc:date>2026-01-02T03:04:05+02:00</dc:date>
    <dc:creator>Jane Doe</dc:creator>
    <dc:subject>Science</dc:subject>
  </item>
</rdf:RDF>"""

RSS_20 = b"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel>
  <title>Two Point Oh</title><link>https://two.test/</link><description>d</description>
  <item>
    <title>Tea &amp; biscuits</title>
    <link>https://two.test/tea</link>
    <guid isPermaLink="false">two-1</guid>
    <description><![CDATA[<p>Hello <b>world</b></p>]]></description>
    <pubDate>Fri, 02 Jan 2026 03:04:05 +0200</pubDate>
    <category>News</category>
    <category>Tech</category>
    <author>jane@two.test (Jane Doe)</author>
  </item>
</channel></rss>"""

ATOM_10 = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Atomic</title><link href="https://atom.test/"/><id>urn:atom</id>
  <updated>2026-01-03T00:00:00Z</updated>
  <entry>
    <title>Tea &amp; biscuits</title>
    <link rel="alternate" href="https://atom.test/tea"/>
    <id>urn:atom:tea</id>
    <published>2026-01-02T03:04:05+02:00</published>
    <updated>2026-01-03T00:00:00Z</updated>
    <summary type="html">&lt;p&gt;Hello &lt;b&gt;world&lt;/b&gt;&lt;/p&gt;</summary>
    <category term="News"/><category term="Tech"/>
    <author><name>Jane Doe</name></author>
  </entry>
</feed>"""

JSON_11 = json.dumps(
    {
        "version": "https://jsonfeed.org/version/1.1",
        "title": "Jason",
        "home_page_url": "https://json.test/",
        "items": [
            {
                "id": "json-1",
                "url": "https://json.test/tea",
                "title": "Tea & biscuits",
                "content_html": "<p>Hello <b>world</b></p>",
                "date_published": "2026-01-02T03:04:05+02:00",
                "tags": ["News", "Tech"],
                "authors": [{"name": "Jane Doe"}],
            }
        ],
    }
).encode()

# (document, content type, feed title, feed link, (title, link, summary, published, categories, author))
FORMATS = [
    pytest.param(
        RSS_091,
        RSS_TYPE,
        "Old School",
        "https://old.test/",
        ("Tea & biscuits", "https://old.test/tea", "<p>Hello <b>world</b></p>", None, [], ""),
        id="rss-0.91",
    ),
    pytest.param(
        RSS_10,
        "application/rdf+xml",
        "Resource Description",
        "https://rdf.test/",
        (
            "Tea & biscuits",
            "https://rdf.test/tea",
            "<p>Hello <b>world</b></p>",
            PUBLISHED,
            ["Science"],
            "Jane Doe",
        ),
        id="rss-1.0-rdf",
    ),
    pytest.param(
        RSS_20,
        RSS_TYPE,
        "Two Point Oh",
        "https://two.test/",
        (
            "Tea & biscuits",
            "https://two.test/tea",
            "<p>Hello <b>world</b></p>",
            PUBLISHED,
            ["News", "Tech"],
            "Jane Doe",
        ),
        id="rss-2.0",
    ),
    pytest.param(
        ATOM_10,
        ATOM_TYPE,
        "Atomic",
        "https://atom.test/",
        (
            "Tea & biscuits",
            "https://atom.test/tea",
            "<p>Hello <b>world</b></p>",
            PUBLISHED,
            ["News", "Tech"],
            "Jane Doe",
        ),
        id="atom-1.0",
    ),
    pytest.param(
        JSON_11,
        JSON_TYPE,
        "Jason",
        "https://json.test/",
        (
            "Tea & biscuits",
            "https://json.test/tea",
            "<p>Hello <b>world</b></p>",
            PUBLISHED,
            ["News", "Tech"],
            "Jane Doe",
        ),
        id="json-feed-1.1",
    ),
]


def _fields(e: FeedEntry) -> tuple[Any, ...]:
    return (e.title, e.link, e.summary_html, e.published, e.categories, e.author)


@pytest.mark.parametrize(("doc", "content_type", "feed_title", "feed_link", "want"), FORMATS)
def test_each_format_over_http_becomes_entries(
    feed_server: FeedServer,
    doc: bytes,
    content_type: str,
    feed_title: str,
    feed_link: str,
    want: tuple[Any, ...],
) -> None:
    feed_server.routes["/feed"] = Route(doc, content_type=content_type)
    result = fetch_feed(FeedState(feed_server.url("/feed")), SETTINGS)
    assert result.status == "ok", result.error
    assert (result.title, result.link) == (feed_title, feed_link)
    assert [_fields(e) for e in result.entries] == [want]


@pytest.mark.parametrize(("doc", "content_type", "feed_title", "feed_link", "want"), FORMATS)
def test_each_format_from_a_local_file_becomes_entries(
    tmp_path: Path, doc: bytes, content_type: str, feed_title: str, feed_link: str, want: tuple[Any, ...]
) -> None:
    # No Content-Type from a file: the format is recognised from the document itself.
    path = tmp_path / "feed"
    path.write_bytes(doc)
    result = fetch_feed(FeedState(path.as_uri()), SETTINGS)
    assert result.status == "ok", result.error
    assert (result.title, result.link) == (feed_title, feed_link)
    assert [_fields(e) for e in result.entries] == [want]


def test_a_json_feed_served_as_text_plain_is_still_a_json_feed(feed_server: FeedServer) -> None:
    feed_server.routes["/feed.json"] = Route(JSON_11, content_type="text/plain; charset=utf-8")
    result = fetch_feed(FeedState(feed_server.url("/feed.json")), SETTINGS)
    assert result.status == "ok", result.error
    assert [e.title for e in result.entries] == ["Tea & biscuits"]


def test_json_feed_variants_content_text_author_10_and_date_modified() -> None:
    doc = json.dumps(
        {
            "version": "https://jsonfeed.org/version/1",
            "title": "J",
            "items": [
                {
                    "id": 7,  # numbers are common in the wild
                    "url": "https://json.test/7",
                    "content_text": "a < b",
                    "author": {"name": "Old Style"},
                    "date_modified": "2026-01-02T01:04:05Z",
                }
            ],
        }
    ).encode()
    [entry] = parse_feed(doc, JSON_TYPE, "").entries
    assert entry.summary_html == "<p>a &lt; b</p>"
    assert entry.author == "Old Style"
    assert entry.published == PUBLISHED


@pytest.mark.parametrize(
    "title",
    [
        pytest.param('<title type="html">Tea &amp;amp; &lt;em&gt;biscuits&lt;/em&gt;</title>', id="html"),
        pytest.param('<title type="html"><![CDATA[Tea &amp; <em>biscuits</em>]]></title>', id="html-cdata"),
        pytest.param(
            '<title type="xhtml"><div xmlns="http://www.w3.org/1999/xhtml">'
            "Tea &amp; <em>biscuits</em></div></title>",
            id="xhtml",
        ),
    ],
)
def test_an_atom_title_marked_up_as_html_becomes_plain_text(title: str) -> None:
    # RFC 4287 3.1: these all say "Tea & biscuits". The title is used as plain text: in the
    # subject line, in the text part, and escaped again in the HTML part.
    doc = (
        '<feed xmlns="http://www.w3.org/2005/Atom"><title>A</title><id>urn:a</id>'
        "<updated>2026-01-02T00:00:00Z</updated>"
        f'<entry>{title}<id>urn:a:1</id><link href="https://atom.test/1"/>'
        "<updated>2026-01-02T00:00:00Z</updated></entry></feed>"
    ).encode()
    [entry] = parse_feed(doc, ATOM_TYPE, "").entries
    assert entry.title == "Tea & biscuits"


def test_an_atom_entry_without_published_is_dated_by_updated() -> None:
    doc = b"""<feed xmlns="http://www.w3.org/2005/Atom"><title>A</title><id>urn:a</id>
      <updated>2026-01-02T01:04:05Z</updated>
      <entry><title>Only updated</title><id>urn:a:1</id><link href="https://atom.test/1"/>
        <updated>2026-01-02T01:04:05Z</updated><content type="html">&lt;p&gt;C&lt;/p&gt;</content></entry>
    </feed>"""
    [entry] = parse_feed(doc, ATOM_TYPE, "").entries
    assert entry.published == PUBLISHED
    assert entry.summary_html == "<p>C</p>"


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(
            b"""<feed xmlns="http://www.w3.org/2005/Atom"><title>A</title><id>urn:a</id>
              <updated>2026-01-02T01:04:05Z</updated><author><name>Feed Author</name></author>
              <entry><title>E</title><id>urn:a:1</id><link href="https://atom.test/1"/>
                <updated>2026-01-02T01:04:05Z</updated></entry>
            </feed>""",
            id="atom-feed-author",  # RFC 4287 4.2.1: the feed's authors apply to the entry
        ),
        pytest.param(
            json.dumps(
                {
                    "version": "https://jsonfeed.org/version/1.1",
                    "title": "J",
                    "authors": [{"name": "Feed Author"}],
                    "items": [{"id": "1", "url": "https://json.test/1", "content_text": "x"}],
                }
            ).encode(),
            id="json-feed-authors",  # JSON Feed 1.1: top-level authors are the items' authors
        ),
    ],
)
def test_an_entry_without_its_own_author_has_the_feeds_author(doc: bytes) -> None:
    [entry] = parse_feed(doc, "", "").entries
    assert entry.author == "Feed Author"


# -- identity and dedupe --------------------------------------------------------------------------

IDENTITY = [
    pytest.param(
        [{"guid": "g1", "link": "https://blog.test/a", "title": "Old title", "description": "x"}],
        [{"guid": "g1", "link": "https://blog.test/a-moved", "title": "New title", "description": "y"}],
        0,
        id="guid-kept-link-and-title-edited-same-entry",
    ),
    pytest.param(
        [{"guid": "g1", "link": "https://blog.test/a", "title": "A", "description": "x"}],
        [{"guid": "g2", "link": "https://blog.test/a", "title": "A", "description": "x"}],
        1,
        id="guid-changed-same-link-new-entry",
    ),
    pytest.param(
        [{"link": "https://blog.test/a", "title": "Old title", "description": "x"}],
        [{"link": "https://blog.test/a", "title": "New title", "description": "y"}],
        0,
        id="no-guid-same-link-edited-same-entry",
    ),
    pytest.param(
        [{"link": "https://blog.test/a", "title": "A", "description": "x"}],
        [{"link": "https://blog.test/b", "title": "A", "description": "x"}],
        1,
        id="no-guid-other-link-new-entry",
    ),
    pytest.param(
        [{"title": "A", "description": "x"}],
        [{"title": "A", "description": "x"}],
        0,
        id="no-guid-no-link-same-content-same-entry",
    ),
    pytest.param(
        [{"title": "A", "description": "x"}],
        [{"title": "A", "description": "y"}],
        1,
        id="no-guid-no-link-other-content-new-entry",
    ),
]


@pytest.mark.parametrize(("first", "second", "new_on_second"), IDENTITY)
def test_entry_identity_is_guid_else_link_else_content(
    feed_server: FeedServer,
    store: Store,
    first: list[dict[str, str]],
    second: list[dict[str, str]],
    new_on_second: int,
) -> None:
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(rss(first))
    assert poll(store, url)[1] == 1
    feed_server.routes["/feed.xml"] = Route(rss(second))
    result, new = poll(store, url)
    assert result.status == "ok", result.error
    assert new == new_on_second
    assert len(titles(store, url)) == 1 + new_on_second


def test_the_same_entries_fetched_twice_are_stored_once(feed_server: FeedServer, store: Store) -> None:
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2), item(3)]))
    assert poll(store, url)[1] == 3
    assert poll(store, url)[1] == 0
    assert titles(store, url) == ["Post 3", "Post 2", "Post 1"]


@pytest.mark.parametrize(
    "strip",
    [pytest.param(("guid",), id="links-only"), pytest.param(("guid", "link"), id="no-guid-no-link")],
)
def test_a_feed_without_guids_keeps_its_dedupe_when_items_are_reordered(
    feed_server: FeedServer, store: Store, strip: tuple[str, ...]
) -> None:
    def items(*ns: int) -> list[dict[str, str]]:
        return [{k: v for k, v in item(n).items() if k not in strip} for n in ns]

    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(rss(items(3, 2, 1)))
    assert poll(store, url)[1] == 3
    feed_server.routes["/feed.xml"] = Route(rss(items(1, 3, 2)))
    assert poll(store, url)[1] == 0
    feed_server.routes["/feed.xml"] = Route(rss(items(2, 4, 1, 3)))
    assert poll(store, url)[1] == 1
    assert sorted(titles(store, url)) == ["Post 1", "Post 2", "Post 3", "Post 4"]


# -- relative links --------------------------------------------------------------------------------


def test_relative_links_over_http_resolve_against_the_feed_url(feed_server: FeedServer) -> None:
    doc = b"""<?xml version="1.0" encoding="utf-8"?>
    <rss version="2.0"><channel><title>R</title><link>/</link><description>d</description>
      <item><title>Root</title><link>/posts/1</link><guid isPermaLink="false">1</guid>
        <enclosure url="/img/1.png" type="image/png" length="1"/></item>
      <item><title>Sibling</title><link>posts/2</link><guid isPermaLink="false">2</guid></item>
      <item><title>Absolute</title><link>https://elsewhere.test/3</link>
        <guid isPermaLink="false">3</guid></item>
    </channel></rss>"""
    feed_server.routes["/blog/feed.xml"] = Route(doc)
    result = fetch_feed(FeedState(feed_server.url("/blog/feed.xml")), SETTINGS)
    assert result.status == "ok", result.error
    assert [e.link for e in result.entries] == [
        feed_server.url("/posts/1"),
        feed_server.url("/blog/posts/2"),
        "https://elsewhere.test/3",
    ]
    assert result.entries[0].image_url == feed_server.url("/img/1.png")


def test_atom_xml_base_wins_over_the_document_url(feed_server: FeedServer) -> None:
    doc = b"""<?xml version="1.0" encoding="utf-8"?>
    <feed xmlns="http://www.w3.org/2005/Atom" xml:base="https://example.org/blog/">
      <title>Based</title><id>urn:b</id><updated>2026-01-02T00:00:00Z</updated>
      <entry><title>One</title><id>urn:b:1</id><updated>2026-01-02T00:00:00Z</updated>
        <link href="posts/1"/></entry>
      <entry xml:base="https://cdn.example.net/archive/"><title>Two</title><id>urn:b:2</id>
        <updated>2026-01-01T00:00:00Z</updated><link href="2"/></entry>
    </feed>"""
    feed_server.routes["/atom.xml"] = Route(doc, content_type=ATOM_TYPE)
    result = fetch_feed(FeedState(feed_server.url("/atom.xml")), SETTINGS)
    assert result.status == "ok", result.error
    assert [e.link for e in result.entries] == [
        "https://example.org/blog/posts/1",
        "https://cdn.example.net/archive/2",
    ]


def test_relative_links_in_a_local_file_resolve_against_the_channel_link(tmp_path: Path) -> None:
    doc = b"""<?xml version="1.0" encoding="utf-8"?>
    <rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/"><channel>
      <title>Local</title><link>https://blog.example.org/</link><description>d</description>
      <item><title>One</title><link>/posts/one</link><guid isPermaLink="false">1</guid>
        <media:content url="img/one.png" medium="image"/></item>
    </channel></rss>"""
    path = tmp_path / "feed.xml"
    path.write_bytes(doc)
    result = fetch_feed(FeedState(path.as_uri()), SETTINGS)
    assert result.status == "ok", result.error
    [entry] = result.entries
    assert entry.link == "https://blog.example.org/posts/one"
    assert entry.image_url == "https://blog.example.org/img/one.png"


def test_relative_json_feed_urls_resolve_against_the_feed_url(feed_server: FeedServer) -> None:
    doc = json.dumps(
        {
            "version": "https://jsonfeed.org/version/1.1",
            "title": "J",
            "items": [{"id": "1", "url": "/p/1", "image": "img/1.png", "content_text": "x"}],
        }
    ).encode()
    feed_server.routes["/j/feed.json"] = Route(doc, content_type=JSON_TYPE)
    result = fetch_feed(FeedState(feed_server.url("/j/feed.json")), SETTINGS)
    assert result.status == "ok", result.error
    [entry] = result.entries
    assert (entry.link, entry.image_url) == (feed_server.url("/p/1"), feed_server.url("/j/img/1.png"))


# -- dates -----------------------------------------------------------------------------------------


def test_an_entry_without_a_date_is_dated_when_first_seen(feed_server: FeedServer, store: Store) -> None:
    url = feed_server.url("/feed.xml")
    undated = {"title": "Undated", "link": "https://blog.test/u", "guid": "u", "description": "x"}
    feed_server.routes["/feed.xml"] = Route(rss([undated, item(1)]))
    before = datetime.now(UTC).replace(microsecond=0)
    result, new = poll(store, url)
    after = datetime.now(UTC)
    assert new == 2
    assert [e.published for e in result.entries] == [None, datetime(2026, 1, 1, 1, tzinfo=UTC)]
    by_title = {e.title: e.published for e in store.new_entries([url], 0, store.max_entry_id(), 10)}
    assert before <= by_title["Undated"] <= after
    assert by_title["Post 1"] == datetime(2026, 1, 1, 1, tzinfo=UTC)


# -- images ----------------------------------------------------------------------------------------


def _rss_with(item_xml: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"'
        ' xmlns:media="http://search.yahoo.com/mrss/"><channel><title>I</title>'
        "<link>https://img.test/</link><description>d</description>"
        f'<item><title>T</title><link>https://img.test/t</link><guid isPermaLink="false">t</guid>'
        f"{item_xml}</item></channel></rss>"
    ).encode()


def _json_with(item: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "version": "https://jsonfeed.org/version/1.1",
            "title": "J",
            "items": [{"id": "1", "url": "https://img.test/t", "content_text": "x", **item}],
        }
    ).encode()


IMAGES = [
    pytest.param(
        _rss_with('<enclosure url="https://img.test/e.jpg" type="image/jpeg" length="9"/>'),
        "https://img.test/e.jpg",
        id="rss-image-enclosure",
    ),
    pytest.param(
        _rss_with('<enclosure url="https://img.test/e.mp3" type="audio/mpeg" length="9"/>'),
        "",
        id="rss-audio-enclosure-is-no-image",
    ),
    pytest.param(
        _rss_with('<media:content url="https://img.test/m.png" medium="image"/>'),
        "https://img.test/m.png",
        id="media-content-medium-image",
    ),
    pytest.param(
        _rss_with('<media:content url="https://img.test/m.webp" type="image/webp"/>'),
        "https://img.test/m.webp",
        id="media-content-image-type",
    ),
    pytest.param(
        _rss_with('<media:thumbnail url="https://img.test/thumb.jpg"/>'),
        "https://img.test/thumb.jpg",
        id="media-thumbnail",
    ),
    pytest.param(
        _rss_with(
            '<media:content url="https://img.test/v.mp4" medium="video"/>'
            '<media:thumbnail url="https://img.test/poster.jpg"/>'
        ),
        "https://img.test/poster.jpg",
        id="video-with-thumbnail-gives-the-thumbnail",
    ),
    pytest.param(
        b"""<feed xmlns="http://www.w3.org/2005/Atom"><title>A</title><id>urn:a</id>
          <updated>2026-01-02T00:00:00Z</updated><entry><title>T</title><id>urn:a:1</id>
          <updated>2026-01-02T00:00:00Z</updated><link href="https://img.test/t"/>
          <link rel="enclosure" type="image/png" href="https://img.test/atom.png"/></entry></feed>""",
        "https://img.test/atom.png",
        id="atom-enclosure-link",
    ),
    pytest.param(_json_with({"image": "https://img.test/j.png"}), "https://img.test/j.png", id="json-image"),
    pytest.param(
        _json_with({"attachments": [{"url": "https://img.test/att.gif", "mime_type": "image/gif"}]}),
        "https://img.test/att.gif",
        id="json-image-attachment",
    ),
    pytest.param(_rss_with(""), "", id="none"),
]


@pytest.mark.parametrize(("doc", "image"), IMAGES)
def test_the_image_of_an_entry(doc: bytes, image: str) -> None:
    [entry] = parse_feed(doc, "", "https://img.test/feed").entries
    assert entry.image_url == image


# -- conditional GET -------------------------------------------------------------------------------


def test_second_fetch_sends_if_none_match_and_a_304_is_not_modified(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]), etag='"v1"')

    first, new = poll(store, url)
    assert (first.status, first.etag, new) == ("ok", '"v1"', 1)

    second, new = poll(store, url)
    assert feed_server.hits("/feed.xml")[1].get("If-None-Match") == '"v1"'
    assert (second.status, second.entries, new) == ("not-modified", [], 0)

    # The validator survives a 304: the third fetch is conditional too.
    third, _ = poll(store, url)
    assert feed_server.hits("/feed.xml")[2].get("If-None-Match") == '"v1"'
    assert third.status == "not-modified"

    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), etag='"v2"')
    fourth, new = poll(store, url)
    assert (fourth.status, fourth.etag, new) == ("ok", '"v2"', 1)
    assert all(h.get("User-Agent") == SETTINGS.user_agent for h in feed_server.hits("/feed.xml"))


def test_second_fetch_sends_if_modified_since_and_a_304_is_not_modified(
    scripted: ScriptedServer, store: Store
) -> None:
    stamp = "Thu, 01 Jan 2026 00:00:00 GMT"
    scripted.answers["/feed.xml"] = last_modified(rss([item(1)]), stamp)
    url = scripted.url("/feed.xml")

    first, new = poll(store, url)
    assert (first.status, first.last_modified, new) == ("ok", stamp, 1)
    assert "If-Modified-Since" not in scripted.hits("/feed.xml")[0]

    second, new = poll(store, url)
    assert scripted.hits("/feed.xml")[1].get("If-Modified-Since") == stamp
    assert (second.status, second.entries, new) == ("not-modified", [], 0)


def test_an_unchanged_local_file_is_not_modified(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "feed.xml"
    path.write_bytes(rss([item(1)]))
    url = path.as_uri()

    assert poll(store, url)[0].status == "ok"
    second, new = poll(store, url)
    assert (second.status, second.entries, new) == ("not-modified", [], 0)

    path.write_bytes(rss([item(1), item(2)]))
    mtime = path.stat().st_mtime + 10  # a clearly different mtime, whatever the clock resolution
    os.utime(path, (mtime, mtime))
    third, new = poll(store, url)
    assert (third.status, new) == ("ok", 1)


# -- redirects ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "remembered"),
    [(301, True), (308, True), (302, False), (307, False)],
)
def test_only_a_permanent_redirect_is_remembered(
    feed_server: FeedServer, store: Store, code: int, remembered: bool
) -> None:
    old, new_url = feed_server.url("/old/feed.xml"), feed_server.url("/new/feed.xml")
    feed_server.routes["/old/feed.xml"] = Route(status=code, headers={"Location": new_url})
    feed_server.routes["/new/feed.xml"] = Route(
        rss([{"title": "Rel", "link": "posts/1", "guid": "r1", "description": "x"}])
    )

    first, _ = poll(store, old)
    assert first.status == "ok", first.error
    assert first.url == old  # the feed is still known by the URL in schedules.yaml
    assert first.fetch_url == (new_url if remembered else None)
    # Relative links resolve against where the document really came from.
    assert [e.link for e in first.entries] == [feed_server.url("/new/posts/1")]

    second, new = poll(store, old)
    assert (second.status, new) == ("ok", 0)
    assert len(feed_server.hits("/old/feed.xml")) == (1 if remembered else 2)
    assert len(feed_server.hits("/new/feed.xml")) == 2


def test_after_a_move_an_error_still_names_the_url_in_schedules_yaml(
    feed_server: FeedServer, store: Store
) -> None:
    old, new_url = feed_server.url("/old.xml"), feed_server.url("/new.xml")
    feed_server.routes["/old.xml"] = Route(status=301, headers={"Location": new_url})
    feed_server.routes["/new.xml"] = Route(rss([item(1)]))
    assert poll(store, old)[0].fetch_url == new_url

    feed_server.routes["/new.xml"] = Route(b"", status=410)
    result, _ = poll(store, old)
    assert result.status == "error"
    assert "gone" in result.error
    # The CLI prints only this message; the user has to find the feed in schedules.yaml.
    assert old in result.error


# -- errors: reported, never raised -------------------------------------------------------------------

ERRORS = [
    pytest.param(Route(b"boom", status=500), SETTINGS, "HTTP 500", id="http-500"),
    pytest.param(Route(b"", status=410), SETTINGS, "gone", id="http-410-gone"),
    pytest.param(Route(b"", status=404), SETTINGS, "HTTP 404", id="http-404"),
    pytest.param(Route(rss([item(1), item(2)])[:-60]), SETTINGS, "nothing stored", id="truncated-rss"),
    pytest.param(
        Route(ATOM_10[: ATOM_10.index(b"</entry>")], content_type=ATOM_TYPE),
        SETTINGS,
        "nothing stored",
        id="truncated-atom",
    ),
    pytest.param(
        Route(b"<html><body><p>Not here</p></body></html>", content_type="text/html"),
        SETTINGS,
        "not a feed",
        id="html-page",
    ),
    pytest.param(
        Route(JSON_11[:-20], content_type=JSON_TYPE), SETTINGS, "malformed JSON", id="truncated-json"
    ),
    pytest.param(
        Route(b'{"title": "no version"}', content_type="application/json"),
        SETTINGS,
        "not a JSON Feed",
        id="json-not-a-json-feed",
    ),
    pytest.param(
        Route(rss([item(n) for n in range(20)])),
        FetchSettings(timeout=5, max_bytes=1000),
        "1,000 byte cap",
        id="over-max-bytes-with-content-length",
    ),
    pytest.param(
        Route(rss([item(1)]), delay=2), FetchSettings(timeout=0.5), "0.5 s", id="slower-than-timeout"
    ),
]


@pytest.mark.parametrize(("route", "settings", "expected"), ERRORS)
def test_a_failed_fetch_is_an_error_naming_the_url_and_nothing_is_stored(
    feed_server: FeedServer, store: Store, route: Route, settings: FetchSettings, expected: str
) -> None:
    url = feed_server.url("/feed")
    feed_server.routes["/feed"] = route
    result, new = poll(store, url, settings)
    assert result.status == "error"
    assert url in result.error
    assert expected in result.error
    assert (result.entries, new, store.max_entry_id()) == ([], 0, 0)
    [row] = store.feeds([url])
    assert row.last_status == "error"
    assert url in row.last_error


def test_connection_refused_is_an_error(store: Store) -> None:
    url = f"http://127.0.0.1:{free_port()}/feed.xml"
    result, new = poll(store, url)
    assert result.status == "error"
    assert url in result.error
    assert "refused" in result.error.lower()
    assert new == 0


def test_a_missing_local_file_is_an_error(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere.xml").as_uri()
    result = fetch_feed(FeedState(url), SETTINGS)
    assert result.status == "error"
    assert url in result.error
    assert "cannot read" in result.error


def test_a_local_file_over_max_bytes_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    path.write_bytes(rss([item(n) for n in range(20)]))
    result = fetch_feed(FeedState(path.as_uri()), FetchSettings(max_bytes=1000))
    assert result.status == "error"
    assert "byte cap" in result.error


def test_a_body_over_max_bytes_without_content_length_is_refused(scripted: ScriptedServer) -> None:
    body = rss([item(n) for n in range(20)])
    assert len(body) > 1000
    scripted.answers["/big"] = without_length(body)
    scripted.answers["/small"] = without_length(rss([item(1)]))
    settings = FetchSettings(timeout=5, max_bytes=1000)

    big = fetch_feed(FeedState(scripted.url("/big")), settings)
    assert big.status == "error"
    assert scripted.url("/big") in big.error
    assert "1,000 byte cap" in big.error

    small = fetch_feed(FeedState(scripted.url("/small")), settings)
    assert small.status == "ok", small.error
    assert [e.title for e in small.entries] == ["Post 1"]


def test_a_body_cut_short_is_an_error_and_nothing_is_stored(scripted: ScriptedServer, store: Store) -> None:
    scripted.answers["/feed.xml"] = cut_short(rss([item(1), item(2), item(3)]))
    url = scripted.url("/feed.xml")
    result, new = poll(store, url)
    assert result.status == "error"
    assert url in result.error
    assert (new, store.max_entry_id()) == (0, 0)


@pytest.mark.timeout(10)
def test_a_body_that_trickles_in_is_cut_off_by_the_timeout(scripted: ScriptedServer) -> None:
    # FetchSettings.timeout is "seconds for the whole download of one feed". Every read here
    # succeeds within 50 ms; if only each read were bounded, this fetch would take 30 s and the
    # test would be stopped by its 10 s timeout.
    scripted.answers["/slow.xml"] = trickle(scripted.closing)
    url = scripted.url("/slow.xml")
    result = fetch_feed(FeedState(url), FetchSettings(timeout=0.5))
    assert result.status == "error"
    assert url in result.error


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"", id="ends-with-root"),
        pytest.param(b"\n<!-- cached by W3 Total Cache -->\n", id="comment-after-root"),
    ],
)
def test_a_complete_feed_with_a_recoverable_error_is_read_with_a_warning(
    feed_server: FeedServer, tail: bytes
) -> None:
    # &nbsp; is undefined in XML: a common slip that feedparser reads past. The document is
    # complete, so it must not be mistaken for a truncated one.
    doc = rss([item(1), item(2)]).replace(b"<title>Post 1</title>", b"<title>Post&nbsp;1</title>") + tail
    feed_server.routes["/feed.xml"] = Route(doc)
    result = fetch_feed(FeedState(feed_server.url("/feed.xml")), SETTINGS)
    assert result.status == "ok", result.error
    assert len(result.entries) == 2
    assert result.warning


def test_a_json_feed_with_wrongly_typed_fields_does_not_raise(feed_server: FeedServer) -> None:
    # fetch_feed promises never to raise; fetch_all would otherwise lose every feed of the round.
    bad = json.dumps(
        {
            "version": "https://jsonfeed.org/version/1.1",
            "title": "Odd",
            "items": [{"id": "1", "url": "https://odd.test/1", "content_text": "x", "tags": 5, "authors": 5}],
        }
    ).encode()
    feed_server.routes["/odd.json"] = Route(bad, content_type=JSON_TYPE)
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    odd_url, good_url = feed_server.url("/odd.json"), feed_server.url("/good.xml")
    odd, good = fetch_all([FeedState(odd_url), FeedState(good_url)], SETTINGS)
    assert good.status == "ok", good.error
    assert odd.status in ("ok", "error")
    if odd.status == "error":
        assert odd_url in odd.error


def test_an_error_keeps_what_was_stored_and_the_next_good_fetch_carries_on(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]), etag='"v1"')
    assert poll(store, url)[1] == 1
    feed_server.routes["/feed.xml"] = Route(b"down", status=503)
    assert poll(store, url)[1] == 0
    assert store.feeds([url])[0].consecutive_errors == 1
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), etag='"v2"')
    result, new = poll(store, url)
    assert (result.status, new) == ("ok", 1)
    assert titles(store, url) == ["Post 2", "Post 1"]
    assert store.feeds([url])[0].consecutive_errors == 0


# -- the first fetch of a feed ------------------------------------------------------------------------


def test_first_fetch_newest_counts_only_the_newest_and_later_entries_all_count(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    settings = FetchSettings(timeout=5, first_fetch_newest=2)
    # Document order is not date order: "newest" is by date.
    feed_server.routes["/feed.xml"] = Route(rss([item(3), item(5), item(1), item(4), item(2)]))
    assert poll(store, url, settings)[1] == 2
    assert titles(store, url) == ["Post 5", "Post 4"]

    # Later, everything that appears is new, even a backdated post.
    feed_server.routes["/feed.xml"] = Route(rss([item(n) for n in (8, 7, 6, 5, 4, 3, 2, 1, 0)]))
    assert poll(store, url, settings)[1] == 4
    assert titles(store, url) == ["Post 8", "Post 7", "Post 6", "Post 5", "Post 4", "Post 0"]


def test_a_first_fetch_that_failed_does_not_use_up_the_first_fetch_policy(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    settings = FetchSettings(timeout=5, first_fetch_newest=2)
    feed_server.routes["/feed.xml"] = Route(b"", status=500)
    assert poll(store, url, settings)[0].status == "error"
    feed_server.routes["/feed.xml"] = Route(rss([item(n) for n in range(1, 6)]))
    assert poll(store, url, settings)[1] == 2
    assert titles(store, url) == ["Post 5", "Post 4"]


def test_first_fetch_days_makes_older_entries_backlog(feed_server: FeedServer, store: Store) -> None:
    url = feed_server.url("/feed.xml")
    settings = FetchSettings(timeout=5, first_fetch_newest=50, first_fetch_days=3)
    entries = [
        {"title": "Yesterday", "link": "https://blog.test/1", "guid": "1", "date": ago(1)},
        {"title": "Two days ago", "link": "https://blog.test/2", "guid": "2", "date": ago(2)},
        {"title": "Last week", "link": "https://blog.test/7", "guid": "7", "date": ago(7)},
        {"title": "Last year", "link": "https://blog.test/365", "guid": "365", "date": ago(365)},
        {"title": "Undated", "link": "https://blog.test/u", "guid": "u"},  # dated when first seen
    ]
    feed_server.routes["/feed.xml"] = Route(rss(entries))
    assert poll(store, url, settings)[1] == 3
    assert sorted(titles(store, url)) == ["Two days ago", "Undated", "Yesterday"]

    later = {"title": "Old but new to us", "link": "https://blog.test/old", "guid": "old", "date": ago(30)}
    feed_server.routes["/feed.xml"] = Route(rss([*entries, later]))
    assert poll(store, url, settings)[1] == 1


# -- many feeds at once ---------------------------------------------------------------------------------


def test_fetch_all_fetches_slow_feeds_concurrently_and_keeps_their_order(feed_server: FeedServer) -> None:
    for n in range(5):
        feed_server.routes[f"/slow/{n}"] = Route(rss([item(n)]), delay=0.3)
    states = [FeedState(feed_server.url(f"/slow/{n}")) for n in range(5)]
    results = fetch_all(states, SETTINGS)
    assert [r.url for r in results] == [s.url for s in states]
    assert [r.status for r in results] == ["ok"] * 5, [r.error for r in results]
    assert [[e.title for e in r.entries] for r in results] == [[f"Post {n}"] for n in range(5)]


def test_fetch_all_has_all_requests_in_flight_at_once(scripted: ScriptedServer) -> None:
    # Each answer waits until all five requests have arrived; fetched one after another, the
    # barrier would time out and every feed would get a 503.
    barrier = threading.Barrier(5, timeout=5)
    for n in range(5):
        scripted.answers[f"/feed/{n}"] = after_barrier(rss([item(n)]), barrier)
    states = [FeedState(scripted.url(f"/feed/{n}")) for n in range(5)]
    results = fetch_all(states, FetchSettings(timeout=10, workers=5))
    assert [r.status for r in results] == ["ok"] * 5, [r.error for r in results]


def test_fetch_all_reports_each_feed_on_its_own(feed_server: FeedServer) -> None:
    feed_server.routes["/good.xml"] = Route(rss([item(1)]))
    feed_server.routes["/broken.xml"] = Route(b"", status=500)
    feed_server.routes["/good.json"] = Route(JSON_11, content_type=JSON_TYPE)
    refused = f"http://127.0.0.1:{free_port()}/feed.xml"
    urls = [
        feed_server.url("/good.xml"),
        feed_server.url("/broken.xml"),
        refused,
        feed_server.url("/good.json"),
    ]
    results = fetch_all([FeedState(u) for u in urls], SETTINGS)
    assert [(r.url, r.status) for r in results] == list(
        zip(urls, ["ok", "error", "error", "ok"], strict=True)
    )
    assert fetch_all([], SETTINGS) == []


def test_cli_fetch_stores_good_feeds_and_names_the_broken_ones(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/good.xml"] = Route(rss([item(1), item(2)]))
    feed_server.routes["/gone.xml"] = Route(b"", status=410)
    good, gone = feed_server.url("/good.xml"), feed_server.url("/gone.xml")
    refused = f"http://127.0.0.1:{free_port()}/feed.xml"
    project.setup([good, gone, refused])

    result = project.run("fetch")
    assert "3 feed(s), 2 new entries, 2 error(s)" in result.output
    assert gone in result.output and "gone" in result.output
    assert refused in result.output

    again = project.run("fetch")
    assert "3 feed(s), 0 new entries, 2 error(s)" in again.output


# -- one feed's trouble stays that feed's ----------------------------------------------------------


def _rss_ttl(ttl: str) -> bytes:
    return rss([item(1)]).replace(b"<description>d</description>", f"<ttl>{ttl}</ttl>".encode(), 1)


DEEP = 200_000
HOSTILE = [
    # (served body, content type, the error expected for that feed or None, its ttl once stored)
    pytest.param(
        b'{"version": "https://jsonfeed.org/version/1.1", "items": [' + b"[" * DEEP + b"]" * DEEP + b"]}",
        JSON_TYPE,
        "RecursionError",
        None,
        id="json-nested-200000-deep",
    ),
    pytest.param(_rss_ttl("²"), RSS_TYPE, None, None, id="ttl-superscript-two"),
    pytest.param(_rss_ttl("9" * 20), RSS_TYPE, None, 7 * 24 * 60, id="ttl-20-digits"),
    pytest.param(_rss_ttl("0"), RSS_TYPE, None, 1, id="ttl-zero"),
    pytest.param(
        # json.loads lets a lone surrogate through; SQLite cannot store it.
        json.dumps(
            {
                "version": "https://jsonfeed.org/version/1.1",
                "items": [{"id": "1", "url": "https://j.test/1", "title": "\ud800", "content_text": "x"}],
            }
        ).encode(),
        JSON_TYPE,
        "cannot store what the feed sent: UnicodeEncodeError",
        None,
        id="lone-surrogate-cannot-be-stored",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("body", "content_type", "error", "ttl"), HOSTILE)
def test_cli_fetch_with_one_hostile_feed_stores_the_others_and_names_it(
    project: Project,
    feed_server: FeedServer,
    body: bytes,
    content_type: str,
    error: str | None,
    ttl: int | None,
) -> None:
    feed_server.routes["/one.xml"] = Route(rss([item(1), item(2)]))
    feed_server.routes["/bad"] = Route(body, content_type=content_type)
    feed_server.routes["/two.json"] = Route(JSON_11, content_type=JSON_TYPE)
    one, bad, two = feed_server.url("/one.xml"), feed_server.url("/bad"), feed_server.url("/two.json")
    # The hostile feed in the middle: neither the feeds before it nor after it may suffer.
    project.setup([one, bad, two])

    done = project.run_process("fetch")
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert done.returncode == 0, out  # feed errors are reported, not a failed command
    store = Store(f"sqlite:///{project.root / 'state.db'}")
    try:
        assert titles(store, one) == ["Post 2", "Post 1"]
        assert titles(store, two) != []
        rows = {r.url: r for r in store.feeds()}
        if error is None:
            assert "0 error(s)" in done.stdout, out
            assert titles(store, bad) == ["Post 1"]
            assert rows[bad].ttl == ttl
        else:
            assert "1 error(s)" in done.stdout, out
            assert f"{bad}: " in done.stderr and error in done.stderr
            assert rows[bad].last_status == "error" and error in rows[bad].last_error
            assert titles(store, bad) == []
    finally:
        store.close()


def test_a_huge_ttl_stored_by_an_older_version_does_not_break_polling(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    url = feed_server.url("/feed.xml")
    project.setup([url])
    assert project.run("fetch").exit_code == 0
    db = sqlite3.connect(project.root / "state.db")
    db.execute("UPDATE feeds SET ttl = ?", (10**15,))  # fits SQLite, not a timedelta
    db.commit()
    db.close()
    store = Store(f"sqlite:///{project.root / 'state.db'}")
    try:
        [row] = store.feeds([url])
        assert row.ttl == 7 * 24 * 60
    finally:
        store.close()
    # The daemon's poll reads the stored ttl of every feed of every schedule.
    from newsletter.daemon import Daemon

    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    daemon = Daemon(str(project.config))
    daemon.poll_feeds()  # raised OverflowError on every poll, for every schedule
    status = project.run("status", "weekly")
    assert status.exit_code == 0, status.output


CONTROLS = "\x1b[31mA\x07B\x00C\r\nD\x9bE\x7f"


def test_control_characters_never_reach_the_store(feed_server: FeedServer, store: Store) -> None:
    doc = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": f"Feed {CONTROLS}",
        "home_page_url": "https://ctl.test/",
        "authors": [{"name": f"Ann {CONTROLS}"}],
        "items": [
            {
                "id": "1",
                "url": "https://ctl.test/1",
                "title": f"Entry {CONTROLS}",
                "tags": [f"Tag {CONTROLS}", "\x1b\x07"],
                "content_text": "x",
            },
            {"id": "2", "url": "https://ctl.test/2\x1b[2J", "title": "Bad link", "content_text": "y"},
        ],
    }
    url = feed_server.url("/feed.json")
    feed_server.routes["/feed.json"] = Route(json.dumps(doc).encode(), content_type=JSON_TYPE)
    result, new = poll(store, url)
    assert (result.status, new) == ("ok", 2), result.error
    [row] = store.feeds([url])
    first, second = store.new_entries([url], 0, store.max_entry_id(), 10)
    clean = "[31mA B C D E"
    assert row.title == f"Feed {clean}"
    assert first.title == f"Entry {clean}"
    assert first.author == f"Ann {clean}"
    assert first.categories == [f"Tag {clean}"]
    # A link with a control character in it is no link at all.
    assert (second.title, second.link) == ("Bad link", "")


def test_control_characters_in_an_rss_feed_never_reach_the_store(
    feed_server: FeedServer, store: Store
) -> None:
    raw = "T\x1b[2Jitle\x07 one\x00\r\nline\x9b"
    doc = rss(
        [{"title": raw, "link": "https://ctl.test/1", "guid": "1", "description": "x"}], title=f"Feed {raw}"
    ).replace(b"</item>", b"<author>a@b.test (Ann\x1b[5m)</author><category>C\x07at</category></item>")
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(doc)
    result, _ = poll(store, url)
    assert result.status == "ok", result.error
    [row] = store.feeds([url])
    [entry] = store.new_entries([url], 0, store.max_entry_id(), 10)
    stored = [row.title, entry.title, entry.author, *entry.categories]
    for text in stored:
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", text), repr(text)
    assert entry.title.startswith("T [2Jitle one")


# -- real-world feeds -----------------------------------------------------------------------------------


def test_relative_urls_inside_json_feed_html_resolve_against_the_item_url(feed_server: FeedServer) -> None:
    html = (
        '<p>See <a href="/misc/x.png">this</a>, <img src="img.png" alt="i">'
        ' and a note<sup><a href="#fn:1">1</a></sup>; <a href="https://else.test/">absolute</a>.</p>'
    )
    doc = {
        "version": "https://jsonfeed.org/version/1.1",
        "items": [
            {"id": "1", "url": "https://blog.test/posts/1/", "content_html": html},
            {"id": "2", "url": "https://blog.test/posts/2/", "summary": '<a href="../1/">earlier</a>'},
        ],
    }
    feed_server.routes["/feed.json"] = Route(json.dumps(doc).encode(), content_type=JSON_TYPE)
    result = fetch_feed(FeedState(feed_server.url("/feed.json")), SETTINGS)
    assert result.status == "ok", result.error
    first, second = (e.summary_html for e in result.entries)
    assert 'href="https://blog.test/misc/x.png"' in first
    assert 'src="https://blog.test/posts/1/img.png"' in first
    assert 'href="https://blog.test/posts/1/#fn:1"' in first
    assert 'href="https://else.test/"' in first
    assert "<sup>" in first and "this</a>" in first
    assert second == '<a href="https://blog.test/posts/1/">earlier</a>'


def test_an_undated_feed_keeps_document_order_in_the_first_fetch_and_in_the_issue(
    feed_server: FeedServer, store: Store
) -> None:
    # Feeds list the newest first: with no dates, document order is all there is.
    undated = [{"title": f"U{n}", "link": f"https://u.test/{n}", "description": "x"} for n in range(1, 6)]
    feed_server.routes["/feed.xml"] = Route(rss(undated))
    url = feed_server.url("/feed.xml")
    settings = FetchSettings(timeout=5, first_fetch_newest=2)
    assert poll(store, url, settings)[1] == 2
    assert titles(store, url) == ["U1", "U2"]

    newer = [{"title": f"N{n}", "link": f"https://u.test/n{n}", "description": "x"} for n in (1, 2)]
    time.sleep(1.05)  # entries are dated to the second when first seen
    feed_server.routes["/feed.xml"] = Route(rss(newer + undated))
    assert poll(store, url, settings)[1] == 2
    assert titles(store, url) == ["N1", "N2", "U1", "U2"]


def test_a_mixed_feed_prefers_dated_entries_in_the_first_fetch(feed_server: FeedServer, store: Store) -> None:
    undated = [{"title": f"U{n}", "link": f"https://u.test/{n}", "description": "x"} for n in (1, 2)]
    feed_server.routes["/feed.xml"] = Route(rss([undated[0], item(1), undated[1], item(3), item(2)]))
    url = feed_server.url("/feed.xml")
    assert poll(store, url, FetchSettings(timeout=5, first_fetch_newest=4))[1] == 4
    # Ranked: the dated by date, then the undated in document order. The undated one kept is
    # dated when first seen, so the issue lists it first.
    assert titles(store, url) == ["U1", "Post 3", "Post 2", "Post 1"]


def test_an_atom_entry_whose_only_alternate_is_a_pdf_links_to_it() -> None:
    doc = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Papers</title><id>urn:p</id>
  <updated>2026-01-02T00:00:00Z</updated><link href="https://papers.test/"/>
  <entry><title>Only a PDF</title><id>urn:p:1</id><updated>2026-01-02T00:00:00Z</updated>
    <link rel="alternate" type="application/pdf" href="https://papers.test/1.pdf"/></entry>
  <entry><title>PDF and page</title><id>urn:p:2</id><updated>2026-01-02T00:00:00Z</updated>
    <link rel="alternate" type="application/pdf" href="https://papers.test/2.pdf"/>
    <link rel="alternate" type="text/html" href="https://papers.test/2"/></entry>
  <entry><title>Related only</title><id>urn:p:3</id><updated>2026-01-02T00:00:00Z</updated>
    <link rel="related" href="https://papers.test/3"/></entry>
</feed>"""
    parsed = parse_feed(doc, ATOM_TYPE, "https://papers.test/feed.atom")
    assert [e.link for e in parsed.entries] == [
        "https://papers.test/1.pdf",
        "https://papers.test/2",
        "https://papers.test/3",
    ]


# -- what a feed's server says comes back to it, and stays in the database ------------------------


def test_a_feed_that_drops_its_ttl_is_polled_on_the_usual_clock_again(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    huge = rss([item(1)]).replace(b"<channel>", b"<channel><ttl>99999999999999999999</ttl>", 1)
    feed_server.routes["/feed.xml"] = Route(huge, etag='"v1"')
    poll(store, url)
    assert store.feeds([url])[0].ttl == 7 * 24 * 60  # clamped to a week
    poll(store, url)  # 304: nothing said about the ttl, so it stands
    assert store.feeds([url])[0].ttl == 7 * 24 * 60
    # Fixed: the feed no longer asks for a ttl, and the week it once asked for is forgotten.
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), etag='"v2"')
    result, new = poll(store, url)
    assert (result.status, new) == ("ok", 1)
    assert store.feeds([url])[0].ttl is None


def test_validators_with_control_characters_are_never_sent_back(
    feed_server: FeedServer, store: Store
) -> None:
    url = feed_server.url("/feed.xml")
    feed_server.routes["/feed.xml"] = Route(
        rss([item(1)]), headers={"ETag": '"e\x1b[31mX\x01"', "Last-Modified": "Mon\x1b[2J, 01 Jan 2026"}
    )
    poll(store, url)
    poll(store, url)
    second = feed_server.hits("/feed.xml")[1]
    assert "If-None-Match" not in second and "If-Modified-Since" not in second
    sent = "".join(f"{k}: {v}" for k, v in second.items())
    assert "\x1b" not in sent and "\x01" not in sent


def test_one_entry_with_an_impossible_date_costs_that_date_only(
    feed_server: FeedServer, store: Store
) -> None:
    doc = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": "J",
        "items": [
            {
                "id": "bad",
                "title": "Far future",
                "content_text": "x",
                "date_published": "9999-12-31T23:59:59-23:59",
            },
            {"id": "good", "title": "Today", "content_text": "y", "date_published": "2026-01-02T03:04:05Z"},
        ],
    }
    feed_server.routes["/feed.json"] = Route(json.dumps(doc).encode(), content_type=JSON_TYPE)
    result, new = poll(store, feed_server.url("/feed.json"))
    assert (result.status, new) == ("ok", 2), result.error
    assert sorted(titles(store, feed_server.url("/feed.json"))) == ["Far future", "Today"]


def test_a_feed_error_is_stored_without_the_urls_credentials(feed_server: FeedServer, store: Store) -> None:
    port = feed_server.httpd.server_address[1]
    url = f"http://reader:S3cretPassw0rd@127.0.0.1:{port}/missing.xml?access_token=T0kenValue99"
    result, _ = poll(store, url)
    assert result.status == "error"
    [row] = store.feeds([url])
    assert row.last_error and "404" in row.last_error
    for secret in ("S3cretPassw0rd", "T0kenValue99", "reader:"):
        assert secret not in row.last_error


def test_protocol_relative_links_become_https_even_in_an_http_feed(feed_server: FeedServer) -> None:
    doc = {
        "version": "https://jsonfeed.org/version/1.1",
        "title": "J",
        "items": [
            {
                "id": "1",
                "url": "//blog.test/p/1",
                "image": "//cdn.test/1.png",
                "content_html": '<p><img src="//cdn.test/a.png"> <a href="//blog.test/x">x</a></p>',
            }
        ],
    }
    feed_server.routes["/feed.json"] = Route(json.dumps(doc).encode(), content_type=JSON_TYPE)
    result = fetch_feed(FeedState(feed_server.url("/feed.json")), SETTINGS)
    [entry] = result.entries
    assert (entry.link, entry.image_url) == ("https://blog.test/p/1", "https://cdn.test/1.png")
    assert 'src="https://cdn.test/a.png"' in entry.summary_html
    assert 'href="https://blog.test/x"' in entry.summary_html
