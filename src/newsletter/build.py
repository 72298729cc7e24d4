"""The issue builder: draft the next issue of a schedule, render it, and rebuild a sent one.

Sending, the preview, ``check``, ``status`` and the archive all go through this one builder,
so what the preview shows is what a send sends. It only reads: it never syncs a subscriber
list, never records an issue (``digest`` does both, for a send).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from .message import Recipient, Skeleton
from .model import Issue, IssueStatus, StoredEntry, Subscriber
from .sanitize import web_link

if TYPE_CHECKING:
    from .config import Schedule
    from .context import RunContext
    from .render import RenderedIssue, Section

# Rendering and sharing (Jinja2, premailer, the share rules) are imported where they are used:
# a run that finds nothing new, the commonest run, never loads them.


def list_id(name: str, schedule: Schedule) -> str:
    if schedule.list_id:
        return schedule.list_id
    domain = parseaddr(schedule.from_)[1].rpartition("@")[2] or "localhost"
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', name).strip('-').lower()}.{domain}"


@dataclass
class Draft:
    issue: Issue  # rendered, not recorded (id 0)
    watermark: int  # the highest entry id it covers


class IssueBuilder:
    """One schedule's issues, as its settings and the stored entries make them."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx, self.store, self.name = ctx, ctx.store, name
        self.schedule = ctx.config.schedule(name)
        self.list_name = self.schedule.subscribers
        self.list_path: Path = ctx.config.subscribers_path(self.schedule)
        self.feed_urls = [ctx.config.feed_url(f) for f in self.schedule.feeds]

    def recipient(self, sub: Subscriber) -> Recipient:
        token = self.ctx.tokens.make(self.list_name, sub.email)
        values = {
            **sub.fields,
            "email": sub.email,
            "name": sub.name,
            "unsubscribe_url": self.schedule.unsubscribe_url.replace("{token}", token),
        }
        return Recipient(sub.email, sub.name, values)

    def skeleton(self, issue: Issue) -> Skeleton:
        from .render import RenderedIssue

        payload = dict(issue.payload)
        # The issue's date is what its text says; each message's Date header is stamped when it
        # is built for sending, so a retry hours later does not look backdated.
        payload.pop("date")
        return Skeleton(
            RenderedIssue.from_payload(payload),
            from_addr=self.schedule.from_,
            reply_to=self.schedule.reply_to,
            list_id=list_id(self.name, self.schedule),
            list_name=self.schedule.title or self.name,
            id_seed=f"{self.name}:{issue.number}:{issue.created_at.isoformat()}",
        )

    def sections(self, entries: list[StoredEntry], number: int = 0) -> list[Section]:
        from . import social
        from .render import Section, article

        titles = {f.url: (f.title or "", f.link or "") for f in self.store.feeds(self.feed_urls)}
        sections: dict[str, Section] = {}
        for e in entries:
            title, link = titles.get(e.feed_url, ("", ""))
            if e.feed_url not in sections:
                sections[e.feed_url] = Section(title or e.feed_url, web_link(link))
            item = article(e, title, self.schedule.excerpt_chars)
            social.decorate(item, self.schedule, self.name, number)
            sections[e.feed_url].articles.append(item)
        return list(sections.values())

    def render(self, entries: list[StoredEntry], number: int, date: datetime) -> RenderedIssue:
        from .render import render_issue

        return render_issue(
            templates_dir=self.ctx.config.templates_dir,
            title=self.schedule.title or self.name,
            subject_template=self.schedule.subject,
            number=number,
            date=date,
            sections=self.sections(entries, number),
        )

    def latest(self) -> list[StoredEntry]:
        """The newest stored entries of the schedule's feeds, up to ``max_articles``."""
        return self.store.new_entries(
            self.feed_urls, 0, self.store.max_entry_id(), self.schedule.max_articles
        )

    def waiting(self, limit: int = 10_000) -> list[StoredEntry]:
        """Entries first seen since the last issue: what the next one is made of."""
        return self.store.new_entries(
            self.feed_urls, self.store.watermark(self.name), self.store.max_entry_id(), limit
        )

    def draft(self, force: bool) -> Draft | None:
        """The next issue, rendered but not recorded; ``force``: the latest entries when
        nothing is new. The preview shows exactly this, so what it shows is what a send sends."""
        up_to = self.store.max_entry_id()
        limit = self.schedule.max_articles
        entries = self.store.new_entries(self.feed_urls, self.store.watermark(self.name), up_to, limit)
        if not entries and force:
            entries = self.store.new_entries(self.feed_urls, 0, up_to, limit)
        if not entries:
            return None
        last = self.store.issues(self.name, 1)
        date = self.ctx.clock()
        number = (last[0].number if last else 0) + 1
        rendered = self.render(entries, number, date)
        payload = {**rendered.to_payload(), "date": date.isoformat()}
        ids = [e.id for e in entries]
        issue = Issue(0, self.name, number, date, IssueStatus.DRAFT, ids, rendered.subject, payload)
        return Draft(issue, up_to)

    def sent(self, number: int) -> Issue | None:
        """Issue ``number`` as it was recorded."""
        return self.store.issue(self.name, number)

    def reader(self, address: str | None) -> Subscriber:
        """``address`` as the stored list knows it; default the list's first subscriber."""
        if address:
            return self.store.subscriber(self.list_name, address) or Subscriber(address)
        first = next(self.store.subscribers(self.list_name, page=1), None)
        return first[0] if first else Subscriber("reader@example.com", "Sample Reader")
