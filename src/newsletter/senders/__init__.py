"""Sender plugins.

A sender is a small class with its options declared as a pydantic model. Built-in senders are
registered exactly like third-party ones, through the ``newsletter.senders`` entry point group
in a package's metadata::

    [project.entry-points."newsletter.senders"]
    smtp = "newsletter.senders.smtp:SmtpSender"

One module per service: ``smtp`` and ``file`` mail; ``webhook`` (Standard Webhooks JSON),
``slack``, ``discord``, ``mastodon`` and ``bluesky`` post, sharing the HTTP layer in
``senders/http.py``; ``senders/throttle.py`` paces HTTP targets, ``quota.py`` SMTP.

``send`` (email) and ``post`` (webhooks) raise :class:`TemporaryFailure` (retry later) or
:class:`PermanentFailure` (give up) for one item, :class:`TargetGone` when the target is gone
for good (HTTP 410), and :class:`DeliveryError` when the sender cannot go on at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

ENTRY_POINT_GROUP = "newsletter.senders"


class SenderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Outgoing:
    """One finished message: the bytes on the wire and the envelope."""

    envelope_from: str
    recipient: str
    message_id: str
    data: bytes
    label: str  # "<schedule>-<issue number>", for senders that file messages away
    dot_safe: bool = False  # no line starts with a dot: SMTP need not scan it for stuffing


@dataclass(frozen=True)
class Post:
    """One thing to announce to a webhook target: a new article, or a whole issue."""

    id: str  # stable across retries and runs: the idempotency key (webhook-id, Idempotency-Key)
    kind: str  # "article" or "issue"
    schedule: str
    title: str
    link: str  # with UTM tags when the schedule asks for them
    summary: str  # plain text
    text: str  # ready-to-post text for the target's network, already within its limits
    hashtags: tuple[str, ...] = ()
    published: str = ""  # ISO 8601
    image_url: str = ""
    issue_number: int | None = None
    articles: tuple[tuple[str, str], ...] = ()  # (title, link) of an issue's articles


@dataclass(eq=False)
class Job:
    """One message handed to a sender that sends many at once (see ``Sender.lanes``)."""

    message: Outgoing
    ref: object = None  # the delivery loop's own: which ledger row this is
    # False once the message must not go any more (its batch's lease ran out while this
    # process was paused: another process sends it now). Asked as the sender takes the job.
    valid: Callable[[], bool] | None = None


class Feed(Protocol):
    """What the delivery loop offers a sender with lanes (``Sender.send_many``); it is called
    from the thread that called ``send_many``, and only from it."""

    stop: threading.Event  # set when the run is stopped (SIGTERM): no new message then

    def take(self) -> Job | None:
        """The next message; None when there is no more for this run."""

    def done(self, job: Job, error: Exception | None) -> None:
        """The server's answer: None (accepted), TemporaryFailure or PermanentFailure. Kept
        until the next ``flush``."""

    def flush(self) -> None:
        """Write every outcome given since the last flush, together. A connection's next end
        of data goes out only after its last outcome is flushed, so that a killed process has
        at most one message per connection of unknown fate."""

    def give_back(self, jobs: list[Job]) -> None:
        """Messages taken and not answered, when the send ends early: they stay pending."""

    def tick(self) -> None:
        """Called between two flushes at least a few times a second, however slow the server."""


class Sender:
    Options: ClassVar[type[SenderOptions]] = SenderOptions
    mails: ClassVar[bool] = True  # can deliver email messages (send)
    posts: ClassVar[bool] = False  # can announce articles and issues (post)
    network: ClassVar[str] = ""  # the service's name: the utm_source of the links it posts
    # How the service counts a post's text (a network of share.py: "mastodon" counts characters
    # and a link as 23) and the most it takes by that count; None: no limit of its own. Under
    # the "mastodon" rule the schedule's share.mastodon_limit caps it too (Mastodon's own limit
    # is per instance, and the services that count like it get a toot-sized text).
    text_rule: ClassVar[str] = "mastodon"
    text_limit: ClassVar[int | None] = None

    def __init__(self, name: str, options: SenderOptions, base_dir: Path) -> None:
        self.name = name
        self.options = options
        self.base_dir = base_dir

    @classmethod
    def resolve(cls, options: SenderOptions) -> tuple[type[Sender], SenderOptions]:
        """The type and options that serve a configuration of this type: itself, unless the
        options are a deprecated spelling of another type (``type: webhook, format: slack``)."""
        return cls, options

    def open(self) -> None:
        """Called once before a batch; connect here."""

    def send(self, message: Outgoing) -> None:
        raise NotImplementedError

    def post(self, item: Post) -> str:
        """Announce ``item``; return where it landed (a URL or id) for the ledger."""
        raise NotImplementedError

    def close(self) -> None:
        """Called once after a batch, also after errors."""

    def remember(self, history: list[tuple[datetime, int]], wall: Callable[[], datetime]) -> None:
        """What this sender sent in the last day, hour by hour (the store's count), and the
        clock to count on: for a sender with a day quota. Called before ``open``."""

    def counts_days(self) -> bool:
        """True for a sender with a day quota: it is told the store's count again while it
        sends (``recount``), since other processes send through it too."""
        return False

    def recount(self, history: list[tuple[datetime, int]]) -> None:
        """The store's count of the last day again, every process's sends included."""

    def quota_reached(self) -> Exception | None:
        """Asked after ``remember``, before ``open``: why nothing at all may go now (a day
        quota used up), so that nothing is opened. None: go on."""
        return None

    def lanes(self) -> int:
        """How many messages this sender can have on the way at once (its connections).

        0 (the default): the delivery loop calls ``send`` for one message after another. A
        sender that returns N gets ``send_many`` called once after ``open``.
        """
        return 0

    def send_many(self, feed: Feed) -> None:
        """Send messages taken from ``feed`` until it has none left, up to ``lanes()`` at
        once; report each with ``feed.done``, give back what is left when ending early, and
        raise why (DeliveryError). Runs in the delivery loop's thread."""
        raise NotImplementedError

    def __enter__(self) -> Sender:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class SenderSpec:
    """A sender as schedules.yaml declares it: its class and validated options, nothing open.

    Jobs of the daemon and requests of the web apps run in threads at the same time; one
    shared instance holds one connection, and two runs on it interleave their SMTP commands
    (``503 nested MAIL command``) or find it closed under them. So the configuration keeps
    only this, and every run builds its own instance.
    """

    name: str
    cls: type[Sender]
    options: SenderOptions
    base_dir: Path

    def __post_init__(self) -> None:
        cls, options = self.cls.resolve(self.options)
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "options", options)

    @property
    def mails(self) -> bool:
        return self.cls.mails

    @property
    def posts(self) -> bool:
        return self.cls.posts

    def build(self) -> Sender:
        """A fresh instance with options of its own (a plugin may change them as it runs)."""
        return self.cls(self.name, self.options.model_copy(deep=True), self.base_dir)


