"""Sharing: the share line under each article, snippet texts, UTM tags, and posting to webhooks.

Everything here is worked out once per article and issue, never per subscriber. Posts go
through the ledger like email deliveries: a row per (target, item) is recorded as pending
before anything is posted, and marked once the target answered, so a rerun or a crash never
posts twice (beyond the one post in flight) and never skips one.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from markupsafe import Markup

from . import share
from .config import Config, PostTarget, Schedule
from .errors import DeliveryError, PermanentFailure, TargetGone, TargetUnavailable, TemporaryFailure
from .locks import ScheduleLock
from .model import PostKind, PostStatus, StoredEntry, now
from .redact import redact
from .render import Article
from .sanitize import html_to_text, one_line, printable, web_link
from .senders import Post, Sender
from .store import Store

LABELS = {
    "x": "X",
    "mastodon": "Mastodon",
    "bluesky": "Bluesky",
    "threads": "Threads",
    "linkedin": "LinkedIn",
    "facebook": "Facebook",
    "reddit": "Reddit",
    "telegram": "Telegram",
    "whatsapp": "WhatsApp",
    "email": "Email",
}
FIRST_POST_WINDOW = timedelta(days=1)  # a new target announces only entries of the last day
# What render.article shows for an entry without a title; shared, it would be noise, so an
# untitled entry (a micro-post) is shared by its text instead.
UNTITLED = "(untitled)"


def _campaign(schedule: Schedule, name: str, issue: int | str) -> str:
    assert schedule.utm is not None
    return schedule.utm.campaign.replace("{schedule}", name).replace("{issue}", str(issue))


def tagged(link: str, schedule: Schedule, name: str, issue: int | str, network: str | None = None) -> str:
    """The article link with the schedule's UTM tags: the email's own, or a network's."""
    utm = schedule.utm
    if utm is None:
        return link
    if network is None:
        return share.add_utm(link, utm.source, utm.medium, _campaign(schedule, name, issue), utm.content)
    return share.add_utm(link, network, "social", _campaign(schedule, name, issue), utm.content)


def snippets(
    schedule: Schedule,
    name: str,
    title: str,
    summary: str,
    link: str,
    categories: list[str],
    issue: int | str,
) -> tuple[dict[str, str], dict[str, str]]:
    """Ready-to-post text per network, each within that network's own limit, and, apart, why a
    network got none (a link longer than its whole limit): one long link costs that network only.
    """
    out, unfit = {}, {}
    for network in share.NETWORKS:
        template = schedule.share.templates.get(network) or schedule.share.template
        limit = schedule.share.mastodon_limit if network == "mastodon" else None
        try:
            out[network] = share.snippet(
                network,
                title,
                summary,
                tagged(link, schedule, name, issue, network),
                categories,
                template,
                limit,
            )
        except share.LinkTooLong as exc:
            unfit[network] = exc.reason
    return out, unfit


def decorate(article: Article, schedule: Schedule, name: str, issue: int) -> None:
    """UTM-tag the article's link and give it its share line (once per issue)."""
    original = article.link
    article.link = tagged(original, schedule, name, issue)
    if not schedule.share.networks or not web_link(original):
        return
    title = "" if article.title == UNTITLED else article.title
    summary = "" if title else article.summary_text
    article.share_links = []
    for n in schedule.share.networks:
        # Each network's link carries its own utm_source, also where only url= is honoured.
        link = tagged(original, schedule, name, issue, n)
        try:
            text = None
            if n not in ("reddit", "email", "linkedin", "facebook"):
                text = share.snippet(
                    n, title, summary, link, article.categories, schedule.share.link_template
                )
            url = share.share_link(n, title, link, text, schedule.share.mastodon_instance, summary)
        except share.LinkTooLong:
            continue  # no share link for this network; the others keep theirs
        if url is not None:
            article.share_links.append((LABELS[n], url))


# -- posting -------------------------------------------------------------------------------------


@dataclass
class PostReport:
    target: str
    posted_now: int = 0  # in this run
    posted: int = 0  # in all
    pending: int = 0
    failed: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    disabled: str = ""  # why the target is off (410 Gone, bad credentials)


def _wanted(target: PostTarget, entry: StoredEntry) -> bool:
    if not target.categories:
        return True
    wanted = {c.lower() for c in target.categories}
    return any(c.lower() in wanted for c in entry.categories)


def item_id(name: str, target: str, kind: str, ref: int | str) -> str:
    # Stable across retries and runs: it is the webhook-id / Idempotency-Key the target sees.
    digest = hashlib.sha256(f"{name}\0{target}\0{kind}\0{ref}".encode()).hexdigest()[:24]
    return f"nl_{kind}_{digest}"


