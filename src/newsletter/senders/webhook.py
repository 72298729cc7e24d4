"""The ``webhook`` sender: announce articles and issues over HTTP, in one of five formats.

``format`` picks what goes over the wire (shared/notes/social-facts.md has the sources):

``json`` (default)
    A Standard Webhooks 1.0 delivery to ``url``: ``POST`` with ``Content-Type: application/json``
    and the headers ``webhook-id`` (the item's id, the same on every attempt and every run: the
    receiver's idempotency key; ``sha256_<hex>`` of the id if it is not printable ASCII),
    ``webhook-timestamp`` (unix seconds of this attempt) and
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

``slack``
    A Slack incoming webhook: ``{"text": ..., "blocks": [...]}`` with mrkdwn escaping.
``discord``
    A Discord webhook, called with ``?wait=true`` so a message that was not saved is an error,
    and ``allowed_mentions`` empty so feed text pings nobody.
``mastodon``
    ``POST {url}/api/v1/statuses`` with a Bearer token and an ``Idempotency-Key`` header.
``bluesky``
    ``com.atproto.server.createSession`` once per batch, then ``com.atproto.repo.createRecord``
    with a link facet (UTF-8 byte offsets) so the link is clickable.

HTTP outcomes, the same for every format: 2xx is delivered; 3xx is a failure (never followed: a
moved endpoint must be fixed in the configuration, and a redirect would drop a POST body);
410 raises :class:`TargetGone`; 401/403 raise :class:`DeliveryError` (no point trying the next
item with the same credentials); 429/502/503/504, timeouts and connection errors are retried
within the run (``retries`` attempts, backoff 1 s, 2 s, 4 s... or ``Retry-After``, no wait longer
than ``max_wait``) and end in :class:`TemporaryFailure`; any other 5xx is a TemporaryFailure at
once; any other 4xx is a :class:`PermanentFailure` with the status and the start of the body.

Secrets (webhook secret, access token, app password) are read from the environment when posting,
never from the configuration file. Slack and Discord webhook URLs are secrets too, so error
messages show their host only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import Field, model_validator

from .. import __version__
from ..errors import DeliveryError, PermanentFailure, TargetGone, TemporaryFailure
from ..redact import redact, remember
from ..sanitize import one_line, printable, web_link
from . import Post, Sender, SenderOptions

Format = Literal["json", "slack", "discord", "mastodon", "bluesky"]

BLUESKY_DEFAULT = "https://bsky.social"
BLUESKY_EXPIRED = ("ExpiredToken", "InvalidToken")  # createRecord's "log in again" errors
RETRY_STATUSES = frozenset({429, 502, 503, 504})
SLACK_INTERVAL = 1.0  # Slack allows about one message per second per incoming webhook
SLACK_SECTION_MAX = 3000  # characters in one section block's text
EXCERPT = 200  # characters of a refusal's body quoted in the error

# Which secret each format needs, and the options that make sense only for some formats.
_NEEDS: dict[str, tuple[str, ...]] = {
    "json": ("secret_env",),
    "mastodon": ("token_env",),
    "bluesky": ("identifier", "password_env"),
    "slack": (),
    "discord": (),
}
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "secret_env": ("json",),
    "token_env": ("mastodon",),
    "visibility": ("mastodon",),
    "identifier": ("bluesky",),
    "password_env": ("bluesky",),
}


class WebhookOptions(SenderOptions):
    url: str | None = Field(
        None,
        description="endpoint; for mastodon the instance, for bluesky the PDS (default bsky.social)",
    )
    format: Format = "json"
    secret_env: str | None = Field(None, description="json: variable holding the whsec_... secret")
    token_env: str | None = Field(None, description="mastodon: variable holding the access token")
    identifier: str | None = Field(None, description="bluesky: handle or DID")
    password_env: str | None = Field(None, description="bluesky: variable holding an app password")
    visibility: Literal["public", "unlisted", "private", "direct"] | None = Field(
        None, description="mastodon: default public"
    )
    timeout: float = Field(15.0, gt=0, description="seconds for each HTTP request")
    retries: int = Field(3, ge=1, le=10, description="attempts within one run")
    max_wait: float = Field(30.0, ge=0, description="longest single wait between attempts, seconds")

    @model_validator(mode="after")
    def _fits_format(self) -> WebhookOptions:
        for option, formats in _ONLY_FOR.items():
            if getattr(self, option) is not None and self.format not in formats:
                raise ValueError(f"{option} is only used with format {' or '.join(formats)}")
        missing = [o for o in _NEEDS[self.format] if not getattr(self, o)]
        if missing:
            raise ValueError(f"format {self.format} needs {' and '.join(missing)}")
        if self.url is None:
            if self.format != "bluesky":
                raise ValueError(f"format {self.format} needs url")
            self.url = BLUESKY_DEFAULT
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an http:// or https:// URL, not {self.url!r}")
        if self.format in ("mastodon", "bluesky"):
            self.url = self.url.rstrip("/")  # a base URL: the API paths are appended to it
        return self


# --- Small pure helpers ---------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _seconds_until(value: str, *, epoch_numbers: bool = False) -> float | None:
    """A delay header as seconds from now: a number of seconds, an HTTP date or an ISO 8601 time.

    With ``epoch_numbers`` a large number is a unix time (RateLimit-Reset), not a delay.
    """
    value = value.strip()
    now = time.time()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if epoch_numbers and number > 1e9:
            return max(0.0, number - now)
        return max(0.0, number)
    for parse in (parsedate_to_datetime, datetime.fromisoformat):
        try:
            when = parse(value)
        except (TypeError, ValueError, IndexError):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    return None


def with_query(url: str, key: str, value: str) -> str:
    """Set key=value in url's query, keeping the other parameters byte for byte."""
    parts = urlsplit(url)
    kept = [p for p in parts.query.split("&") if p and p.split("=", 1)[0] != key]
    return urlunsplit(parts._replace(query="&".join([*kept, f"{key}={value}"])))


