"""The ``slack`` sender: a Slack incoming webhook, ``{"text": ..., "blocks": [...]}``.

The webhook URL is the credential (``hooks.slack.com/services/T../B../...``): errors show its
host only. Slack takes about one message a second per incoming webhook.
"""

from __future__ import annotations

from typing import Any

from . import Post
from .http import HttpSender, TargetOptions, clip, static

SLACK_INTERVAL = 1.0  # seconds between two messages to one incoming webhook
SLACK_SECTION_MAX = 3000  # characters in one section block's text


class SlackOptions(TargetOptions):
    pass


def slack_escape(text: str) -> str:
    # Slack's mrkdwn treats <...> as links and mentions; these three are all it asks to escape.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _link(url: str, label: str) -> str:
    # "|" ends the URL part of <url|label>; percent-encoding it keeps the link intact.
    if not url:
        return slack_escape(label)  # an article without a usable link is named, not linked
    return f"<{slack_escape(url).replace('|', '%7C')}|{slack_escape(label or url)}>"


def slack_payload(item: Post) -> dict[str, Any]:
    # "text" is what notifications and old clients show; the blocks are what the channel shows.
    lines = [f"*{_link(item.link, item.title)}*"]
    if item.summary:
        lines.append(slack_escape(item.summary))
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": clip("\n".join(lines), SLACK_SECTION_MAX)}}
    ]
    if item.articles:
        listing = "\n".join(f"• {_link(link, title)}" for title, link in item.articles)
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": clip(listing, SLACK_SECTION_MAX)}}
        )
    if item.hashtags:
        blocks.append(
            {"type": "context", "elements": [{"type": "plain_text", "text": " ".join(item.hashtags)}]}
        )
    return {"text": slack_escape(item.text), "blocks": blocks}


class SlackSender(HttpSender):
    Options = SlackOptions
    options: SlackOptions
    network = "slack"
    text_limit = SLACK_SECTION_MAX

    def deliver(self, item: Post) -> str:
        self.accept(self.request(self.url, static(slack_payload(item))))
        self.throttle.hold(SLACK_INTERVAL)
        return ""  # Slack answers a plain "ok": no id to keep
