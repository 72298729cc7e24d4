"""The ``webhook`` sender: a signed Standard Webhooks 1.0 JSON delivery to ``url``.

``POST`` with ``Content-Type: application/json`` and the headers ``webhook-id`` (the item's id,
the same on every attempt and every run: the receiver's idempotency key; ``sha256_<hex>`` of the
id if it is not printable ASCII), ``webhook-timestamp`` (unix seconds of this attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed with the
base64-decoded part of the ``whsec_...`` secret named by ``secret_env``. The body is::

    {
      "type": "article.published" | "issue.published",
      "timestamp": "2026-01-31T08:00:00Z",      # when this run announced it (UTC)
      "data": {
        "id": str,                 # = webhook-id
        "kind": "article" | "issue",
        "schedule": str,
        "title": str,
        "link": str,               # with UTM tags when the schedule asks for them
        "summary": str,            # plain text
        "text": str,               # ready-to-post text
        "hashtags": [str, ...],    # "#BuildSystems"
        "published": str,          # ISO 8601, or ""
        "image_url": str,          # or ""
        "issue_number": int | null,
        "articles": [{"title": str, "link": str}, ...]   # an issue's articles, else []
      }
    }

Before each service had its own type, all five were ``type: webhook`` with ``format: json |
slack | discord | mastodon | bluesky``. That spelling still loads: ``WebhookOptions`` checks it
against the named service's own options, and ``WebhookSender.resolve`` hands the configuration
to that service's sender (``SlackSender``...), so ``format: slack`` is ``type: slack``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from ..errors import DeliveryError
from . import Post, Sender, SenderOptions
from .bluesky import BlueskySender
from .discord import DiscordSender
from .http import HttpOptions, HttpSender, http_url, json_of, utc_now
from .mastodon import MastodonSender
from .slack import SlackSender

Format = Literal["json", "slack", "discord", "mastodon", "bluesky"]

# format: X (the spelling from before the split) -> the sender that serves it.
_OTHER_FORMATS: dict[str, type[HttpSender]] = {
    "slack": SlackSender,
    "discord": DiscordSender,
    "mastodon": MastodonSender,
    "bluesky": BlueskySender,
}
_OWN = ("url", "secret_env")  # what format json needs, besides the HTTP options


def _keys(fmt: str) -> set[str]:
    if fmt == "json":
        return {*_OWN, *HttpOptions.model_fields}
    return set(_OTHER_FORMATS[fmt].Options.model_fields)


class WebhookOptions(HttpOptions):
    url: str | None = Field(None, description="the receiver's endpoint")
    secret_env: str | None = Field(None, description="variable holding the whsec_... secret")
    # Deprecated: type: slack (discord, mastodon, bluesky) says the same. The keys below are
    # those services' own, accepted only with their format and checked by their options.
    format: Format = "json"
    token_env: Any = None
    identifier: Any = None
    password_env: Any = None
    visibility: Any = None

    _service: SenderOptions | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _fits_format(self) -> WebhookOptions:
        given = {k for k in self.model_fields_set if k != "format" and getattr(self, k) is not None}
        for key in (k for k in type(self).model_fields if k in given - _keys(self.format)):
            formats = [f for f in ("json", *_OTHER_FORMATS) if key in _keys(f)]
            raise ValueError(f"{key} is only used with format {' or '.join(formats)}")
        if self.format == "json":
            missing = [k for k in ("secret_env", "url") if not getattr(self, k)]
            if missing:
                raise ValueError(f"format json needs {' and '.join(missing)}")
            assert self.url is not None
            http_url(self.url)
            return self
        options = _OTHER_FORMATS[self.format].Options
        try:
            self._service = options.model_validate({k: getattr(self, k) for k in given})
        except ValidationError as exc:
            errors = exc.errors()
            missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and e["loc"]]
            if missing:
                raise ValueError(f"format {self.format} needs {' and '.join(missing)}") from None
            first = errors[0]
            where = ".".join(str(p) for p in first["loc"])
            problem = first["msg"].removeprefix("Value error, ")
            raise ValueError(problem if problem.startswith(where) else f"{where}: {problem}") from None
        self.url = getattr(self._service, "url", self.url)  # as the service has it: default, no "/"
        return self

    def service(self) -> tuple[type[Sender], SenderOptions] | None:
        """For ``format`` other than json: the sender and the options that serve it."""
        if self._service is None:
            return None
        return _OTHER_FORMATS[self.format], self._service


def json_payload(item: Post, timestamp: str) -> dict[str, Any]:
    return {
        "type": f"{item.kind}.published",
        "timestamp": timestamp,
        "data": {
            "id": item.id,
            "kind": item.kind,
            "schedule": item.schedule,
            "title": item.title,
            "link": item.link,
            "summary": item.summary,
            "text": item.text,
            "hashtags": list(item.hashtags),
            "published": item.published,
            "image_url": item.image_url,
            "issue_number": item.issue_number,
            "articles": [{"title": t, "link": link} for t, link in item.articles],
        },
    }


def webhook_id(item_id: str) -> str:
    """The item's id as the webhook-id header, or its SHA-256 when it is not plain ASCII.

    An id with spaces, control or non-ASCII characters cannot travel in a header (and the id
    is part of the signed text), so those get a stable stand-in instead.
    """
    if re.fullmatch(r"[\x21-\x7e]{1,256}", item_id):
        return item_id
    return "sha256_" + hashlib.sha256(item_id.encode()).hexdigest()


def sign(secret: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks signature header value for one attempt."""
    digest = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender(HttpSender):
    Options = WebhookOptions
    options: WebhookOptions
    network = "json"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.options.format != "json":
            raise ValueError(
                f"format {self.options.format} is served by its own sender: build it with"
                " SenderSpec, or use type: " + self.options.format
            )

    @classmethod
    def resolve(cls, options: SenderOptions) -> tuple[type[Sender], SenderOptions]:
        routed = options.service() if isinstance(options, WebhookOptions) else None
        return routed or (cls, options)

    def credentials_hint(self) -> str:
        return f"check that {self.options.secret_env} holds the secret the receiver expects"

    def deliver(self, item: Post) -> str:
        secret = self._secret()
        body = json.dumps(json_payload(item, utc_now()), ensure_ascii=False).encode()
        msg_id = webhook_id(item.id)

        def build() -> tuple[dict[str, str], bytes]:
            # The id stays, the timestamp and so the signature are new on every attempt: a
            # receiver rejects old timestamps to stop replays.
            ts = str(int(time.time()))
            return {
                "Content-Type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": ts,
                "webhook-signature": sign(secret, msg_id, ts, body),
            }, body

        found = json_of(self.accept(self.request(self.url, build))).get("url")
        return found if isinstance(found, str) else ""

    def _secret(self) -> bytes:
        name = self.options.secret_env
        raw = self.env(name, "the receiver's whsec_... signing secret")
        try:
            key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not key:
            raise DeliveryError(
                f"sender {self.name!r}: {name} is not a whsec_<base64> secret",
                hint="copy the signing secret exactly as the receiver shows it",
            )
        return key
