"""The ``discord`` sender: a Discord webhook that pings nobody and waits for the saved message.

Called with ``?wait=true``, so a message Discord did not save is an error, and with
``allowed_mentions`` empty, so feed text pings nobody. The webhook URL is the credential:
errors show its host only.
"""

from __future__ import annotations

import re
from typing import Any

from . import Post
from .http import HttpSender, TargetOptions, json_of, static, with_query

DISCORD_MAX = 2000  # characters of a message's content


class DiscordOptions(TargetOptions):
    pass


def defuse_mentions(text: str) -> str:
    """@everyone and @here with a zero-width space after the @: shown the same, pinging nobody."""
    # Not inside a word: me@here.example is an address, left as it is (allowed_mentions covers it).
    return re.sub(r"(?<!\w)@(everyone|here)\b", "@\u200b\\1", text)


def discord_payload(item: Post) -> dict[str, Any]:
    # allowed_mentions with an empty parse list is what Discord documents for "ping nobody";
    # the zero-width space also keeps @everyone from looking like a ping to readers.
    return {"content": defuse_mentions(item.text), "allowed_mentions": {"parse": []}}


class DiscordSender(HttpSender):
    Options = DiscordOptions
    options: DiscordOptions
    network = "discord"
    text_limit = DISCORD_MAX

    def deliver(self, item: Post) -> str:
        # Without wait=true Discord answers 204 before saving, and a message it then drops is lost
        # silently; with it, the answer is the saved message.
        url = with_query(self.url, "wait", "true")
        message = json_of(self.accept(self.request(url, static(discord_payload(item)))))
        msg_id, channel, guild = message.get("id"), message.get("channel_id"), message.get("guild_id")
        if msg_id and channel and guild:
            return f"https://discord.com/channels/{guild}/{channel}/{msg_id}"
        return str(msg_id or "")
