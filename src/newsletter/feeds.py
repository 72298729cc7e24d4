"""Fetch and parse feeds: RSS, Atom (feedparser) and JSON Feed, over HTTP(S) or from a file.

Fetching is polite (conditional GET, a User-Agent, permanent redirects remembered) and bounded
(a timeout for the whole download and a size cap), so one bad feed never holds up the others.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import requests
import urllib3

from .config import FetchSettings
from .errors import FeedError
from .sanitize import html_to_text


@dataclass
class FeedEntry:
    key: str  # stable identity within its feed: id/guid, else link, else a content hash
    title: str
    link: str
    summary_html: str  # as the feed gave it; sanitised at render time
    author: str = ""
    published: datetime | None = None
    image_url: str = ""
    categories: list[str] = field(default_factory=list)


@dataclass
class FeedState:
    """What the store remembers about a feed between fetches."""

    url: str
    fetch_url: str | None = None  # after a permanent redirect
    etag: str | None = None
    last_modified: str | None = None


@dataclass
class FetchResult:
    url: str
    status: str  # "ok", "not-modified" or "error"
    entries: list[FeedEntry] = field(default_factory=list)
    title: str = ""
    link: str = ""
    etag: str | None = None
    last_modified: str | None = None
    fetch_url: str | None = None
    error: str = ""
    warning: str = ""
    ttl: int | None = None  # minutes, from RSS <ttl>: how long the publisher asks us to wait


def _download(state: FeedState, settings: FetchSettings) -> tuple[bytes, dict[str, str], FetchResult]:
    url = state.fetch_url or state.url
    headers = {
        "User-Agent": settings.user_agent,
        "Accept": "application/atom+xml, application/rss+xml, application/feed+json,"
        " application/json;q=0.9, application/xml;q=0.8, text/xml;q=0.8, */*;q=0.5",
    }
    if state.etag:
        headers["If-None-Match"] = state.etag
    if state.last_modified:
        headers["If-Modified-Since"] = state.last_modified
    deadline = time.monotonic() + settings.timeout
    try:
        with requests.get(url, headers=headers, timeout=settings.timeout, stream=True) as resp:
            result = FetchResult(state.url, "ok", fetch_url=state.fetch_url)
            # Remember a move only when every hop was permanent; a 302 may change back.
            if resp.history and all(r.status_code in (301, 308) for r in resp.history):
                result.fetch_url = resp.url
            if resp.status_code == 304:
                result.status = "not-modified"
                result.etag, result.last_modified = state.etag, state.last_modified
                return b"", {}, result
            if resp.status_code >= 400:
                gone = " (gone for good: remove it from schedules.yaml)" if resp.status_code == 410 else ""
                raise FeedError(f"HTTP {resp.status_code} {resp.reason}{gone}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > settings.max_bytes:
                raise FeedError(f"{int(declared):,} bytes is over the {settings.max_bytes:,} byte cap")
            chunks, size = [], 0
            # read1 returns whatever has arrived, so a body that trickles in byte by byte
            # still meets the deadline; iter_content would wait for a full chunk.
            while chunk := resp.raw.read1(64 * 1024, decode_content=True):
                size += len(chunk)
                if size > settings.max_bytes:
                    raise FeedError(f"more than the {settings.max_bytes:,} byte cap; not read")
                if time.monotonic() > deadline:
                    raise FeedError(f"still downloading after {settings.timeout:g} s; gave up")
                chunks.append(chunk)
            result.etag = resp.headers.get("ETag")
            result.last_modified = resp.headers.get("Last-Modified")
            info = {
                "content-type": resp.headers.get("Content-Type", ""),
                "content-location": resp.url,
            }
            return b"".join(chunks), info, result
    except requests.Timeout:
        raise FeedError(f"no answer within {settings.timeout:g} s") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise FeedError(f"{exc.__class__.__name__}: {exc}") from None


def _read_file(state: FeedState, settings: FetchSettings) -> tuple[bytes, dict[str, str], FetchResult]:
    path = Path(url2pathname(urlparse(state.url).path))
    try:
        stat = path.stat()
        # The file's mtime plays the part of Last-Modified: unchanged file, nothing parsed.
        stamp = str(stat.st_mtime_ns)
        if stamp == state.last_modified:
            return b"", {}, FetchResult(state.url, "not-modified", last_modified=stamp)
        if stat.st_size > settings.max_bytes:
            raise FeedError(f"{stat.st_size:,} bytes is over the {settings.max_bytes:,} byte cap")
        data = path.read_bytes()
    except OSError as exc:
        raise FeedError(f"cannot read {path}: {exc.strerror}") from None
    return (
        data,
        {"content-type": "", "content-location": ""},
        FetchResult(state.url, "ok", last_modified=stamp),
    )


def fetch_feed(state: FeedState, settings: FetchSettings) -> FetchResult:
    """Fetch and parse one feed. Never raises: errors come back as ``status == "error"``."""
    try:
        if state.url.startswith("file:"):
            data, info, result = _read_file(state, settings)
        else:
            data, info, result = _download(state, settings)
        if result.status == "ok":
            result.title, result.link, result.entries, result.warning, result.ttl = parse_feed(
                data, info["content-type"], info["content-location"]
            )
        return result
    except FeedError as exc:
        # Name the feed as schedules.yaml does, so the user can find it there.
        where = state.url
        if state.fetch_url and state.fetch_url != state.url:
            where += f" (moved to {state.fetch_url})"
        return FetchResult(state.url, "error", error=f"{where}: {exc}", fetch_url=state.fetch_url)


def fetch_all(states: Iterable[FeedState], settings: FetchSettings) -> list[FetchResult]:
    """Fetch feeds concurrently: a round takes as long as the slowest feed, not their sum."""
    states = list(states)
    if not states:
        return []
    with ThreadPoolExecutor(max_workers=min(settings.workers, len(states))) as pool:
        return list(pool.map(lambda s: fetch_feed(s, settings), states))


# -- parsing -----------------------------------------------------------------------------------


def _entry_key(ident: str, link: str, title: str, body: str) -> str:
    if ident.strip():
        return "id:" + ident.strip()
    if link.strip():
        return "link:" + link.strip()
    return "sha256:" + hashlib.sha256(f"{title}\0{body}".encode()).hexdigest()


def _struct_to_dt(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(calendar.timegm(value), UTC)
    except (OverflowError, ValueError, TypeError):
        return None


def _iso_to_dt(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _absolute(base: str, link: str) -> str:
    link = (link or "").strip()
    if not link or not base or urlparse(link).scheme:
        return link
    return urljoin(base, link)


def _image_of(entry: Any) -> str:
    for media in entry.get("media_content", []) or []:
        if media.get("url") and (
            media.get("medium") == "image" or str(media.get("type", "")).startswith("image/")
        ):
            return str(media["url"])
    for thumb in entry.get("media_thumbnail", []) or []:
        if thumb.get("url"):
            return str(thumb["url"])
    for enc in entry.get("enclosures", []) or []:
        if str(enc.get("type", "")).startswith("image/") and enc.get("href"):
            return str(enc["href"])
    return ""


# The root element closed, perhaps followed by comments (caching plugins append them).
_CLOSED = re.compile(rb"</(?:[A-Za-z_][\w.-]*:)?(?:rss|feed|RDF)>\s*(?:<!--.*?-->\s*)*$", re.S)


class ParsedFeed(NamedTuple):
    title: str
    link: str
    entries: list[FeedEntry]
    warning: str = ""
    ttl: int | None = None


def parse_feed(data: bytes, content_type: str, base_url: str) -> ParsedFeed:
    """Return (title, link, entries, warning). Raises FeedError when nothing usable is there."""
    head = data.lstrip()[:1]
    if "json" in content_type or head == b"{":
        return _parse_json_feed(data, base_url)
    import feedparser  # 30 ms to import: a feed that answers 304 never needs it

    parsed = feedparser.parse(
        data,
        response_headers={"content-type": content_type or "application/xml", "content-location": base_url},
        # nh3 cleans every fragment before it reaches an email or a post; feedparser's own
        # (weaker) cleaning would only cost a third of the parse time on top.
        sanitize_html=False,
    )
    if not parsed.get("version") and not parsed.entries:
        reason = parsed.get("bozo_exception") or "no RSS, Atom or JSON Feed found"
        raise FeedError(f"not a feed: {reason}")
    warning = ""
    if parsed.get("bozo"):
        problem = parsed.get("bozo_exception")
        if not _CLOSED.search(data[-4096:]):
            # A cut-off document: its last entry may be half there, and once stored an entry
            # is never updated. Refuse it all and try again on the next fetch.
            raise FeedError(f"not a feed: truncated or malformed XML ({problem}); nothing stored")
        warning = f"feed has errors but was read: {problem}"
    feed = parsed.feed
    title = _text_of(feed, "title")
    link = str(feed.get("link", ""))
    # Atom (RFC 4287 4.2.1): an entry without an author has the feed's.
    feed_author = str((feed.get("author_detail") or {}).get("name") or feed.get("author", ""))
    # Links that are still relative after xml:base resolution are relative to the site;
    # for a local file the feed's own <link> is the only base there is.
    base = base_url if base_url.startswith("http") else link
    entries = []
    for e in parsed.entries:
        body = ""
        if e.get("content"):
            body = str(e.content[0].get("value", ""))
        body = str(e.get("summary", "")) or body
        entry_link = _absolute(base, str(e.get("link", "")))
        entry_title = _text_of(e, "title")
        entries.append(
            FeedEntry(
                key=_entry_key(str(e.get("id", "")), entry_link, entry_title, body),
                title=entry_title,
                link=entry_link,
                summary_html=body,
                # RSS <author> is "mail (Name)"; feedparser splits the name out.
                author=str((e.get("author_detail") or {}).get("name") or e.get("author", "")) or feed_author,
                published=_struct_to_dt(e.get("published_parsed") or e.get("updated_parsed")),
                image_url=_absolute(base, _image_of(e)),
                categories=[str(t.get("term")) for t in e.get("tags", []) or [] if t.get("term")],
            )
        )
    ttl = str(feed.get("ttl", "")).strip()
    return ParsedFeed(title, link, entries, warning, int(ttl) if ttl.isdigit() else None)


def _text_of(node: Any, key: str) -> str:
    """A title as plain text: Atom allows type="html" and "xhtml" titles."""
    value = str(node.get(key, ""))
    kind = (node.get(f"{key}_detail") or {}).get("type", "")
    return html_to_text(value) if kind in ("text/html", "application/xhtml+xml") else value


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _names(authors: list[Any]) -> str:
    return ", ".join(str(a["name"]) for a in authors if isinstance(a, dict) and a.get("name"))


def _parse_json_feed(data: bytes, base_url: str) -> ParsedFeed:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"malformed JSON feed: {exc}") from None
    if not isinstance(doc, dict) or "jsonfeed.org" not in str(doc.get("version", "")):
        raise FeedError("JSON but not a JSON Feed (no jsonfeed.org version)")
    items = doc.get("items")
    if not isinstance(items, list):
        raise FeedError("JSON Feed without an items list")
    link = str(doc.get("home_page_url") or "")
    base = base_url if base_url.startswith("http") else link

    def authors_of(node: dict[str, Any]) -> str:
        # 1.1 has "authors"; 1.0 had a single "author".
        single = node.get("author")
        return _names(_list(node.get("authors")) or ([single] if isinstance(single, dict) else []))

    feed_author = authors_of(doc)
    entries = []
    # Fields of the wrong type are ignored rather than trusted: the feed is untrusted input.
    for item in items:
        if not isinstance(item, dict):
            continue
        body = item.get("content_html") or item.get("summary") or ""
        if not body and item.get("content_text"):
            body = "<p>" + escape(str(item["content_text"])) + "</p>"
        entry_link = _absolute(base, str(item.get("url") or item.get("external_url") or ""))
        image = str(item.get("image") or item.get("banner_image") or "")
        if not image:
            for att in _list(item.get("attachments")):
                if isinstance(att, dict) and str(att.get("mime_type", "")).startswith("image/"):
                    image = str(att.get("url", ""))
                    break
        title = str(item.get("title") or "")
        entries.append(
            FeedEntry(
                key=_entry_key(str(item.get("id") or ""), entry_link, title, str(body)),
                title=title,
                link=entry_link,
                summary_html=str(body),
                author=authors_of(item) or feed_author,
                published=_iso_to_dt(item.get("date_published") or item.get("date_modified")),
                image_url=_absolute(base, image),
                categories=[str(t) for t in _list(item.get("tags")) if isinstance(t, str)],
            )
        )
    return ParsedFeed(str(doc.get("title") or ""), link, entries)
