"""Secrets never reach a message, a log line or the database: one place that blanks them.

Two kinds of secret travel in text: values the configuration took from the environment
(``${VAR}``), and the parts of a URL that act as a password (``user:pass@``, a token in the
query, the path of a Slack or Discord webhook). ``redact`` blanks both; every error the CLI
prints, every daemon log line and every stored ``last_error`` goes through it.
"""

from __future__ import annotations

import re
import threading

MASK = "***"

_lock = threading.Lock()
_secrets: set[str] = set()

# scheme://user:password@host -> scheme://***@host
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
# ?token=..., &access_token=..., &key=... (a value that authenticates)
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:access_token|token|key|api_key|apikey|secret|password|sig|signature)=)[^&#\s]+"
)
# Webhook URLs whose path is the credential.
_TOKEN_PATH = re.compile(
    r"(?i)(https?://(?:hooks\.slack\.com/services|(?:[a-z0-9-]+\.)?discord(?:app)?\.com/api/webhooks)/)[^\s?#]+"
)


def remember(value: str) -> None:
    """Treat ``value`` (a value taken from the environment) as a secret from now on."""
    # Very short values ("1", "on") would blank unrelated text and protect nothing.
    if len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with remembered secrets and URL credentials replaced by ``***``."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    return _TOKEN_PATH.sub(rf"\1{MASK}", text)
