"""The ``bluesky`` sender: an atproto session per batch, then one record per post.

``com.atproto.server.createSession`` once per batch (and once more if the access token expires
mid-batch), then ``com.atproto.repo.createRecord`` with link and tag facets in UTF-8 byte offsets
so the link is clickable, and a link card. ``url`` is the PDS (default bsky.social).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from ..errors import DeliveryError
from . import Post
from .http import HttpSender, TargetOptions, clip, json_of, static, utc_now

BLUESKY_DEFAULT = "https://bsky.social"
BLUESKY_EXPIRED = ("ExpiredToken", "InvalidToken")  # createRecord's "log in again" errors
BLUESKY_MAX = 300  # graphemes of a post's text


class BlueskyOptions(TargetOptions):
    url: str = Field(BLUESKY_DEFAULT, description="the PDS")
    identifier: str = Field(description="handle or DID")
    password_env: str = Field(description="variable holding an app password")

    @field_validator("url")
    @classmethod
    def _base(cls, url: str) -> str:
        return url.rstrip("/")  # a base URL: the API paths are appended to it


def bluesky_facets(text: str, link: str, hashtags: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Link and tag facets for a Bluesky post, with UTF-8 byte offsets (end exclusive)."""

    def span(start: int, end: int) -> dict[str, int]:
        return {"byteStart": len(text[:start].encode()), "byteEnd": len(text[:end].encode())}

    facets: list[dict[str, Any]] = []
    taken: list[tuple[int, int]] = []
    at = text.find(link) if link else -1
    if at >= 0:
        taken.append((at, at + len(link)))
        facets.append(
            {
                "index": span(at, at + len(link)),
                "features": [{"$type": "app.bsky.richtext.facet#link", "uri": link}],
            }
        )
    for tag in hashtags:
        name = tag.lstrip("#")
        if not name:
            continue
        for m in re.finditer(rf"(?<!\w)#{re.escape(name)}(?!\w)", text):
            # Facets must not overlap: a "#tag" inside the link's #fragment stays part of the link.
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            taken.append((m.start(), m.end()))
            facets.append(
                {
                    "index": span(m.start(), m.end()),
                    "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": name}],
                }
            )
    facets.sort(key=lambda f: f["index"]["byteStart"])
    return facets


def bluesky_record(item: Post, created_at: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "$type": "app.bsky.feed.post",
        "text": item.text,
        "createdAt": created_at,
    }
    facets = bluesky_facets(item.text, item.link, item.hashtags)
    if facets:
        record["facets"] = facets
    if item.link:
        # A link card: clickable even where the text holds no link. A thumbnail would need a
        # blob upload first, so the card goes without one.
        record["embed"] = {
            "$type": "app.bsky.embed.external",
            "external": {"uri": item.link, "title": item.title, "description": clip(item.summary, 300)},
        }
    return record


class BlueskySender(HttpSender):
    Options = BlueskyOptions
    options: BlueskyOptions
    network = "bluesky"
    text_rule = "bluesky"
    text_limit = BLUESKY_MAX
    secret_url = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._session: tuple[str, str] | None = None  # (accessJwt, did) for this batch

    def close(self) -> None:
        super().close()
        self._session = None

    def credentials_hint(self) -> str:
        return f"the session was refused; check the app password in {self.options.password_env}"

    def deliver(self, item: Post) -> str:
        for fresh_login in (False, True):
            jwt, did = self._login()
            body = {
                "repo": did,
                "collection": "app.bsky.feed.post",
                "record": bluesky_record(item, utc_now()),
            }
            resp = self.request(
                f"{self.url}/xrpc/com.atproto.repo.createRecord",
                static(body, {"Authorization": f"Bearer {jwt}"}),
            )
            # An access token lives a couple of hours; a long batch may outlive it. Log in again
            # once rather than failing the rest of the batch.
            expired = resp.status_code in (400, 401) and json_of(resp).get("error") in BLUESKY_EXPIRED
            if expired and not fresh_login:
                self._session = None
                continue
            break
        uri = str(json_of(self.accept(resp)).get("uri") or "")
        # at://did:plc:xyz/app.bsky.feed.post/<rkey> -> the post's address in the web app
        m = re.fullmatch(r"at://([^/]+)/app\.bsky\.feed\.post/([^/]+)", uri)
        return f"https://bsky.app/profile/{m[1]}/post/{m[2]}" if m else uri

    def _login(self) -> tuple[str, str]:
        if self._session is None:
            password = self.env(self.options.password_env, "an app password (Settings > App passwords)")
            body = {"identifier": self.options.identifier, "password": password}
            resp = self.request(f"{self.url}/xrpc/com.atproto.server.createSession", static(body))
            if resp.status_code in (400, 401, 403):
                # Without a session nothing in this batch can be posted: stop the target's run.
                raise DeliveryError(
                    f"sender {self.name!r}: {self.url} refused the login for"
                    f" {self.options.identifier}: {resp.status_code} {self.excerpt(resp)}",
                    hint=f"check identifier (handle or DID) and the app password in"
                    f" {self.options.password_env}",
                )
            session = json_of(self.accept(resp))
            jwt, did = session.get("accessJwt"), session.get("did")
            if not (isinstance(jwt, str) and isinstance(did, str)):
                raise DeliveryError(
                    f"sender {self.name!r}: {self.url} answered createSession without accessJwt and did",
                    hint="is url the PDS (e.g. https://bsky.social), not the web app?",
                )
            self._session = (jwt, did)
        return self._session
