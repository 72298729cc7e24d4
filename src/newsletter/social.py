"""Sharing: the share line under each article, snippet texts, UTM tags, and posting to webhooks.

Everything here is worked out once per article and issue, never per subscriber. Posts go
through the ledger like email deliveries: a row per (target, item) is recorded as pending
before anything is posted, and marked once the target answered, so a rerun or a crash never
posts twice (beyond the one post in flight) and never skips one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from markupsafe import Markup

from . import share
from .config import Config, PostTarget, Schedule
from .deliver import Attempt, Outcome, Run, Unsendable, deliver
from .errors import DeliveryError
from .locks import ScheduleLock
from .model import PendingPost, PostKind, PostStatus, StoredEntry
from .redact import redact
from .render import Article
from .sanitize import html_to_text, one_line, printable, web_link
from .senders import Post, Sender

if TYPE_CHECKING:
    from .context import RunContext

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
            article.share_links.append((share.NETWORKS[n].label, url))


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


def queue_articles(ctx: RunContext, name: str) -> int:
    """Record a pending post for every new article and article target of the schedule."""
    config, store = ctx.config, ctx.store
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
            since = ctx.clock() - FIRST_POST_WINDOW
            entries = [e for e in entries if e.first_seen >= since]
        with store.transaction():
            for e in reversed(entries):  # oldest first, the order they were published in
                if _wanted(target, e):
                    pid = item_id(name, target.to, PostKind.ARTICLE, e.id)
                    queued += store.queue_post(target.to, pid, name, PostKind.ARTICLE, e.id)
            store.set_meta(key, str(up_to))
    return queued


def queue_issue(ctx: RunContext, name: str, number: int, issue_id: int) -> None:
    for target in ctx.config.schedule(name).post:
        if target.each == "issue":
            ctx.store.queue_post(
                target.to, item_id(name, target.to, PostKind.ISSUE, number), name, PostKind.ISSUE, issue_id
            )


def _post_item(
    ctx: RunContext, name: str, target: PostTarget, kind: str, ref: int, sender: Sender, pid: str
) -> Post | None:
    # Every URL goes through the email's own filter (a javascript: or data: link the email
    # blanked is posted without a link, not as one), and no text field carries a control
    # character: receivers show these fields as they are.
    store = ctx.store
    schedule = ctx.config.schedule(name)
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
        # For good: retrying cannot make the link shorter, and it must not hold up the items
        # behind it.
        raise Unsendable(title or link[:80], f"not posted: {exc.reason}") from None


def post_pending(ctx: RunContext, name: str) -> list[PostReport]:
    """Post every pending item of the schedule's targets; one report per target."""
    targets = {t.to: t for t in ctx.config.schedule(name).post}
    return [_post_to(ctx, name, target) for target in targets.values()]


def _post_to(ctx: RunContext, name: str, target: PostTarget) -> PostReport:
    store = ctx.store
    report = PostReport(target.to)
    sender = ctx.sender(target.to)  # its own instance: jobs run in threads at once
    # Sorted keys: reordering an Options class's fields must not look like a new configuration.
    options = json.dumps(sender.options.model_dump(mode="json"), sort_keys=True)
    fingerprint = hashlib.sha256(options.encode()).hexdigest()
    disabled = store.disabled_target(target.to)
    if disabled is not None and disabled.fingerprint != fingerprint:
        # The configuration changed since (a new token, a new URL): worth trying again.
        store.enable_target(target.to)
        disabled = None
    if disabled is not None:
        report.disabled = disabled.reason
        report.pending = len(store.pending_posts(target.to, name))
        return report

    def prepare(post: PendingPost) -> Attempt | None:
        item = _post_item(ctx, name, target, post.kind, post.ref, sender, post.item_id)
        if item is None:
            gone = "the article is no longer stored"
            store.record_post(target.to, post.item_id, PostStatus.FAILED, gone)
            return None
        return Attempt(lambda: sender.post(item), post.attempts, item.title or item.link)

    def record(post: PendingPost, outcome: Outcome, error: str, where: str) -> None:
        store.record_post(target.to, post.item_id, PostStatus(outcome), error, where)

    # A target's error quotes its URL and its reply, and either may hold a token (Slack and
    # Discord URLs are one, a receiver may echo ?token=): blanked before it is stored or shown.
    max_attempts = ctx.config.schedule(name).max_attempts
    run = Run()
    try:
        with sender:
            pending = store.pending_posts(target.to, name)
            run = deliver(pending, prepare, record, max_attempts=max_attempts, stop=ctx.stop)
    except DeliveryError as exc:  # opening or closing the sender
        run.aborted = redact(exc.with_hint())
    report.errors += run.errors
    report.posted_now = run.sent
    if run.gone:
        store.disable_target(target.to, run.gone, fingerprint)
    report.disabled = run.gone or run.aborted
    counts = store.post_counts(target.to, name)
    report.posted, report.pending, report.failed = counts.sent, counts.pending, counts.failed
    return report


def post_new(ctx: RunContext, name: str, *, wait: float = 0.0) -> list[PostReport]:
    """Queue the schedule's new articles for its article targets and post everything pending."""
    with ScheduleLock(ctx.config.open_store, ctx.store, name, wait, ctx.stop):
        queue_articles(ctx, name)
        return post_pending(ctx, name)


@dataclass
class ArticleSnippets:
    title: str
    link: str
    snippets: dict[str, tuple[str, int, int]]  # network: (text, its count by that network's rule, limit)
    share_links: list[tuple[str, str]]
    unfit: dict[str, str] = field(default_factory=dict)  # network: why it has no snippet


def newest_snippets(ctx: RunContext, name: str, limit: int = 5) -> list[ArticleSnippets]:
    """Snippets for the newest stored articles of a schedule (`newsletter share`)."""
    config, store = ctx.config, ctx.store
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
