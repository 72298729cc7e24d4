"""The ``mastodon`` sender: ``POST {url}/api/v1/statuses`` with a Bearer token.

``url`` is the instance. An ``Idempotency-Key`` header makes a retry after a lost answer post
nothing twice.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field, field_validator

from . import Post
from .http import HttpSender, TargetOptions, json_of, static

Visibility = Literal["public", "unlisted", "private", "direct"]


class MastodonOptions(TargetOptions):
    url: str = Field(description="the instance, e.g. https://mastodon.social")
    token_env: str = Field(description="variable holding the access token (scope write:statuses)")
    visibility: Visibility = "public"

    @field_validator("url")
    @classmethod
    def _base(cls, url: str) -> str:
        return url.rstrip("/")  # a base URL: the API path is appended to it


def mastodon_payload(item: Post, visibility: str) -> dict[str, Any]:
    return {"status": item.text, "visibility": visibility}


class MastodonSender(HttpSender):
    Options = MastodonOptions
    options: MastodonOptions
    network = "mastodon"
    text_rule = "mastodon"
    text_limit = None  # per instance: the schedule's share.mastodon_limit says it (500 by default)
    secret_url = False

    def credentials_hint(self) -> str:
        return f"check the access token in {self.options.token_env} (it needs the write:statuses scope)"

    def deliver(self, item: Post) -> str:
        token = self.env(self.options.token_env, "the access token (scope write:statuses)")
        headers = {
            "Authorization": f"Bearer {token}",
            # Mastodon remembers this header (not a body field) for an hour and answers a repeat
            # with the status it already made, so a retry after a lost answer posts nothing twice.
            # Hashed: the item id may hold characters a header may not.
            "Idempotency-Key": hashlib.sha256(item.id.encode()).hexdigest(),
        }
        payload = mastodon_payload(item, self.options.visibility)
        status = json_of(self.accept(self.request(f"{self.url}/api/v1/statuses", static(payload, headers))))
        return str(status.get("url") or status.get("uri") or status.get("id") or "")
