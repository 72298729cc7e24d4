"""Build the wire bytes of every subscriber's message from one skeleton per issue.

Encoding a 100 KB HTML part costs milliseconds; doing it per subscriber would dominate a
send. So the skeleton encodes every static run of text once (quoted-printable, each run
ending in a soft line break) and leaves holes for the per-subscriber values, which are
encoded on their own and joined in. The result is an ordinary multipart/alternative message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.quoprimime import body_encode
from email.utils import format_datetime, formataddr, parseaddr
from typing import TYPE_CHECKING

from .sanitize import one_line

if TYPE_CHECKING:
    from .render import RenderedIssue

CRLF = b"\r\n"
SOFT_BREAK = b"=\r\n"
MAX_LINE = 998  # RFC 5322, without the CRLF
# policy.SMTP folds at 78 and turns long unstructured values into encoded-words; headers we
# need verbatim (List-Unsubscribe) are written raw instead. CPython issue #85725.
_HEADERS = policy.SMTP


def qp(text: str) -> bytes:
    """Quoted-printable of UTF-8 text, CRLF line ends, lines of at most 76 characters."""
    return body_encode(text.encode("utf-8").decode("latin-1"), maxlinelen=76, eol="\r\n").encode("ascii")


def _qp_run(text: str) -> bytes:
    """A run that may be followed by another run on the same logical line."""
    if not text:
        return b""
    encoded = qp(text)
    return encoded if text.endswith("\n") else encoded + SOFT_BREAK


def header(name: str, value: str) -> bytes:
    """A header folded at 78 with RFC 2047 encoded-words for non-ASCII text."""
    return _HEADERS.header_factory(name, one_line(value)).fold(policy=_HEADERS).encode("ascii")


def raw_header(name: str, value: str) -> bytes:
    line = f"{name}: {one_line(value)}"
    if len(line) > MAX_LINE or not line.isascii():
        raise ValueError(f"{name} header would be {len(line)} characters or not ASCII: {line[:80]}")
    return line.encode("ascii") + CRLF


def to_header(name: str, address: str) -> bytes:
    """The To header without the cost of the header registry's parser (it runs per message)."""
    name = one_line(name)[:200].rstrip()
    if name.isascii():
        return raw_header("To", formataddr((name, address)))
    return f"To: {encoded_words(name)} <{address}>\r\n".encode("ascii")


def encoded_words(text: str) -> str:
    """RFC 2047 base64 words of at most 72 characters, whole characters each, folded.

    email.header.Header does the same at about 190 us a name; this runs per message.
    """
    chunks, chunk = [], b""
    for char in text:
        octets = char.encode("utf-8")
        if len(chunk) + len(octets) > 45:  # 45 octets -> 60 base64 characters + 12 around them
            chunks.append(chunk)
            chunk = b""
        chunk += octets
    chunks.append(chunk)
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(c).decode('ascii')}?=" for c in chunks)


Plan = list[bytes | int]  # encoded static runs and indexes of per-subscriber fields


def _plan(text: str, pattern: re.Pattern[str]) -> Plan:
    plan: Plan = []
    pos = 0
    for m in pattern.finditer(text):
        plan.append(_qp_run(text[pos : m.start()]))
        plan.append(int(m.group(1)))
        pos = m.end()
    plan.append(_qp_run(text[pos:]))
    return plan


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str
    values: dict[str, str]  # every field the templates may ask for, unsubscribe_url included


class Skeleton:
    """Everything about an issue's messages that is the same for every subscriber."""

    def __init__(
        self,
        rendered: RenderedIssue,
        *,
        from_addr: str,
        reply_to: str | None,
        date: datetime,
        list_id: str,
        list_name: str,
        id_seed: str,
    ) -> None:
        self.fields = rendered.fields
        self.envelope_from = parseaddr(from_addr)[1]
        self.domain = self.envelope_from.rpartition("@")[2] or "localhost"
        self.id_seed = id_seed
        boundary = "=_nl" + secrets.token_hex(12)  # "=_" cannot occur in quoted-printable
        head = [
            header("From", from_addr),
            header("Reply-To", reply_to) if reply_to else b"",
            header("Subject", rendered.subject),
            header("Date", format_datetime(date)),
            header("List-Id", f"{list_name} <{list_id}>"),
            raw_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            b"MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'.encode(),
            CRLF,
        ]
        self.head = b"".join(head)
        part = 'Content-Type: text/{}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
        sep = f"--{boundary}\r\n".encode()
        self.text_open = sep + part.format("plain").encode()
        self.html_open = CRLF + sep + part.format("html").encode()
        self.close = CRLF + f"--{boundary}--\r\n".encode()
        pattern = re.compile(rf"{rendered.prefix}F(\d+)E")
        self.text_plan = _plan(rendered.text, pattern)
        self.html_plan = _plan(rendered.html, pattern)

    def message_id(self, email: str) -> str:
        # Stable for a given issue and recipient, so a resent message is recognisably the same.
        digest = hashlib.sha256(f"{self.id_seed}\0{email.lower()}".encode()).hexdigest()[:24]
        return f"<{digest}@{self.domain}>"

    def build(self, recipient: Recipient) -> tuple[str, bytes]:
        """Return (Message-ID, the message's bytes) for one subscriber."""
        values = [one_line(recipient.values.get(f, "")) for f in self.fields]
        message_id = self.message_id(recipient.email)
        # One list, one join: each of the ~100 KB is copied once per message, not twice.
        parts = [
            to_header(recipient.name, recipient.email),
            raw_header("Message-ID", message_id),
            raw_header("List-Unsubscribe", f"<{recipient.values['unsubscribe_url']}>"),
            self.head,
            self.text_open,
        ]
        _fill(parts, self.text_plan, [_qp_value(v) for v in values])
        parts.append(self.html_open)
        _fill(parts, self.html_plan, [_qp_value(html.escape(v, quote=True)) for v in values])
        parts.append(self.close)
        return message_id, b"".join(parts)


def _qp_value(value: str) -> bytes:
    """A one-line value as quoted-printable, by the C encoder: this runs per message."""
    if not value:
        return b""
    return binascii.b2a_qp(value.encode("utf-8")).replace(b"=\n", SOFT_BREAK) + SOFT_BREAK


def _fill(parts: list[bytes], plan: Plan, encoded: list[bytes]) -> None:
    parts.extend(item if isinstance(item, bytes) else encoded[item] for item in plan)
