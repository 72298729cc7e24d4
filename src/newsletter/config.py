"""schedules.yaml: load, interpolate ${VAR} secrets, validate, resolve paths.

Every error names the file and the key path (``schedules.example.sender``) so a user can go
straight to the line that is wrong.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .errors import ConfigError
from .redact import redact, remember
from .schedule import parse_duration, parse_when, zone
from .senders import Sender, SenderSpec, sender_names, sender_type
from .window import SendWindow, parse_window

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from .store import Store

DEFAULT_CONFIG = "schedules.yaml"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _duration(value: Any) -> Any:
    # "90s", "15m", "3h", "1d" or a number of seconds; anything else is pydantic's to refuse.
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return parse_duration(value)
    return value


def _positive(value: timedelta) -> timedelta:
    # APScheduler refuses a zero or negative interval or grace time, at start-up, not here.
    if value <= timedelta(0):
        raise ValueError("must be longer than zero")
    return value


# Every duration in the file: read once, here, so the rest of the code sees a timedelta.
Duration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_positive)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FetchSettings(Strict):
    timeout: float = Field(20.0, gt=0, description="seconds for the whole download of one feed")
    # The daemon pulls a schedule's feeds again right before it builds a digest, so an entry
    # from a minute ago is in it; a feed slower than this is used as stored, not waited for.
    digest_timeout: float = Field(5.0, gt=0, description="seconds for that pull, all feeds at once")
    max_bytes: int = Field(10_000_000, gt=0, description="a larger feed is refused")
    user_agent: str = "newsletter/0.1 (+https://github.com/newsletter/newsletter)"
    # Fetching waits on the network, not the CPU: many at once keep a round short.
    workers: int = Field(16, ge=1, le=64, description="feeds fetched at once")
    # The first time a feed is seen only its recent entries count as new, so subscribing a
    # schedule to a feed with years of history does not mail all of it.
    first_fetch_newest: int = Field(5, ge=0)
    first_fetch_days: float | None = Field(None, gt=0)
    # How often the daemon polls each feed; a feed's own <ttl> wins when it is longer.
    interval: Duration = timedelta(minutes=15)


class ShareSettings(Strict):
    """The "Share: X · Bluesky · ..." line under each article, and the snippets' wording."""

    # Mastodon's link needs the readers' server (mastodon_instance); without one it is left out.
    networks: list[str] = ["x", "mastodon", "bluesky", "linkedin", "facebook", "email"]
    mastodon_instance: str | None = None
    mastodon_limit: int = Field(500, ge=50)  # servers may allow more
    # Share links carry a short text (the email stays light); snippets use the full templates.
    link_template: str = "{title} {link}"
    template: str | None = None  # the snippet template for every network (default: per network)
    templates: dict[str, str] = {}  # per network, e.g. {x: "{title} {link} {hashtags}"}

    @field_validator("networks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from .share import NETWORKS  # imported here: only a schedule that names networks pays for it

        unknown = [n for n in value if n not in NETWORKS]
        if unknown:
            raise ValueError(f"unknown network(s) {unknown}; known: {', '.join(NETWORKS)}")
        return value

    @field_validator("templates")
    @classmethod
    def _known_keys(cls, value: dict[str, str]) -> dict[str, str]:
        cls._known([k for k in value])
        return value


class BatchSettings(Strict):
    """How processes sharing one database split an issue's deliveries between them."""

    size: int = Field(200, ge=1, le=10000)  # deliveries a process claims at a time
    # A process that stops renewing (killed, cut off) gives its batch up after this long.
    lease: Duration = Field(timedelta(seconds=30), ge=timedelta(seconds=2))
    # How often a daemon looks for an issue another daemon started, to help send it.
    join_every: Duration = timedelta(seconds=5)


class UtmSettings(Strict):
    """utm_* tags added to article links (existing query strings are kept byte for byte)."""

    source: str = "newsletter"
    medium: str = "email"  # snippets and posts use utm_medium=social and the network as source
    campaign: str = "{schedule}"  # {schedule} and {issue} are filled in
    content: str | None = None


class PostTarget(Strict):
    """Announce new articles (or whole issues) to a webhook sender."""

    to: str  # a sender of type webhook
    each: Literal["article", "issue"] = "article"
    categories: list[str] = []  # only articles in one of these categories (default: all)
    template: str | None = None  # the post's text (default: the network's snippet template)


class FeedRef(Strict):
    """A feed with settings of its own: ``- {url: https://..., interval: 1h}``."""

    url: str
    # How often the daemon polls it (default: fetch.interval).
    interval: Annotated[timedelta | None, BeforeValidator(_duration)] = None


class Schedule(Strict):
    title: str = ""
    feeds: list[str | FeedRef] = Field(min_length=1)
    subscribers: str
    sender: str
    from_: str = Field(alias="from")
    reply_to: str | None = None
    subject: str = "{{ title }} #{{ issue.number }}: {{ issue.top_title }}"
    max_articles: int = Field(20, ge=1, le=500)
    excerpt_chars: int = Field(600, ge=50)
    unsubscribe_url: str = Field(description="https URL with {token}; also used for List-Unsubscribe")
    list_id: str | None = None
    max_attempts: int = Field(8, ge=1, description="4xx retries before a delivery is failed")
    when: str | None = Field(None, description="when the daemon sends: 'daily at 08:00', cron...")
    timezone: str | None = None  # default: the config's timezone
    # A run missed while the daemon was down is caught up within this.
    misfire_grace: Duration = timedelta(hours=3)
    # Deferred (4xx) deliveries are retried this often by the daemon.
    retry_every: Duration = timedelta(minutes=15)
    share: ShareSettings = ShareSettings()
    utm: UtmSettings | None = None  # no tags unless asked for
    post: list[PostTarget] = []
    post_every: Duration = timedelta(minutes=5)  # how often the daemon posts new articles
    # Past issues appear on the public /archive/ only when asked for: a list may be private.
    archive: bool = False
    # When sending may go on, in the schedule's timezone: "weekdays 08:00-18:00". A send
    # outside it waits for the next opening (default: any time).
    send_window: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            zone(value)
        return value

    @field_validator("send_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)  # the text is checked here; its timezone is known in window()
        return value

    def window(self, default_tz: str) -> SendWindow | None:
        """The parsed ``send_window`` in the schedule's timezone (else ``default_tz``)."""
        return parse_window(self.send_window, self.timezone or default_tz) if self.send_window else None

    @field_validator("from_", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and "@" not in parseaddr(value)[1]:
            raise ValueError(f"not an email address: {value!r}")
        if value is not None and not parseaddr(value)[1].isascii():
            # The envelope and the From header carry it as it is; SMTPUTF8 is not spoken here.
            raise ValueError(f"must be an ASCII address (the name may be in any script): {value!r}")
        return value

    @field_validator("list_id")
    @classmethod
    def _list_id(cls, value: str | None) -> str | None:
        if value is not None and not (value.isascii() and value.isprintable() and " " not in value):
            raise ValueError("must be ASCII without spaces (RFC 2919: list-label.domain)")
        return value

    @field_validator("unsubscribe_url")
    @classmethod
    def _https(cls, value: str) -> str:
        # Gmail and Yahoo only offer one-click unsubscribe for https URLs (RFC 8058).
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL (RFC 8058 one-click unsubscribe)")
        if "{token}" not in value:
            raise ValueError("must contain {token}, where the signed unsubscribe token goes")
        return value

    @field_validator("subject")
    @classmethod
    def _template(cls, value: str) -> str:
        import jinja2  # only a config that sets a subject pays for it

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"bad template: {exc.message}") from None
        return value


class Settings(Strict):
    database: str = "sqlite:///newsletter.db"
    outbox: str = "outbox"
    templates: str | None = "templates"
    timezone: str = "UTC"
    # Unsubscribe links older than this are refused (the page says so); null: never.
    unsubscribe_link_days: float | None = Field(365, gt=0)
    # How long a write waits for another process's transaction before the run fails with
    # "database is locked": long enough for a daemon job and a CLI run to take turns.
    busy_timeout: Duration = Field(timedelta(seconds=30), gt=timedelta(0))
    fetch: FetchSettings = FetchSettings()
    batches: BatchSettings = BatchSettings()
    senders: dict[str, dict[str, Any]]
    schedules: dict[str, Schedule] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone(value)
        return value


class Config:
    """A validated configuration with paths resolved against its own folder."""

    def __init__(self, path: Path, settings: Settings, senders: dict[str, SenderSpec]) -> None:
        self.path = path
        self.base_dir = path.parent
        self.settings = settings
        # Inert descriptions only: a Config is shared by every thread of the daemon and the
        # web apps, and a live sender (a socket, a session) must belong to one run.
        self.senders = senders

    def sender(self, name: str) -> Sender:
        """A new instance of the sender ``name``, for one run; close it when done (``with``)."""
        try:
            spec = self.senders[name]
        except KeyError:
            known = ", ".join(self.senders) or "none"
            raise ConfigError(
                f"{self.path}: no sender named {name!r}", hint=f"known senders: {known}"
            ) from None
        return spec.build()

    @property
    def schedules(self) -> dict[str, Schedule]:
        return self.settings.schedules

    def schedule(self, name: str) -> Schedule:
        try:
            return self.settings.schedules[name]
        except KeyError:
            known = ", ".join(self.settings.schedules)
            raise ConfigError(
                f"{self.path}: no schedule named {name!r}", hint=f"known schedules: {known}"
            ) from None

    def trigger(self, name: str) -> BaseTrigger | None:
        schedule = self.schedule(name)
        if not schedule.when:
            return None
        return parse_when(schedule.when, schedule.timezone or self.settings.timezone)

    def feed_interval(self, url: str) -> timedelta:
        """How often the daemon polls a feed: its own interval, else fetch.interval."""
        own = [
            f.interval
            for s in self.schedules.values()
            for f in s.feeds
            if isinstance(f, FeedRef) and f.interval is not None and self.feed_url(f) == url
        ]
        return min(own) if own else self.settings.fetch.interval

    def resolve(self, value: str) -> Path:
        return (self.base_dir / value).resolve()

    def feed_url(self, feed: str | FeedRef) -> str:
        """Feeds are URLs or paths relative to the config; both are stored as URLs."""
        if isinstance(feed, FeedRef):
            feed = feed.url
        if re.match(r"^https?://", feed, re.I):
            return feed
        return self.resolve(feed).as_uri()

    def subscribers_path(self, schedule: Schedule) -> Path:
        return self.base_dir / "subscribers" / f"{schedule.subscribers}.csv"

    @property
    def database_url(self) -> str:
        url = self.settings.database
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            return "sqlite:///" + str(self.resolve(url[len("sqlite:///") :]))
        return url

    def open_store(self, busy_timeout: float | None = None) -> Store:
        """A new connection to the state database, for one job, request or command; close it.

        ``busy_timeout`` (seconds) overrides the configured one, for a connection that must
        give up quickly rather than wait (a lock's heartbeat).
        """
        # Imported when used: a command that only reads the config loads no database code.
        from .store import Store

        wait = self.settings.busy_timeout.total_seconds() if busy_timeout is None else busy_timeout
        return Store(self.database_url, busy_timeout=wait)

    @property
    def outbox(self) -> Path:
        return self.resolve(self.settings.outbox)

    @property
    def templates_dir(self) -> Path | None:
        return self.resolve(self.settings.templates) if self.settings.templates else None


def _interpolate(node: Any, where: str, path: Path) -> Any:
    """Replace ${VAR} (or ${VAR:-default}) with the environment's value; secrets stay out of files."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else str(k), path) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{where}[{i}]", path) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var not in os.environ:
                if default is not None:
                    return default
                raise ConfigError(
                    f"{path}: {where}: environment variable {var} is not set",
                    hint=f"export {var}=... before running, or remove the reference",
                )
            # Whatever came from the environment may be a secret: no message may show it.
            remember(os.environ[var])
            return os.environ[var]

        return _ENV_REF.sub(sub, node)
    return node


def _describe(exc: ValidationError, path: Path, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "from_")
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = {
            "extra_forbidden": "unknown key",
            "missing": "missing required key",
        }.get(err["type"], err["msg"])
        lines.append(f"{path}: {loc}: {_without_input(msg, err.get('input'))}")
    return "\n".join(lines)


def _without_input(msg: str, value: Any) -> str:
    """A validator's message without the refused value when that value holds a secret (it
    came from ${VAR}, or carries URL credentials): the file and key already say where it is.
    A value typed into the file is shown; the user has it in front of them anyway."""
    if isinstance(value, str) and value and redact(value) != value:
        msg = msg.replace(repr(value), "(value not shown: it holds a secret)")
    return redact(msg)


def _check_snippet_templates(path: Path, name: str, schedule: Schedule) -> list[str]:
    found = [("share.template", schedule.share.template)] if schedule.share.template else []
    if schedule.share.link_template != ShareSettings().link_template:
        found.append(("share.link_template", schedule.share.link_template))
    found += [(f"share.templates.{k}", v) for k, v in schedule.share.templates.items()]
    found += [(f"post[{i}].template", t.template) for i, t in enumerate(schedule.post) if t.template]
    if not found:
        return []
    from .share import check_template  # imported here: its regexes cost 0.1 s at import

    problems = []
    for key, template in found:
        try:
            check_template(template)
        except ValueError as exc:
            problems.append(f"{path}: schedules.{name}.{key}: {exc}")
    return problems


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    path = Path(path or os.environ.get("NEWSLETTER_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", hint="pass --config PATH or set NEWSLETTER_CONFIG"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: bad YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with senders: and schedules:")
    raw = _interpolate(raw, "", path)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None

    known = sender_names()
    senders: dict[str, SenderSpec] = {}
    problems = []
    for name, options in settings.senders.items():
        options = dict(options or {})
        kind = options.pop("type", None)
        if kind not in known:
            problems.append(
                f"{path}: senders.{name}.type: "
                + (f"unknown sender type {kind!r}" if kind else "missing required key")
                + f" (known: {', '.join(known)})"
            )
            continue
        cls = sender_type(kind)
        try:
            spec = SenderSpec(name, cls, cls.Options.model_validate(options), path.parent)
            # Built once here, and thrown away, so a plugin that checks more in __init__
            # still fails at load time, naming the file and the key.
            spec.build()
            senders[name] = spec
        except ValidationError as exc:
            problems.append(_describe(exc, path, f"senders.{name}."))
        except ValueError as exc:  # a sender's own check in __init__
            problems.append(f"{path}: senders.{name}: {redact(str(exc))}")

    config = Config(path, settings, senders)
    for name, schedule in settings.schedules.items():
        if schedule.sender not in settings.senders:
            problems.append(
                f"{path}: schedules.{name}.sender: no sender named {schedule.sender!r}"
                f" (known: {', '.join(settings.senders) or 'none'})"
            )
        if schedule.sender in senders and not senders[schedule.sender].mails:
            problems.append(
                f"{path}: schedules.{name}.sender: {schedule.sender!r} cannot send email; use it under post:"
            )
        for i, target in enumerate(schedule.post):
            if target.to not in settings.senders:
                problems.append(f"{path}: schedules.{name}.post[{i}].to: no sender named {target.to!r}")
            elif target.to in senders and not senders[target.to].posts:
                problems.append(
                    f"{path}: schedules.{name}.post[{i}].to: {target.to!r} is not a webhook sender"
                )
        problems += _check_snippet_templates(path, name, schedule)
        if schedule.when:
            try:
                parse_when(schedule.when, schedule.timezone or settings.timezone)
            except ValueError as exc:
                problems.append(f"{path}: schedules.{name}.when: {exc}")
        csv_path = config.subscribers_path(schedule)
        if not csv_path.is_file():
            problems.append(f"{path}: schedules.{name}.subscribers: no file {csv_path}")
    if problems:
        raise ConfigError("\n".join(problems))
    return config