def queue_articles(config: Config, store: Store, name: str) -> int:
    """Record a pending post for every new article and article target of the schedule."""
    schedule = config.schedule(name)
    feed_urls = [config.feed_url(f) for f in schedule.feeds]
    queued = 0
    for target in schedule.post:
        if target.each != "article":
            continue
        key = f"post_watermark:{name}:{target.to}"
        up_to = store.max_entry_id()
        mark = store.meta(key)
        entries = store.new_entries(feed_urls, int(mark) if mark else 0, up_to, 10_000)
        if mark is None:
            # A target added to a schedule with history announces only what is recent.
            since = now() - FIRST_POST_WINDOW
            entries = [e for e in entries if e.first_seen >= since]
        with store.transaction():
            for e in reversed(entries):  # oldest first, the order they were published in
                if _wanted(target, e):
                    pid = item_id(name, target.to, PostKind.ARTICLE, e.id)
                    queued += store.queue_post(target.to, pid, name, PostKind.ARTICLE, e.id)
            store.set_meta(key, str(up_to))
    return queued


def queue_issue(config: Config, store: Store, name: str, number: int, issue_id: int) -> None:
    for target in config.schedule(name).post:
        if target.each == "issue":
            store.queue_post(
                target.to, item_id(name, target.to, PostKind.ISSUE, number), name, PostKind.ISSUE, issue_id
            )


class _Unpostable(Exception):
    """This item can never be posted to this target (its link is over the network's limit)."""

    def __init__(self, title: str, reason: str) -> None:
        super().__init__(reason)
        self.title = title


def _post_item(
    config: Config, store: Store, name: str, target: PostTarget, kind: str, ref: int, sender: Sender, pid: str
) -> Post | None:
    # Every URL goes through the email's own filter (a javascript: or data: link the email
    # blanked is posted without a link, not as one), and no text field carries a control
    # character: receivers show these fields as they are.
    schedule = config.schedule(name)
    network = str(sender.network)
    if kind == PostKind.ARTICLE:
        found = store.entries([ref])
        if not found:
            return None
        e = found[0]
        title = one_line(e.title)
        summary = printable(html_to_text(e.summary_html))
        link = tagged(web_link(e.link), schedule, name, "posts", network)
        text = _text(sender, title, summary, link, e.categories, target.template, schedule)
        return Post(
            pid,
            "article",
            name,
            title,
            link,
            summary,
            text,
            tuple(share.hashtags_from(e.categories)),
            e.published.isoformat(),
            web_link(e.image_url),
        )
    issue = store.issue_by_id(ref)
    if issue is None:
        return None
    arts = tuple(
        (one_line(e.title), tagged(web_link(e.link), schedule, name, issue.number, network))
        for e in store.entries(issue.entry_ids)
    )
    link = next((a_link for _, a_link in arts if a_link), "")
    subject = one_line(issue.subject)
    summary = " · ".join(t for t, _ in arts)
    text = _text(sender, subject, summary, link, [], target.template, schedule)
    return Post(
        pid,
        "issue",
        name,
        subject,
        link,
        summary,
        text,
        (),
        issue.created_at.isoformat(),
        "",
        issue.number,
        arts,
    )


def _text(
    sender: Sender,
    title: str,
    summary: str,
    link: str,
    categories: list[str],
    template: str | None,
    schedule: Schedule,
) -> str:
    # The sender says how its service counts and how long a post may be. Mastodon's length is
    # per instance (share.mastodon_limit); the services that count like it (Slack, Discord,
    # signed JSON) allow far more, and get a toot-sized text too.
    rule, limit = sender.text_rule, sender.text_limit
    if rule == "mastodon":
        mastodon = schedule.share.mastodon_limit
        limit = mastodon if limit is None else min(limit, mastodon)
    try:
        return share.snippet(rule, title, summary, link, categories, template, limit)
    except share.LinkTooLong as exc:
        raise _Unpostable(title or link[:80], f"not posted: {exc.reason}") from None


def _said(exc: Exception) -> str:
    # A target's error quotes its URL and its reply, and either may hold a token (Slack and
    # Discord URLs are one, a receiver may echo ?token=): blanked before it is stored or shown.
    return redact(str(exc))


