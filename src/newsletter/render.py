"""Render one issue: Jinja2 templates, CSS inlined by premailer once per issue.

Per-subscriber values never reach Jinja2. The templates see placeholder tokens for them
(``{{ subscriber.name }}``, ``{{ unsubscribe_url }}``); the finished HTML is never compiled as a
template again, so feed text cannot act as template code. ``message.py`` splices the real values
into the encoded message per subscriber.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from .errors import ConfigError
from .model import StoredEntry
from .sanitize import clean_html, excerpt, html_to_text, one_line, web_link

GMAIL_CLIP_BYTES = 102 * 1024
HTML_TEMPLATE = "digest.html"
TEXT_TEMPLATE = "digest.txt"


class Placeholders:
    """Hands out one unguessable token per per-subscriber field the templates ask for."""

    def __init__(self) -> None:
        self.prefix = "NL" + secrets.token_hex(8)
        self.fields: list[str] = []

    def token(self, name: str) -> str:
        if name not in self.fields:
            self.fields.append(name)
        return f"{self.prefix}F{self.fields.index(name)}E"


class _SubscriberFields:
    """``subscriber.anything`` in a template: a token now, the CSV column's value per message."""

    def __init__(self, placeholders: Placeholders) -> None:
        self._placeholders = placeholders

    def __getattr__(self, name: str) -> Markup:
        if name.startswith("_"):
            raise AttributeError(name)
        return Markup(self._placeholders.token(name))

    __getitem__ = __getattr__


@dataclass
class Article:
    title: str
    link: str
    summary_html: Markup
    summary_text: str
    author: str
    published: datetime
    image_url: str
    categories: list[str]
    feed_title: str
    share_links: list[tuple[str, str]] = field(default_factory=list)  # (network label, URL)


@dataclass
class Section:
    title: str
    link: str
    articles: list[Article] = field(default_factory=list)


@dataclass
class RenderedIssue:
    subject: str
    html: str  # inlined, with placeholder tokens
    text: str
    prefix: str
    fields: list[str]

    @property
    def html_bytes(self) -> int:
        return len(self.html.encode("utf-8"))

    @property
    def clipped(self) -> bool:
        return self.html_bytes > GMAIL_CLIP_BYTES

    def placeholders(self) -> re.Pattern[str]:
        """Matches each token Placeholders.token put in html and text; group 1: the field's index."""
        return re.compile(rf"{self.prefix}F(\d+)E")

    def to_payload(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RenderedIssue:
        return cls(**payload)


def article(entry: StoredEntry, feed_title: str, excerpt_chars: int) -> Article:
    cleaned = clean_html(entry.summary_html)
    text = html_to_text(cleaned)
    if len(text) > excerpt_chars:
        # A long post becomes a plain excerpt: it keeps the digest light (Gmail clips at
        # 102 KB) and never cuts HTML in the middle of a tag.
        text = excerpt(text, excerpt_chars)
        cleaned = str(Markup("<p>{}</p>").format(text))
    return Article(
        title=one_line(entry.title) or "(untitled)",
        link=web_link(entry.link),  # a feed's javascript: link must not become a link in the email
        summary_html=Markup(cleaned),
        summary_text=text,
        author=one_line(entry.author),
        published=entry.published,
        image_url=web_link(entry.image_url),
        categories=entry.categories,
        feed_title=feed_title,
    )


@lru_cache(maxsize=8)
def environment(user_dir: Path | None) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if user_dir is not None and user_dir.is_dir():
        loaders.append(jinja2.FileSystemLoader(str(user_dir)))
    loaders.append(jinja2.PackageLoader("newsletter", "templates"))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def inline_css(html: str) -> str:
    from premailer import Premailer  # 0.15 s to import: only runs that render pay for it

    # strip_important=False keeps !important in the @media rules that premailer leaves in
    # the <style> block; without it dark mode and narrow screens lose to the inline styles.
    return Premailer(
        html,
        strip_important=False,
        keep_style_tags=False,
        remove_classes=False,
        cssutils_logging_level=logging.CRITICAL,
        disable_validation=True,
        allow_network=False,
        # Keep our width/height attributes: Outlook sizes images and tables by them, and
        # premailer would overwrite width="560" with the CSS's width="100%".
        disable_basic_attributes=["width", "height"],
        # Outlook needs align= on floated images; premailer finds them by parsing the style of
        # every image, half its time on a long issue. Without "float" anywhere (feed HTML
        # keeps no style attributes) there is nothing to find.
        align_floating_images=re.search("float", html, re.IGNORECASE) is not None,
    ).transform()


def render_issue(
    *,
    templates_dir: Path | None,
    title: str,
    subject_template: str,
    number: int,
    date: datetime,
    sections: list[Section],
    extra: dict[str, Any] | None = None,
) -> RenderedIssue:
    env = environment(templates_dir)
    placeholders = Placeholders()
    articles = [a for s in sections for a in s.articles]
    issue = {
        "number": number,
        "date": date,
        "count": len(articles),
        "top_title": articles[0].title if articles else "",
        "preheader": " · ".join(a.title for a in articles[:3]),
    }
    context = {
        "title": title,
        "issue": issue,
        "sections": sections,
        "articles": articles,
        "subscriber": _SubscriberFields(placeholders),
        "unsubscribe_url": Markup(placeholders.token("unsubscribe_url")),
        **(extra or {}),
    }
    try:
        subject = one_line(env.from_string(subject_template).render(title=title, issue=issue))
        html = env.get_template(HTML_TEMPLATE).render(context)
        text = env.get_template(TEXT_TEMPLATE).render(context)
    except jinja2.TemplateError as exc:
        where = getattr(exc, "filename", None) or getattr(exc, "name", None) or "template"
        line = getattr(exc, "lineno", None)
        raise ConfigError(
            f"{where}{f':{line}' if line else ''}: {exc.__class__.__name__}: {exc}",
            hint="fix the template; the bundled ones show every variable there is",
        ) from None
    return RenderedIssue(subject, inline_css(html), text, placeholders.prefix, placeholders.fields)
