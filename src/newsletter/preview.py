"""What an email looks like before (and after) it goes out, built by the sending code itself.

The preview takes the same path as a send: the next issue is drafted and rendered by
``build.IssueBuilder`` and each message is built by ``message.Skeleton`` for a real subscriber,
then read back. Only the views made for looking (dark mode, styles stripped) differ from the wire.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .build import IssueBuilder
from .config import Config
from .context import RunContext
from .errors import ConfigError
from .message import Recipient
from .model import Issue
from .render import GMAIL_CLIP_BYTES
from .storage import Storage


@dataclass
class Preview:
    schedule: str
    number: int
    subject: str
    html: str
    text: str
    headers: list[tuple[str, str]]
    subscriber: str
    is_new: bool  # False: nothing new, showing the latest entries as --force would send them
    articles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def html_bytes(self) -> int:
        return len(self.html.encode("utf-8"))

    @property
    def clip_share(self) -> float:
        """How much of Gmail's 102 KB clipping line the HTML uses (1.0 = clipped)."""
        return self.html_bytes / GMAIL_CLIP_BYTES


def _read_back(data: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    html_part, text_part = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    # Parts travel with CRLF line ends; show (and compare) the text itself.
    html = html_part.get_content().replace("\r\n", "\n")
    text = text_part.get_content().replace("\r\n", "\n")
    return html, text, [(k, str(v)) for k, v in msg.items()]


def _articles(store: Storage, issue: Issue) -> list[dict[str, Any]]:
    return [{"id": e.id, "title": e.title, "link": e.link} for e in store.entries(issue.entry_ids)]


def next_issue(ctx: RunContext, name: str, address: str | None = None) -> Preview | None:
    """The next issue of ``name`` as ``address`` (default: the first subscriber) would get it.

    The subscriber list is the copy the last send or ``check`` read: a look reads no CSV.
    """
    builder = IssueBuilder(ctx, name)
    draft = builder.draft(force=False)
    is_new = draft is not None
    if draft is None:
        draft = builder.draft(force=True)
    if draft is None:
        return None
    issue = draft.issue
    sub = builder.reader(address)
    _, data = builder.skeleton(issue).build(builder.recipient(sub))
    html, text, headers = _read_back(data)
    return Preview(
        name, issue.number, issue.subject, html, text, headers, sub.email, is_new, _articles(ctx.store, issue)
    )


def sent_issue(ctx: RunContext, name: str, number: int | Issue) -> Preview:
    """An issue as it was sent, for the archive: per-subscriber values left blank.

    ``number`` may be the Issue itself, when the caller already holds it (the export).
    """
    builder = IssueBuilder(ctx, name)
    issue = builder.sent(number) if isinstance(number, int) else number
    if issue is None:
        raise ConfigError(f"{name} has no issue #{number}")
    # The archive is public: no address and no working unsubscribe link in it.
    blank = {f: "" for f in issue.payload["fields"]}
    recipient = Recipient("archive@example.com", "", {**blank, "unsubscribe_url": "#"})
    _, data = builder.skeleton(issue).build(recipient)
    html, text, headers = _read_back(data)
    return Preview(
        name, issue.number, issue.subject, html, text, headers, "", True, _articles(ctx.store, issue)
    )


# -- views made for looking ------------------------------------------------------------------

_DARK = re.compile(r"@media\s*\(\s*prefers-color-scheme\s*:\s*dark\s*\)\s*\{")
_STYLE = re.compile(r"<style\b[^>]*>.*?</style>", re.S | re.I)


def _block(css: str, start: int) -> tuple[str, int]:
    """The body of the @media block whose '{' ends at ``start``, and where the block ends."""
    depth, i = 1, start
    while i < len(css) and depth:
        depth += {"{": 1, "}": -1}.get(css[i], 0)
        i += 1
    return css[start : i - 1], i


def dark_view(html: str) -> str:
    """The email as a client in dark mode shows it: the dark @media rules applied outright."""

    def unwrap(style: re.Match[str]) -> str:
        css = style.group(0)
        out, pos = [], 0
        for m in _DARK.finditer(css):
            if m.start() < pos:
                continue
            body, end = _block(css, m.end())
            out.append(css[pos : m.start()] + body)
            pos = end
        return "".join(out) + css[pos:]

    return _STYLE.sub(unwrap, html).replace("<head>", '<head><meta name="color-scheme" content="dark">', 1)


def stripped_view(html: str) -> str:
    """The email as clients that drop <style> show it (Gmail for non-Google accounts)."""
    return _STYLE.sub("", html)


def fingerprint(config: Config) -> str:
    """Changes when schedules.yaml, a subscriber list or a template changes: the page reloads."""
    paths: list[Path] = [config.path, *(config.base_dir / "subscribers").glob("*.csv")]
    for folder in (config.templates_dir, Path(__file__).parent / "templates"):
        if folder and folder.is_dir():
            paths += folder.glob("*")
    stamps = []
    for p in paths:
        try:
            stamps.append(f"{p}:{p.stat().st_mtime_ns}")
        except OSError:
            continue
    return str(hash("|".join(sorted(stamps))))


def export_archive(ctx: RunContext, name: str, out: Path) -> list[Path]:
    """Static archive pages of a schedule's issues, for any web server to publish.

    What it creates is private (folders 0700, pages 0600), like everything the tool writes:
    publishing is a deliberate step (copy them, or grant the web server's group access).
    """
    from html import escape

    from .files import private_dir, write_private

    config = ctx.config
    config.schedule(name)
    private_dir(out)
    written, items = [], []
    for issue in ctx.store.issues(name, limit=100_000):
        page = out / f"{issue.number}.html"
        write_private(page, sent_issue(ctx, name, issue).html.encode("utf-8"))
        written.append(page)
        items.append(f'<li><a href="{issue.number}.html">#{issue.number}</a> {escape(issue.subject)}</li>')
    title = escape(config.schedule(name).title or name)
    index = out / "index.html"
    write_private(
        index,
        (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
            f"<body><h1>{title}</h1><ul>{''.join(items)}</ul></body></html>\n"
        ).encode(),
    )
    return [index, *written]