def post_pending(config: Config, store: Store, name: str) -> list[PostReport]:
    """Post every pending item of the schedule's targets; one report per target."""
    schedule = config.schedule(name)
    reports = []
    for target in {t.to: t for t in schedule.post}.values():
        report = PostReport(target.to)
        reports.append(report)
        sender = config.sender(target.to)  # its own instance: jobs run in threads at once
        fingerprint = hashlib.sha256(sender.options.model_dump_json().encode()).hexdigest()
        disabled = store.disabled_target(target.to)
        if disabled is not None and disabled.fingerprint != fingerprint:
            # The configuration changed since (a new token, a new URL): worth trying again.
            store.enable_target(target.to)
            disabled = None
        if disabled is not None:
            report.disabled = disabled.reason
            report.pending = len(store.pending_posts(target.to, name))
            continue
        try:
            with sender:
                for post in store.pending_posts(target.to, name):
                    pid, kind, ref, attempts = post.item_id, post.kind, post.ref, post.attempts
                    try:
                        item = _post_item(config, store, name, target, kind, ref, sender, pid)
                    except _Unpostable as exc:
                        # For good: retrying cannot make the link shorter, and it must not hold
                        # up the items behind it.
                        store.record_post(target.to, pid, PostStatus.FAILED, str(exc))
                        report.errors.append((exc.title, str(exc)))
                        continue
                    if item is None:
                        gone = "the article is no longer stored"
                        store.record_post(target.to, pid, PostStatus.FAILED, gone)
                        continue
                    label = item.title or item.link
                    try:
                        where = sender.post(item)
                    except TargetGone as exc:
                        store.record_post(target.to, pid, PostStatus.PENDING, _said(exc))
                        store.disable_target(target.to, _said(exc), fingerprint)
                        report.disabled = _said(exc)
                        break
                    except TemporaryFailure as exc:
                        # Unavailable: the next items would wait out the same deadline, item
                        # after item; they stay pending for the next run instead.
                        stop = isinstance(exc, TargetUnavailable)
                        give_up = attempts + 1 >= schedule.max_attempts
                        status = PostStatus.FAILED if give_up else PostStatus.PENDING
                        store.record_post(target.to, pid, status, _said(exc))
                        report.errors.append((label, _said(exc)))
                        if stop:
                            break
                    except PermanentFailure as exc:
                        store.record_post(target.to, pid, PostStatus.FAILED, _said(exc))
                        report.errors.append((label, _said(exc)))
                    else:
                        store.record_post(target.to, pid, PostStatus.SENT, "", where)
                        report.posted_now += 1
        except DeliveryError as exc:
            report.disabled = _said(exc) + (f" ({redact(exc.hint)})" if exc.hint else "")
        counts = store.post_counts(target.to, name)
        report.posted, report.pending, report.failed = counts.sent, counts.pending, counts.failed
    return reports


def post_new(
    config: Config, store: Store, name: str, *, wait: float = 0.0, stop: threading.Event | None = None
) -> list[PostReport]:
    """Queue the schedule's new articles for its article targets and post everything pending."""
    with ScheduleLock(config.database_url, store, name, wait, stop):
        queue_articles(config, store, name)
        return post_pending(config, store, name)


@dataclass
class ArticleSnippets:
    title: str
    link: str
    snippets: dict[str, tuple[str, int, int]]  # network: (text, its count by that network's rule, limit)
    share_links: list[tuple[str, str]]
    unfit: dict[str, str] = field(default_factory=dict)  # network: why it has no snippet


def newest_snippets(config: Config, store: Store, name: str, limit: int = 5) -> list[ArticleSnippets]:
    """Snippets for the newest stored articles of a schedule (`newsletter share`)."""
    feed_urls = [config.feed_url(f) for f in config.schedule(name).feeds]
    return entry_snippets(config, name, store.new_entries(feed_urls, 0, store.max_entry_id(), limit))


def entry_snippets(config: Config, name: str, entries: list[StoredEntry]) -> list[ArticleSnippets]:
    schedule = config.schedule(name)
    out = []
    for e in entries:
        # Title and link go to a terminal and a web page as they are: filtered like the email's.
        title, link, summary = one_line(e.title), web_link(e.link), printable(html_to_text(e.summary_html))
        texts, unfit = snippets(schedule, name, title, summary, link, e.categories, "share")
        counted = {}
        for network, text in texts.items():
            cap = schedule.share.mastodon_limit if network == "mastodon" else share.NETWORKS[network].limit
            counted[network] = (text, share.count(network, text), cap)
        art = Article(title, link, Markup(""), summary, "", e.published, "", e.categories, "")
        decorate(art, schedule, name, 0)
        out.append(ArticleSnippets(title, link, counted, art.share_links, unfit))
    return out
