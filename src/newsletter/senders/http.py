"""What every sender that posts over HTTP shares: its options, the retry loop, the status rules.

A service's sender (``webhook``, ``slack``, ``discord``, ``mastodon``, ``bluesky``) subclasses
:class:`HttpSender` and writes only its payload and its answer: ``deliver`` builds the request
and calls ``request`` and ``accept``. shared/notes/social-facts.md has the sources.

HTTP outcomes, the same for every service: 2xx is delivered; 3xx is a failure (never followed:
a moved endpoint must be fixed in the configuration, and a redirect would drop a POST body);
410 raises :class:`TargetGone`; 401/403 raise :class:`DeliveryError` (no point trying the next
item with the same credentials); 429/502/503/504, timeouts and connection errors are retried
within the run (``retries`` attempts, backoff 1 s, 2 s, 4 s... or ``Retry-After``, no wait longer
than ``max_wait``) and end in :class:`TemporaryFailure`; any other 5xx is a TemporaryFailure at
once; any other 4xx is a :class:`PermanentFailure` with the status and the start of the body.
Each request has one deadline for connect, headers and body (``transport.request``).

Secrets (webhook secret, access token, app password) are read from the environment when posting,
never from the configuration file. Where a service's URL is itself a secret (``secret_url``),
error messages show its host only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import Field, field_validator

from .. import __version__, transport
from ..errors import DeliveryError, PermanentFailure, TargetGone, TargetUnavailable, TemporaryFailure
from ..redact import redact_url, remember
from ..sanitize import one_line, printable, web_link
from . import Post, Sender, SenderOptions
from .throttle import Throttle

RETRY_STATUSES = frozenset({429, 502, 503, 504})
EXCERPT = 200  # characters of a refusal's body quoted in the error

Build = Callable[[], tuple[dict[str, str], bytes]]  # per attempt: headers and body


def http_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; a ValueError naming the option if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must be an http:// or https:// URL, not {url!r}")
    return url


class HttpOptions(SenderOptions):
    timeout: float = Field(15.0, gt=0, description="seconds for each HTTP request")
    retries: int = Field(3, ge=1, le=10, description="attempts within one run")
    max_wait: float = Field(30.0, ge=0, description="longest single wait between attempts, seconds")


class TargetOptions(HttpOptions):
    """A service reached at one URL given in the configuration."""

    url: str = Field(description="the endpoint")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        return http_url(url)


# --- Small pure helpers ---------------------------------------------------------------------------


def utc_now() -> str:
    """Now as the services want it: ISO 8601 in UTC with milliseconds and a Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def seconds_until(value: str, *, epoch_numbers: bool = False) -> float | None:
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


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def static(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Build:
    """A request that is the same on every attempt: JSON ``payload`` and fixed ``headers``."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return lambda: (dict(all_headers), body)


def json_of(resp: requests.Response) -> dict[str, Any]:
    """The answer's JSON object, or {} when it is none."""
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# --- The sender -------------------------------------------------------------------------------


class HttpSender(Sender):
    """The base of a service's sender: subclasses set ``Options`` and write ``deliver``."""

    Options: ClassVar[type[SenderOptions]] = TargetOptions
    options: HttpOptions
    mails = False
    posts = True
    secret_url: ClassVar[bool] = True  # the URL's path and query are the credential: show its host only

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._http: requests.Session | None = None
        # Tests replace these to watch the waits; nothing else should need to.
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic
        # Looked up on each call, so replacing sleep or clock above reaches the throttle too.
        self.throttle = Throttle(
            max_wait=self.options.max_wait,
            clock=lambda: self.clock(),
            sleep=lambda seconds: self.sleep(seconds),
        )

    @property
    def url(self) -> str:
        url = getattr(self.options, "url", None)
        assert isinstance(url, str), "the options of an HTTP target hold its url"
        return url

    def open(self) -> None:
        if self._http is None:
            self._http = requests.Session()
            self._http.headers["User-Agent"] = f"newsletter/{__version__} (webhook sender)"

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def post(self, item: Post) -> str:
        self.open()  # post() also works outside open()/close(), e.g. from a test or a REPL
        return self.deliver(clean_post(item))  # whoever built the item, what goes out is filtered

    def deliver(self, item: Post) -> str:
        """Post the filtered ``item``; return where it landed (a URL or id), or ""."""
        raise NotImplementedError

    def credentials_hint(self) -> str:
        """What to check when the target refuses the credentials (401/403)."""
        return "the webhook URL may have been revoked; create a new one and update url"

    # --- secrets ---

    def env(self, name: str | None, what: str) -> str:
        """The secret in environment variable ``name``; a DeliveryError saying ``what`` if unset."""
        value = os.environ.get(name or "", "")
        if not value:
            raise DeliveryError(
                f"sender {self.name!r}: environment variable {name} is not set",
                hint=f"export {name}=... with {what}; secrets never go into the configuration file",
            )
        remember(value)  # a receiver may echo it back in an error; it must not reach a log
        return value

    def scrub(self, text: str) -> str:
        """``text`` (an error, a reply, a URL) without this target's secrets."""
        return redact_url(text, self.url, secret_path=self.secret_url)

    def excerpt(self, resp: requests.Response) -> str:
        return self.scrub(clip(printable(" ".join(resp.text.split())), EXCERPT))

    # --- HTTP ---

    def request(self, url: str, build: Build) -> requests.Response:
        """POST until an answer that is not worth retrying now; TemporaryFailure if none comes.

        Returns the final response whatever its status: the caller decides (see ``accept``).
        """
        assert self._http is not None
        opts = self.options
        problem = ""
        answered = False  # an HTTP status came back: the target is there, this item failed
        for attempt in range(1, opts.retries + 1):
            self.throttle.wait()
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
                problem, answered = f"no full answer within {opts.timeout:g} s", False
                wait = backoff
            except requests.RequestException as exc:
                problem, answered = f"cannot connect: {self.scrub(str(exc))}", False
                wait = backoff
            else:
                answered = True
                self._note_rate_limit(resp)
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                problem = f"{resp.status_code} {self.excerpt(resp)}".strip()
                asked = seconds_until(resp.headers.get("Retry-After", ""))
                if asked is not None and asked > opts.max_wait:
                    # Retrying sooner than the target allows only earns another refusal; leave it
                    # to a later run instead of hanging this one.
                    raise TargetUnavailable(
                        f"{self.scrub(url)}: {problem}; Retry-After {asked:.0f} s is more than"
                        f" max_wait {opts.max_wait:g} s, trying again on a later run"
                    )
                wait = backoff if asked is None else asked
            if attempt < opts.retries:
                self.sleep(min(wait, opts.max_wait))
        failure = TemporaryFailure if answered else TargetUnavailable
        raise failure(f"{self.scrub(url)}: {problem} (after {opts.retries} attempts)")

    def accept(self, resp: requests.Response) -> requests.Response:
        """``resp`` if it is a 2xx, else the error its status stands for."""
        status = resp.status_code
        where = self.scrub(resp.url)
        if 200 <= status < 300:
            return resp
        if 300 <= status < 400:
            location = self.scrub(printable(resp.headers.get("Location", "(no Location)")))
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
                f"sender {self.name!r}: {where} refused the credentials: {status} {self.excerpt(resp)}",
                hint=self.credentials_hint(),
            )
        if status >= 500:
            raise TemporaryFailure(f"{where}: {status} {self.excerpt(resp)}".strip())
        raise PermanentFailure(f"{where}: {status} {self.excerpt(resp)}".strip())

    def _note_rate_limit(self, resp: requests.Response) -> None:
        # Discord (X-RateLimit-*), Mastodon (X-RateLimit-*) and Bluesky (RateLimit-*) say when the
        # bucket is empty; waiting for the reset beats walking into a 429.
        h = resp.headers
        if (h.get("X-RateLimit-Remaining") or h.get("RateLimit-Remaining") or "").strip() != "0":
            return
        reset = h.get("X-RateLimit-Reset-After")
        delay = (
            seconds_until(reset)
            if reset
            else seconds_until(
                h.get("X-RateLimit-Reset") or h.get("RateLimit-Reset") or "", epoch_numbers=True
            )
        )
        if delay is not None:
            self.throttle.hold(delay)
