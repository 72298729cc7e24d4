"""The ``smtp`` sender: ``connections`` of them at once, each pipelined, STARTTLS or implicit
TLS and AUTH on every one; paced to the provider's quota.

A digest run goes through ``send_many`` (all connections in one loop, see ``smtpmux``);
``send`` is the one-message path of a test send and of callers that send by hand.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import Field, model_validator

from ..errors import DeliveryError, TemporaryFailure
from ..quota import Pacer, RateLimit
from ..redact import remember
from . import Feed, Outgoing, Sender, SenderOptions
from .smtpmux import Mux
from .smtpwire import Pacing, refusal, reply_text


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    host = host.strip().strip("[]").rstrip(".").lower()
    # Only the bare name: "mail.localhost" may be mapped anywhere in /etc/hosts.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def _fqdn() -> str:
    # smtplib looks the name up for every connection it opens (a DNS query each): once here.
    return socket.getfqdn()


def _plain_text_login(host: str = "") -> str:
    to = f" to {host}" if host else ""
    return (
        f"a password would cross the network unencrypted{to}: use starttls: true (port 587)"
        " or ssl: true (port 465); only a relay on this machine (localhost, 127.0.0.1, ::1)"
        " may take AUTH without TLS"
    )


class SmtpOptions(SenderOptions):
    host: str = "localhost"
    port: int | None = Field(None, ge=1, le=65535, description="default 465 with ssl, else 587")
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password_env: str | None = Field(None, description="name of the variable holding the password")
    timeout: float = Field(30.0, gt=0)
    rate_limit: RateLimit = Field(
        None, description="per second (a number), or {per_second, per_minute, per_hour, per_day}"
    )
    connections: int = Field(10, ge=1, le=100, description="connections at once (each pipelined)")
    max_messages_per_connection: int | None = Field(
        None, ge=1, description="reconnect after this many (SES advises it; some relays allow 50)"
    )
    pipelining: bool = Field(True, description="pipeline (RFC 2920) when the server offers it")
    backoff_max: float = Field(60.0, gt=0, description="longest pause a throttling reply causes, s")
    patience: float = Field(
        300.0, gt=0, description="how long a run goes on through throttling before it stops, s"
    )
    local_hostname: str | None = None
    ca_file: str | None = Field(None, description="CA bundle for a server with a private certificate")

    @model_validator(mode="after")
    def _one_tls(self) -> SmtpOptions:
        if self.starttls and self.ssl:
            raise ValueError("choose starttls (port 587) or ssl (port 465), not both")
        if self.password_env and not self.username:
            raise ValueError("password_env is set but username is not")
        # As Postfix's smtp_sasl_security_options = noplaintext: no password in clear text.
        if self.username and not (self.starttls or self.ssl) and not is_loopback(self.host):
            raise ValueError(_plain_text_login())
        return self


_reply = reply_text
_refusal = refusal


class _Pace(Pacing):
    """The sender's quotas (``quota.Pacer``) as its connections use them, and its patience."""

    def __init__(self, pacer: Pacer, patience: float) -> None:
        self.pacer = pacer
        self.patience = patience
        self.since: float | None = None  # throttled, with no message accepted since
        self.lock = threading.Lock()

    def turn(self) -> float | None:
        if self.exhausted():
            # Throttled all along, and the slowed pace would only drag it out: stop here.
            raise DeliveryError(
                f"the server has been throttling for over {self.patience:g} s",
                hint="nothing was lost; the undelivered messages are sent on the next run",
            )
        return self.pacer.turn()

    def release(self, n: int = 1) -> None:
        if n:
            self.pacer.release(n)

    def throttled(self) -> float:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
        return self.pacer.throttled()

    def ok(self) -> None:
        self.since = None  # one reference written: atomic, no lock needed
        self.pacer.accepted()

    def exhausted(self) -> bool:
        since = self.since
        return since is not None and time.monotonic() - since > self.patience


