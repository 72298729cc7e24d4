"""The ``smtp`` sender: one connection for many messages, STARTTLS or implicit TLS, AUTH."""

from __future__ import annotations

import ipaddress
import os
import smtplib
import ssl

from pydantic import Field, model_validator

from ..errors import DeliveryError, PermanentFailure, TemporaryFailure
from ..redact import remember
from . import Outgoing, Sender, SenderOptions
from .throttle import Throttle


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
    rate_limit: float | None = Field(None, gt=0, description="messages per second at most")
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


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text}".strip()


def _refusal(code: int, text: bytes | str) -> Exception:
    reply = _reply(code, text)
    return TemporaryFailure(reply) if 400 <= code < 500 else PermanentFailure(reply)


class SmtpSender(Sender):
    Options = SmtpOptions
    options: SmtpOptions

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._conn: smtplib.SMTP | None = None
        self._throttle = Throttle(self.options.rate_limit)

    @property
    def port(self) -> int:
        return self.options.port or (465 if self.options.ssl else 587)

    def _connect(self) -> smtplib.SMTP:
        opts = self.options
        ca_file = str(self.base_dir / opts.ca_file) if opts.ca_file else None
        context = ssl.create_default_context(cafile=ca_file)
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
                    local_hostname=opts.local_hostname,
                )
            else:
                conn = smtplib.SMTP(
                    opts.host, self.port, timeout=opts.timeout, local_hostname=opts.local_hostname
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

    def open(self) -> None:
        self._conn = self._connect()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.quit()
            except (OSError, smtplib.SMTPException):
                self._conn.close()
            self._conn = None

    def send(self, message: Outgoing) -> None:
        self._throttle.wait()
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
