"""Secrets never reach a message, a log line or the database: one place that blanks them.

Two kinds of secret travel in text: values the configuration took from the environment
(``${VAR}``, ``password_env``, ``token_env``...), and the parts of a URL that act as a
password (``user:pass@``, a token in the query, the path of a Slack, Discord, Teams or
Telegram webhook). ``redact`` blanks both; every error the CLI prints, every daemon log line
and every stored ``last_error`` goes through it. ``redact_url`` also knows one target's own
address, whatever its host, for the senders that quote it.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, urlsplit

MASK = "***"
# Very short values ("1", "on", a port) would blank unrelated text and protect nothing.
MIN_SECRET = 6

_lock = threading.Lock()
_secrets: set[str] = set()

# scheme://user:password@host -> scheme://***@host (not past the authority: "?a=b@c" is a query)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
# ?token=..., &access_token=..., &api_key=..., &X-Amz-Signature=... (a value that authenticates)
_QUERY_SECRET = re.compile(
    r"(?i)([?&;][\w.-]*?(?:token|key|secret|password|passwd|pwd|signature|sig|auth|credential)=)[^&#\s]+"
)
# Webhook URLs whose path is the credential.
_TOKEN_PATH = re.compile(
    r"(?i)(https?://(?:"
    r"hooks\.slack\.com/(?:services|workflows|triggers)"
    r"|(?:[a-z0-9-]+\.)?discord(?:app)?\.com/api/(?:v\d+/)?webhooks"
    r"|[a-z0-9-]+\.webhook\.office\.com/webhookb2"
    r"|api\.telegram\.org/(?:file/)?bot"
    r")/?)[^\s?#]+"
)
# An Authorization header value quoted in an error.
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def remember(value: str | None) -> None:
    """Treat ``value`` (a value taken from the environment) as a secret from now on."""
    if not value or len(value) < MIN_SECRET:
        return
    with _lock:
        _secrets.add(value)
        # The same secret inside a URL (a ${TOKEN} in a query string) is percent-encoded.
        encoded = quote(value, safe="")
        if encoded != value:
            _secrets.add(encoded)


def forget_all() -> None:
    """Forget every remembered secret (for tests: a process otherwise keeps them to the end)."""
    with _lock:
        _secrets.clear()


def redact(text: str) -> str:
    """``text`` with remembered secrets and URL credentials replaced by ``***``."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    text = _TOKEN_PATH.sub(rf"\1{MASK}", text)
    return _AUTH_HEADER.sub(rf"\1 {MASK}", text)


def redact_url(text: str, url: str, *, secret_path: bool) -> str:
    """``text`` (an error, a reply, an address) with the secrets of ``url`` blanked, then
    everything ``redact`` blanks.

    ``url`` is a target's configured address: its password always goes, and with
    ``secret_path`` (Slack, Discord and most JSON receivers carry the credential in the path
    or the query) its path and query too, so the address itself shows as ``https://host/…``.
    """
    parts = urlsplit(url)
    if parts.password:
        text = text.replace(parts.password, MASK)
    if secret_path:
        if parts.path not in ("", "/"):
            text = text.replace(parts.path, "/…")
        if parts.query:
            text = text.replace(parts.query, "…")
    return redact(text)