@cache
def _registered() -> tuple[EntryPoint, ...]:
    # Scanning every installed distribution's metadata takes ~10 ms: once per process.
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def sender_names() -> list[str]:
    """The registered sender types, without importing any of them."""
    names = sorted({ep.name for ep in _registered()})
    if not names:
        raise ConfigError(
            "no sender types are registered",
            hint="install the package (pip install -e .) so its entry points exist",
        )
    return names


@cache
def sender_type(name: str) -> type[Sender]:
    """Load one sender type: a config that mails by SMTP never imports the webhook plugin."""
    for ep in (ep for ep in _registered() if ep.name == name):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down with it
            raise ConfigError(
                f"sender plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                hint="reinstall or uninstall the package that provides it",
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, Sender)):
            raise ConfigError(f"sender plugin {ep.name!r} ({ep.value}) is not a Sender subclass")
        return cls
    raise ConfigError(f"no sender type {name!r} (known: {', '.join(sender_names())})")


def sender_types() -> dict[str, type[Sender]]:
    """Every registered sender type, loaded."""
    return {name: sender_type(name) for name in sender_names()}


def forget_plugins() -> None:
    """Scan for sender plugins again on next use (after installing one into a running process)."""
    _registered.cache_clear()
    sender_type.cache_clear()