def slack_escape(text: str) -> str:
    # Slack's mrkdwn treats <...> as links and mentions; these three are all it asks to escape.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, label: str) -> str:
    # "|" ends the URL part of <url|label>; percent-encoding it keeps the link intact.
    if not url:
        return slack_escape(label)  # an article without a usable link is named, not linked
    return f"<{slack_escape(url).replace('|', '%7C')}|{slack_escape(label or url)}>"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def defuse_mentions(text: str) -> str:
    """@everyone and @here with a zero-width space after the @: shown the same, pinging nobody."""
    # Not inside a word: me@here.example is an address, left as it is (allowed_mentions covers it).
    return re.sub(r"(?<!\w)@(everyone|here)\b", "@\u200b\\1", text)


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


def clean_post(item: Post) -> Post:
    """``item`` as a receiver may safely show it: every URL an http(s) one or "" (the filter the
    email uses: no javascript:, data: or CR/LF), no control character in any text (the post's
    text keeps its line breaks).

    An article whose link is blanked goes out without a link: the email shows it the same way,
    and its text still says what was published.
    """
    link = web_link(item.link)
    text = item.text
    if item.link.strip() and not link:
        text = text.replace(item.link.strip(), "").strip()  # a link we blanked is no link in the text
    text = "\n".join(printable(line) for line in text.replace("\r\n", "\n").split("\n"))
    return replace(
        item,
        title=one_line(item.title),
        link=link,
        summary=one_line(item.summary),
        text=text,
        hashtags=tuple(one_line(t) for t in item.hashtags),
        image_url=web_link(item.image_url),
        articles=tuple((one_line(t), web_link(a_link)) for t, a_link in item.articles),
    )


# --- The payloads, one builder per format -----------------------------------------------------


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


def slack_payload(item: Post) -> dict[str, Any]:
    # "text" is what notifications and old clients show; the blocks are what the channel shows.
    lines = [f"*{_slack_link(item.link, item.title)}*"]
    if item.summary:
        lines.append(slack_escape(item.summary))
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip("\n".join(lines), SLACK_SECTION_MAX)}}
    ]
    if item.articles:
        listing = "\n".join(f"• {_slack_link(link, title)}" for title, link in item.articles)
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(listing, SLACK_SECTION_MAX)}}
        )
    if item.hashtags:
        blocks.append(
            {"type": "context", "elements": [{"type": "plain_text", "text": " ".join(item.hashtags)}]}
        )
    return {"text": slack_escape(item.text), "blocks": blocks}