class SmtpSender(Sender):
    Options = SmtpOptions
    options: SmtpOptions

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._conn: smtplib.SMTP | None = None
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self.remember([], lambda: datetime.now(UTC))

    def remember(self, history: list[tuple[datetime, int]], wall: Callable[[], datetime]) -> None:
        opts = self.options
        self.pacer = Pacer(opts.rate_limit, history=history, max_hold=opts.backoff_max, wall=wall)
        self.pace = _Pace(self.pacer, opts.patience)

    def counts_days(self) -> bool:
        return self.pacer.counts_days

    def recount(self, history: list[tuple[datetime, int]]) -> None:
        self.pacer.recount(history)

    def quota_reached(self) -> Exception | None:
        return self.pacer.day_reached()

    @property
    def port(self) -> int:
        return self.options.port or (465 if self.options.ssl else 587)

    def _connect(self) -> smtplib.SMTP:
        opts = self.options
        context = self._tls()
        where = f"{opts.host}:{self.port}"
        if opts.username and not (opts.ssl or opts.starttls) and not is_loopback(opts.host):
            # Options built without validation (model_construct, a plugin) meet the same rule,
            # before anything is sent.
            raise DeliveryError(
                f"sender {self.name!r}: {_plain_text_login(where)}",
                hint="set starttls: true or ssl: true in the sender's options",
            )
        try:
            if opts.ssl:
                conn: smtplib.SMTP = smtplib.SMTP_SSL(
                    opts.host,
                    self.port,
                    timeout=opts.timeout,
                    context=context,
                    local_hostname=opts.local_hostname or _fqdn(),
                )
            else:
                conn = smtplib.SMTP(
                    opts.host, self.port, timeout=opts.timeout, local_hostname=opts.local_hostname or _fqdn()
                )
                if opts.starttls:
                    conn.starttls(context=context)
            if opts.username:
                password = os.environ.get(opts.password_env or "", "")
                remember(password)
                if opts.password_env and not password:
                    raise DeliveryError(
                        f"sender {self.name!r}: environment variable {opts.password_env} is empty",
                        hint=f"export {opts.password_env}=... with the SMTP password",
                    )
                conn.login(opts.username, password)
            conn.ehlo_or_helo_if_needed()  # what it offers (PIPELINING, SIZE) is read here
            if not opts.pipelining:
                conn.esmtp_features.pop("pipelining", None)
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"sender {self.name!r}: {where} refused the login: {_reply(exc.smtp_code, exc.smtp_error)}",
                hint="check username and the password variable",
            ) from None
        except TimeoutError:
            raise DeliveryError(
                f"sender {self.name!r}: {where} did not answer within {opts.timeout:g} s",
                hint="the server is overloaded or traffic is dropped on the way; nothing was lost, run again",
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(
                f"sender {self.name!r}: cannot talk to {where}: {exc}",
                hint="check host, port and the starttls/ssl settings; nothing was lost, run again later",
            ) from None
        return conn

    def _tls(self) -> ssl.SSLContext | None:
        """One TLS context for all connections: loading the CA bundle takes ~60 ms."""
        opts = self.options
        if not (opts.ssl or opts.starttls):
            return None
        with self._lock:
            if self._context is None:
                ca_file = str(self.base_dir / opts.ca_file) if opts.ca_file else None
                self._context = ssl.create_default_context(cafile=ca_file)
            return self._context

    def open(self) -> None:
        # One connection first: a wrong password or a closed port is one error, not ten.
        self._conn = self._connect()

    def lanes(self) -> int:
        return self.options.connections

    def send_many(self, feed: Feed) -> None:
        first, self._conn = self._conn, None
        Mux(
            feed,
            self._connect,
            self.pace,
            name=f"{self.name!r} ({self.options.host}:{self.port})",
            connections=self.options.connections,
            timeout=self.options.timeout,
            per_connection=self.options.max_messages_per_connection,
            first=first,
        ).run()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.quit()
            except (OSError, smtplib.SMTPException):
                self._conn.close()
            self._conn = None

    def send(self, message: Outgoing) -> None:
        if not self.pacer.acquire():
            raise DeliveryError(f"sender {self.name!r}: stopped")
        self.pacer.sent()  # a test send counts against the quota whatever the server says
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.sendmail(message.envelope_from, [message.recipient], message.data)
                return
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = exc.recipients[message.recipient]
                raise _refusal(code, text) from None
            except smtplib.SMTPSenderRefused as exc:
                if exc.smtp_code >= 500:
                    raise DeliveryError(
                        f"sender {self.name!r}: the server refused the sender address"
                        f" {message.envelope_from}: {_reply(exc.smtp_code, exc.smtp_error)}",
                        hint="check the schedule's from: address and the server's relay rules",
                    ) from None
                raise TemporaryFailure(_reply(exc.smtp_code, exc.smtp_error)) from None
            except smtplib.SMTPDataError as exc:
                if exc.smtp_code == 421:
                    self._drop()
                raise _refusal(exc.smtp_code, exc.smtp_error) from None
            except (TimeoutError, smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                # The connection went away mid-conversation: reopen it once and resend; a
                # second loss means the server is not there, and the run stops with all
                # undelivered messages still pending.
                self._drop()
                if attempt == 2:
                    raise DeliveryError(
                        f"sender {self.name!r}: lost the connection to"
                        f" {self.options.host}:{self.port} twice: {exc}",
                        hint="nothing was lost; the undelivered messages are sent on the next run",
                    ) from None
            except smtplib.SMTPResponseException as exc:
                raise _refusal(exc.smtp_code, exc.smtp_error) from None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
