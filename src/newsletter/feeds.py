"""Fetch and parse feeds: RSS, Atom (feedparser) and JSON Feed, over HTTP(S) or from a file.

Fetching is polite (conditional GET, a User-Agent, permanent redirects remembered) and bounded
(a timeout for the whole download and a size cap), so one bad feed never holds up the others.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import requests
import urllib3

from . import transport
from .config import FetchSettings
from .errors import FeedError
from .model import FeedEntry, FeedState, FetchResult, FetchStatus, clamp_ttl, now
from .redact import redact
from .sanitize import html_to_text, one_line


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
    try:
        answer = transport.get(url, headers=headers, timeout=settings.timeout, max_bytes=settings.max_bytes)
    except transport.TransportError as exc:
        raise FeedError(str(exc)) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise FeedError(f"{exc.__class__.__name__}: {exc}") from None
    except Exception as exc:  # fetch_feed never raises: one feed must not end the round
        raise FeedError(f"cannot fetch: {_describe(exc)}") from None
    result = FetchResult(state.url, FetchStatus.OK, fetch_url=state.fetch_url)
    # Remember a move only when every hop was permanent; a 302 may change back.
    if answer.history and all(code in (301, 308) for code in answer.history):
        result.fetch_url = answer.url
    if answer.status == 304:
        result.status = FetchStatus.NOT_MODIFIED
        result.etag, result.last_modified = state.etag, state.last_modified
        return b"", {}, result
    if answer.status >= 400:
        gone = " (gone for good: remove it from schedules.yaml)" if answer.status == 410 else ""
        raise FeedError(f"HTTP {answer.status} {answer.reason}{gone}")
    # Both go back to the server in the next request's headers: only a well-formed value does.
    result.etag = _validator(answer.headers.get("ETag"))
    result.last_modified = _validator(answer.headers.get("Last-Modified"))
    info = {"content-type": answer.headers.get("Content-Type", ""), "content-location": answer.url}
    return answer.body, info, result


_VALIDATOR = re.compile(r"[\x20-\x7e]{1,512}")


def _validator(value: str | None) -> str | None:
    """An ETag or Last-Modified fit to send back: printable ASCII, not absurdly long."""
    return value if value is not None and _VALIDATOR.fullmatch(value) else None


def _read_file(state: FeedState, settings: FetchSettings) -> tuple[bytes, dict[str, str], FetchResult]:
    path = Path(url2pathname(urlparse(state.url).path))
    try:
        stat = path.stat()
        # The file's mtime plays the part of Last-Modified: unchanged file, nothing parsed.
        stamp = str(stat.st_mtime_ns)
        if stamp == state.last_modified:
            return b"", {}, FetchResult(state.url, FetchStatus.NOT_MODIFIED, last_modified=stamp)
        if stat.st_size > settings.max_bytes:
            raise FeedError(f"{stat.st_size:,} bytes is over the {settings.max_bytes:,} byte cap")
        data = path.read_bytes()
    except OSError as exc:
        raise FeedError(f"cannot read {path}: {exc.strerror}") from None
    return (
        data,
        {"content-type": "", "content-location": ""},
        FetchResult(state.url, FetchStatus.OK, last_modified=stamp),
    )


def fetch_feed(state: FeedState, settings: FetchSettings) -> FetchResult:
    """Fetch and parse one feed. Never raises: errors come back as ``status == FetchStatus.ERROR``."""
    try:
        if state.url.startswith("file:"):
            data, info, result = _read_file(state, settings)
        else:
            data, info, result = _download(state, settings)
        if result.status == FetchStatus.OK:
            try:
                result.title, result.link, result.entries, result.warning, result.ttl = parse_feed(
                    data, info["content-type"], info["content-location"]
                )
            except FeedError:
                raise
            except Exception as exc:
                # The document is hostile or odd in a way nobody foresaw (nesting deep enough
                # to exhaust the stack, say): that is this feed's problem, not the round's.
                raise FeedError(f"cannot read the feed: {_describe(exc)}") from None
        return result
    except FeedError as exc:
        # Name the feed as schedules.yaml does, so the user can find it there.
        where = state.url
        if state.fetch_url and state.fetch_url != state.url:
            where += f" (moved to {state.fetch_url})"
        # Stored as the feed's last_error and shown by status: a feed URL's password or token
        # (or a ${VAR} in it) stays out of the database too.
        error = redact(one_line(f"{where}: {exc}"))
        return FetchResult(state.url, FetchStatus.ERROR, error=error, fetch_url=state.fetch_url)


def _describe(exc: BaseException) -> str:
    """``ClassName: message`` on one line and of a sane length: it ends up in logs and the CLI."""
    text = one_line(str(exc))
    text = text if len(text) <= 300 else text[:300] + "…"
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def first_fetch_history(entries: list[FeedEntry], newest: int, days: float | None) -> set[int]:
    """Indexes of the entries that are history if this is the feed's first fetch: stored, never
    mailed. ``days``: those older than that; otherwise all but the ``newest``."""
    if days is not None:
        cutoff = now().timestamp() - days * 86400
        return {i for i, e in enumerate(entries) if e.published and e.published.timestamp() < cutoff}
    # Dated entries newest first, then the undated ones: a date is the better evidence of
    # being recent. Ties, and the undated among themselves, keep document order (feeds list
    # the newest first).
    dated = sorted((-e.published.timestamp(), i) for i, e in enumerate(entries) if e.published)
    undated = [i for i, e in enumerate(entries) if e.published is None]
    return set(([i for _, i in dated] + undated)[newest:])


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
        # In UTC now, while an out-of-range date (9999-12-31T23:59-23:59) can still be refused
        # as one entry's missing date instead of failing the whole feed when it is stored.
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _absolute(base: str, link: str) -> str:
    link = (link or "").strip()
    if link.startswith("//"):
        # A mail client has no page to take the scheme from: the safe one, whatever the feed's.
        return "https:" + link
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
    link = _url(str(feed.get("link", "")))
    # Atom (RFC 4287 4.2.1): an entry without an author has the feed's.
    feed_author = one_line(str((feed.get("author_detail") or {}).get("name") or feed.get("author", "")))
    # Links that are still relative after xml:base resolution are relative to the site;
    # for a local file the feed's own <link> is the only base there is.
    base = base_url if base_url.startswith("http") else link
    entries = []
    for e in parsed.entries:
        body = ""
        if e.get("content"):
            body = str(e.content[0].get("value", ""))
        body = str(e.get("summary", "")) or body
        raw_link = _absolute(base, _link_of(e))
        entry_title = _text_of(e, "title")
        # RSS <author> is "mail (Name)"; feedparser splits the name out.
        author = one_line(str((e.get("author_detail") or {}).get("name") or e.get("author", "")))
        entries.append(
            FeedEntry(
                # The key keeps the link as given: it is an identity, never shown.
                key=_entry_key(str(e.get("id", "")), raw_link, entry_title, body),
                title=entry_title,
                link=_url(raw_link),
                summary_html=body,
                author=author or feed_author,
                published=_struct_to_dt(e.get("published_parsed") or e.get("updated_parsed")),
                image_url=_url(_absolute(base, _image_of(e))),
                categories=_categories(str(t.get("term")) for t in e.get("tags", []) or [] if t.get("term")),
            )
        )
    return ParsedFeed(title, link, entries, warning, clamp_ttl(str(feed.get("ttl", ""))))


_HTML_TYPES = ("text/html", "application/xhtml+xml", "")


def _link_of(entry: Any) -> str:
    """The entry's page: an HTML alternate, else any alternate, else the first link at all.

    feedparser fills ``link`` only from an HTML alternate; an entry whose one alternate is a
    PDF would otherwise have no link.
    """
    given = str(entry.get("link") or "")
    # guidislink: feedparser fell back to the id (an RSS permalink guid, an Atom urn:...).
    if given and not entry.get("guidislink"):
        return given
    links = [x for x in entry.get("links", []) or [] if isinstance(x, dict) and x.get("href")]
    alternates = [x for x in links if x.get("rel", "alternate") == "alternate"]
    for x in alternates:
        if str(x.get("type", "")).split(";")[0].strip().lower() in _HTML_TYPES:
            return str(x["href"])
    chosen = alternates or links
    return str(chosen[0]["href"]) if chosen else given


# Control characters (ESC, BEL, NUL, CR/LF, C1) in a single-line field would reach headers,
# terminals and log lines; they are taken out here, where the data comes in.
def _url(value: str) -> str:
    """A URL as given, or "" if it carries whitespace inside or control characters."""
    value = value.strip()
    return "" if one_line(value) != value else value


def _categories(terms: Iterable[str]) -> list[str]:
    return [c for c in (one_line(t) for t in terms) if c]


def _text_of(node: Any, key: str) -> str:
    """A title as plain text: Atom allows type="html" and "xhtml" titles."""
    value = str(node.get(key, ""))
    kind = (node.get(f"{key}_detail") or {}).get("type", "")
    return one_line(html_to_text(value) if kind in ("text/html", "application/xhtml+xml") else value)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _names(authors: list[Any]) -> str:
    names = (one_line(str(a["name"])) for a in authors if isinstance(a, dict) and a.get("name"))
    return ", ".join(n for n in names if n)


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
    link = _url(str(doc.get("home_page_url") or ""))
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
        entry_link = _absolute(base, str(item.get("url") or item.get("external_url") or ""))
        body = str(item.get("content_html") or item.get("summary") or "")
        if body:
            # Unlike feedparser for XML, nothing resolves a JSON Feed's relative URLs.
            body = absolute_links(body, entry_link or base)
        elif item.get("content_text"):
            body = "<p>" + escape(str(item["content_text"])) + "</p>"
        image = str(item.get("image") or item.get("banner_image") or "")
        if not image:
            for att in _list(item.get("attachments")):
                if isinstance(att, dict) and str(att.get("mime_type", "")).startswith("image/"):
                    image = str(att.get("url", ""))
                    break
        title = one_line(str(item.get("title") or ""))
        entries.append(
            FeedEntry(
                key=_entry_key(str(item.get("id") or ""), entry_link, title, body),
                title=title,
                link=_url(entry_link),
                summary_html=body,
                author=authors_of(item) or feed_author,
                published=_iso_to_dt(item.get("date_published") or item.get("date_modified")),
                image_url=_url(_absolute(base, image)),
                categories=_categories(t for t in _list(item.get("tags")) if isinstance(t, str)),
            )
        )
    return ParsedFeed(one_line(str(doc.get("title") or "")), link, entries)


def absolute_links(fragment: str, base: str) -> str:
    """``fragment`` with every relative URL (href, src, ``#fn:1``...) resolved against ``base``."""
    if not base.startswith(("http://", "https://")) or not fragment.strip():
        return fragment
    from lxml import etree
    from lxml import html as lxml_html

    try:
        root = lxml_html.fragment_fromstring(fragment, create_parent="div")
    except (etree.ParserError, ValueError):
        return fragment
    # "discard": a link that cannot be resolved (http://[ ...) is dropped, not kept relative.
    root.rewrite_links(lambda link: "https:" + link if link.startswith("//") else link)
    root.make_links_absolute(base, resolve_base_href=False, handle_failures="discard")
    out = lxml_html.tostring(root, encoding="unicode")
    return out[len("<div>") : -len("</div>")] if out.startswith("<div>") else out