def discord_payload(item: Post) -> dict[str, Any]:
    # allowed_mentions with an empty parse list is what Discord documents for "ping nobody";
    # the zero-width space also keeps @everyone from looking like a ping to readers.
    return {"content": defuse_mentions(item.text), "allowed_mentions": {"parse": []}}


def mastodon_payload(item: Post, visibility: str) -> dict[str, Any]:
    return {"status": item.text, "visibility": visibility}


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
            "external": {"uri": item.link, "title": item.title, "description": _clip(item.summary, 300)},
        }
    return record


# --- The sender -------------------------------------------------------------------------------

Build = Callable[[], tuple[dict[str, str], bytes]]  # per attempt: headers and body


class WebhookSender(Sender):
    Options = WebhookOptions
    options: WebhookOptions
    mails = False
    posts = True

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._http: requests.Session | None = None
        self._bluesky: tuple[str, str] | None = None  # (accessJwt, did) for this batch
        self._not_before = 0.0  # monotonic time before which the target asked us not to post
        # Tests replace these to watch the waits; nothing else should need to.
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic

    # The base class declares a plain class attribute; here it depends on the options.
    @property
    def network(self) -> str:  # type: ignore[override]
        return self.options.format

    @property
    def url(self) -> str:
        assert self.options.url is not None  # the validator filled it in
        return self.options.url

    def open(self) -> None:
        if self._http is None:
            self._http = requests.Session()
            self._http.headers["User-Agent"] = f"newsletter/{__version__} (webhook sender)"

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self._bluesky = None

    def post(self, item: Post) -> str:
        self.open()  # post() also works outside open()/close(), e.g. from a test or a REPL
        item = clean_post(item)  # whoever built the item, what goes out is filtered
        fmt = self.options.format
        if fmt == "json":
            return self._post_json(item)
        if fmt == "slack":
            return self._post_slack(item)
        if fmt == "discord":
            return self._post_discord(item)
        if fmt == "mastodon":
            return self._post_mastodon(item)
        return self._post_bluesky(item)

    # --- formats ---

    def _post_json(self, item: Post) -> str:
        secret = self._secret()
        body = json.dumps(json_payload(item, _utc_now()), ensure_ascii=False).encode()

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

        resp = self._accept(self._send(self.url, build))
        found = _json(resp).get("url")
        return found if isinstance(found, str) else ""

    def _post_slack(self, item: Post) -> str:
        self._accept(self._send(self.url, _static(slack_payload(item))))
        self._not_before = max(self._not_before, self.clock() + SLACK_INTERVAL)
        return ""  # Slack answers a plain "ok": no id to keep

    def _post_discord(self, item: Post) -> str:
        # Without wait=true Discord answers 204 before saving, and a message it then drops is lost
        # silently; with it, the answer is the saved message.
        url = with_query(self.url, "wait", "true")
        message = _json(self._accept(self._send(url, _static(discord_payload(item)))))
        msg_id, channel, guild = message.get("id"), message.get("channel_id"), message.get("guild_id")
        if msg_id and channel and guild:
            return f"https://discord.com/channels/{guild}/{channel}/{msg_id}"
        return str(msg_id or "")

    def _post_mastodon(self, item: Post) -> str:
        token = self._env(self.options.token_env, "the access token (scope write:statuses)")
        headers = {
            "Authorization": f"Bearer {token}",
            # Mastodon remembers this header (not a body field) for an hour and answers a repeat
            # with the status it already made, so a retry after a lost answer posts nothing twice.
            # Hashed: the item id may hold characters a header may not.
            "Idempotency-Key": hashlib.sha256(item.id.encode()).hexdigest(),
        }
        payload = mastodon_payload(item, self.options.visibility or "public")
        status = _json(self._accept(self._send(f"{self.url}/api/v1/statuses", _static(payload, headers))))
        return str(status.get("url") or status.get("uri") or status.get("id") or "")

    def _post_bluesky(self, item: Post) -> str:
        for fresh_login in (False, True):
            jwt, did = self._bluesky_session()
            body = {
                "repo": did,
                "collection": "app.bsky.feed.post",
                "record": bluesky_record(item, _utc_now()),
            }
            resp = self._send(
                f"{self.url}/xrpc/com.atproto.repo.createRecord",
                _static(body, {"Authorization": f"Bearer {jwt}"}),
            )
            # An access token lives a couple of hours; a long batch may outlive it. Log in again
            # once rather than failing the rest of the batch.
            expired = resp.status_code in (400, 401) and _json(resp).get("error") in BLUESKY_EXPIRED
            if expired and not fresh_login:
                self._bluesky = None
                continue
            break
        uri = str(_json(self._accept(resp)).get("uri") or "")
        # at://did:plc:xyz/app.bsky.feed.post/<rkey> -> the post's address in the web app
        m = re.fullmatch(r"at://([^/]+)/app\.bsky\.feed\.post/([^/]+)", uri)
        return f"https://bsky.app/profile/{m[1]}/post/{m[2]}" if m else uri

    def _bluesky_session(self) -> tuple[str, str]:
        if self._bluesky is None:
            password = self._env(self.options.password_env, "an app password (Settings > App passwords)")
            body = {"identifier": self.options.identifier, "password": password}
            resp = self._send(f"{self.url}/xrpc/com.atproto.server.createSession", _static(body))
            if resp.status_code in (400, 401, 403):
                # Without a session nothing in this batch can be posted: stop the target's run.
                raise DeliveryError(
                    f"sender {self.name!r}: {self.url} refused the login for"
                    f" {self.options.identifier}: {resp.status_code} {self._excerpt(resp)}",
                    hint=f"check identifier (handle or DID) and the app password in"
                    f" {self.options.password_env}",
                )
            session = _json(self._accept(resp))
            jwt, did = session.get("accessJwt"), session.get("did")
            if not (isinstance(jwt, str) and isinstance(did, str)):
                raise DeliveryError(
                    f"sender {self.name!r}: {self.url} answered createSession without accessJwt and did",
                    hint="is url the PDS (e.g. https://bsky.social), not the web app?",
                )
            self._bluesky = (jwt, did)
        return self._bluesky

    # --- secrets ---

    def _env(self, name: str | None, what: str) -> str:
        value = os.environ.get(name or "", "")
        if not value:
            raise DeliveryError(
                f"sender {self.name!r}: environment variable {name} is not set",
                hint=f"export {name}=... with {what}; secrets never go into the configuration file",
            )
        remember(value)  # a receiver may echo it back in an error; it must not reach a log
        return value

    def _secret(self) -> bytes:
        name = self.options.secret_env
        raw = self._env(name, "the receiver's whsec_... signing secret")
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

    # --- HTTP ---

    def _send(self, url: str, build: Build) -> requests.Response:
        """POST until an answer that is not worth retrying now; TemporaryFailure if none comes.

        Returns the final response whatever its status: the caller decides (see ``_accept``).
        """
        # Imported here: the import block above belongs to the formats, this to the wire.
        from .. import transport

        assert self._http is not None
        opts = self.options
        problem = ""
        for attempt in range(1, opts.retries + 1):
            self._wait_turn()
            headers, body = build()
            backoff = 2.0 ** (attempt - 1)  # 1 s, 2 s, 4 s...
            try:
                # One deadline for connect, headers and body: a receiver that trickles its
                # answer cannot hold the run for longer than opts.timeout per attempt.
                resp = transport.request(
                    self._http,
                    "POST",
                    url,
                    data=body,
                    headers=headers,
                    timeout=opts.timeout,
                    allow_redirects=False,
                )
            except requests.Timeout:
                problem = f"no full answer within {opts.timeout:g} s"
                wait = backoff
            except requests.RequestException as exc:
                problem = f"cannot connect: {self._scrub(str(exc))}"
                wait = backoff
            else:
                self._note_rate_limit(resp)
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                problem = f"{resp.status_code} {self._excerpt(resp)}".strip()
                asked = _seconds_until(resp.headers.get("Retry-After", ""))
                if asked is not None and asked > opts.max_wait:
                    # Retrying sooner than the target allows only earns another refusal; leave it
                    # to a later run instead of hanging this one.
                    raise TemporaryFailure(
                        f"{self._where(url)}: {problem}; Retry-After {asked:.0f} s is more than"
                        f" max_wait {opts.max_wait:g} s, trying again on a later run"
                    )
                wait = backoff if asked is None else asked
            if attempt < opts.retries:
                self.sleep(min(wait, opts.max_wait))
        raise TemporaryFailure(f"{self._where(url)}: {problem} (after {opts.retries} attempts)")

    def _accept(self, resp: requests.Response) -> requests.Response:
        """``resp`` if it is a 2xx, else the error its status stands for."""
        status = resp.status_code
        where = self._where(resp.url)
        if 200 <= status < 300:
            return resp
        if 300 <= status < 400:
            location = self._scrub(printable(resp.headers.get("Location", "(no Location)")))
            raise PermanentFailure(
                f"{where}: {status} redirect to {location}, not followed;"
                " put the new URL in the configuration"
            )
        if status == 410:
            raise TargetGone(
                f"{where}: 410 Gone: the target was removed; sender {self.name!r} is disabled"
                " until its configuration changes"
            )
        if status in (401, 403):
            raise DeliveryError(
                f"sender {self.name!r}: {where} refused the credentials: {status} {self._excerpt(resp)}",
                hint=self._credentials_hint(),
            )
        if status >= 500:
            raise TemporaryFailure(f"{where}: {status} {self._excerpt(resp)}".strip())
        raise PermanentFailure(f"{where}: {status} {self._excerpt(resp)}".strip())

    def _credentials_hint(self) -> str:
        opts = self.options
        return {
            "json": f"check that {opts.secret_env} holds the secret the receiver expects",
            "mastodon": f"check the access token in {opts.token_env} (it needs the write:statuses scope)",
            "bluesky": f"the session was refused; check the app password in {opts.password_env}",
        }.get(opts.format, "the webhook URL may have been revoked; create a new one and update url")

    def _wait_turn(self) -> None:
        """Wait out a rate limit an earlier answer announced (never longer than max_wait)."""
        delay = min(self._not_before - self.clock(), self.options.max_wait)
        if delay > 0:
            self.sleep(delay)

    def _note_rate_limit(self, resp: requests.Response) -> None:
        # Discord (X-RateLimit-*), Mastodon (X-RateLimit-*) and Bluesky (RateLimit-*) say when the
        # bucket is empty; waiting for the reset beats walking into a 429.
        h = resp.headers
        if (h.get("X-RateLimit-Remaining") or h.get("RateLimit-Remaining") or "").strip() != "0":
            return
        reset = h.get("X-RateLimit-Reset-After")
        delay = (
            _seconds_until(reset)
            if reset
            else _seconds_until(
                h.get("X-RateLimit-Reset") or h.get("RateLimit-Reset") or "", epoch_numbers=True
            )
        )
        if delay is not None:
            self._not_before = max(self._not_before, self.clock() + delay)

    def _where(self, url: str) -> str:
        # Slack, Discord and many JSON receivers carry their secret in the URL path: show the host.
        # user:password@ is a secret in any format.
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        if self.options.format in ("mastodon", "bluesky"):
            return urlunsplit(parts._replace(netloc=host, query="", fragment=""))
        return f"{parts.scheme}://{host}/…"

    def _scrub(self, text: str) -> str:
        """``text`` (an error, a reply) without this target's secrets: the credential parts of
        its URL and whatever ``redact`` knows (env secrets, ?token=, webhook paths)."""
        parts = urlsplit(self.url)
        if parts.password:
            text = text.replace(parts.password, "***")
        if self.options.format not in ("mastodon", "bluesky"):
            if parts.path not in ("", "/"):
                text = text.replace(parts.path, "/…")
            if parts.query:
                text = text.replace(parts.query, "…")
        return redact(text)

    def _excerpt(self, resp: requests.Response) -> str:
        return self._scrub(_clip(printable(" ".join(resp.text.split())), EXCERPT))


def _static(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Build:
    """A request that is the same on every attempt: JSON ``payload`` and fixed ``headers``."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return lambda: (dict(all_headers), body)


def _json(resp: requests.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
