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
import time
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime
from email.quoprimime import body_encode
from email.utils import format_datetime, formataddr, parseaddr
from itertools import accumulate
from typing import TYPE_CHECKING

import regex

from .sanitize import one_line

if TYPE_CHECKING:
    from .render import RenderedIssue

CRLF = b"\r\n"
SOFT_BREAK = b"=\r\n"
MAX_LINE = 998  # RFC 5322, without the CRLF
# Every header is written here, not by the email package: policy.SMTP turns a long
# List-Unsubscribe URL into encoded-words (CPython issue #85725) and loses the spaces between
# encoded-words of a long Subject.


def qp(text: str) -> bytes:
    """Quoted-printable of UTF-8 text, CRLF line ends, lines of at most 76 characters, none
    starting with a dot (see ``dot_safe``)."""
    encoded = body_encode(text.encode("utf-8").decode("latin-1"), maxlinelen=76, eol="\r\n")
    return dot_safe(encoded.encode("ascii"))


def dot_safe(encoded: bytes) -> bytes:
    """Quoted-printable lines with a leading dot written as ``=2E`` (the same text decoded).

    SMTP doubles a dot that starts a line (RFC 5321 4.5.2); a message with none needs no
    stuffing, so the sender skips a scan of every 100 KB message. A line that grows past 76
    characters is broken with a soft line break, never inside an ``=XX``.
    """
    if not (encoded.startswith(b".") or b"\n." in encoded):
        return encoded
    out: list[bytes] = []
    for line in encoded.split(b"\r\n"):
        while line.startswith(b"."):
            line = b"=2E" + line[1:]
            if len(line) <= 76:
                break
            cut = 75  # and the soft break's "=" makes 76
            while b"=" in line[cut - 2 : cut]:
                cut -= 1
            out.append(line[:cut] + b"=")
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _qp_run(text: str) -> bytes:
    """A run that may be followed by another run on the same logical line."""
    if not text:
        return b""
    encoded = qp(text)
    return encoded if text.endswith("\n") else encoded + SOFT_BREAK


def header(name: str, value: str) -> bytes:
    """An unstructured header (Subject): folded at 78, RFC 2047 words where it must be."""
    return _fold(f"{name}:", _atoms(one_line(value), phrase=False))


def raw_header(name: str, value: str) -> bytes:
    line = f"{name}: {one_line(value)}"
    if len(line) > MAX_LINE or not line.isascii():
        raise ValueError(f"{name} header would be {len(line)} characters or not ASCII: {line[:80]}")
    return line.encode("ascii") + CRLF


def address_header(name: str, display: str, address: str) -> bytes:
    """``Name: display <address>``, the display name encoded and folded like a Subject.

    It runs per message for To, so the common ASCII name skips the folder.
    """
    display, address = one_line(display)[:200].rstrip(), one_line(address)
    if display and (not display.isascii() or "=?" in display):
        # A plain "=?...?=" would be decoded as an encoded-word: encode it so it shows as typed.
        return _fold(f"{name}:", [*_atoms(display, phrase=True), f"<{address}>"])
    if not display:
        return raw_header(name, address)
    if _ATOMS.fullmatch(display):
        # Words of atext: nothing to quote, and formataddr would cost more than the whole rest.
        return f"{name}: {display} <{address}>\r\n".encode("ascii")
    return raw_header(name, formataddr((display, address)))


# RFC 5322 atext and spaces between words: a display name that needs no quoting.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def to_header(name: str, address: str) -> bytes:
    """The To header without the cost of the header registry's parser (it runs per message)."""
    return address_header("To", name, address)


# -- RFC 2047 -------------------------------------------------------------------------------
#
# Decoders drop the whitespace between two adjacent encoded-words (RFC 2047 6.2) and keep the
# whitespace between an encoded-word and plain text. So a space between two words that both
# need encoding is put inside an encoded-word, and every fold between encoded-words is pure
# folding whitespace. CPython's own folder gets this wrong (and splits grapheme clusters),
# which is why the Subject is not folded by the email package.

FOLD = 78
_WORD_MAX = 75  # RFC 2047 2: an encoded-word is at most 75 characters
_WRAP = len("=?utf-8?b??=")
_GRAPHEME = regex.compile(r"\X")
_JOINS = regex.compile(r"[^\p{Grapheme_Cluster_Break=Other}]")  # may be part of a longer cluster
# RFC 2047 5(3): the only characters a Q-encoded word in a phrase may carry as they are.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_ONE = bytes(_Q_SAFE) + b" "  # these take one character (a space is "_"), the rest three
# RFC 5322 specials: in a display name they need quoting, so such a word is encoded instead.
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


@dataclass(frozen=True)
class _Encode:
    """A run of text that goes out as one or more encoded-words (spaces inside them)."""

    text: str


def _atoms(text: str, *, phrase: bool) -> list[str | _Encode]:
    """Words as they can go on the wire, with runs of words that need encoding merged."""
    atoms: list[str | _Encode] = []
    for word in text.split(" ") if text else []:
        # A word too long for a line of its own is encoded too, so it can be split.
        plain = word.isascii() and "=?" not in word and len(word) < FOLD - 2
        if plain and not (phrase and _SPECIALS.search(word)):
            atoms.append(word)
            continue
        if atoms and isinstance(atoms[-1], _Encode):
            atoms[-1] = _Encode(f"{atoms[-1].text} {word}")
        else:
            atoms.append(_Encode(word))
    return atoms


def _q_cost(octets: bytes) -> int:
    return len(octets) + 2 * len(octets.translate(None, _Q_ONE))


def _b_cost(octets: bytes) -> int:
    return -(-len(octets) // 3) * 4


def _encoded_word(octets: bytes, q: bool) -> str:
    if not q:
        return f"=?utf-8?b?{base64.b64encode(octets).decode('ascii')}?="
    body = "".join("_" if b == 0x20 else chr(b) if b in _Q_SAFE else f"={b:02X}" for b in octets)
    return f"=?utf-8?q?{body}?="


def _fold(start: str, atoms: list[str | _Encode]) -> bytes:
    """One header, lines of at most 78 characters where the words allow it, never over 998."""
    lines = [start]
    fresh = True  # nothing but the field name on the current line yet

    def put(word: str) -> None:
        nonlocal fresh
        if not fresh and len(lines[-1]) + 1 + len(word) > FOLD:
            lines.append("")
        lines[-1] += " " + word
        fresh = False

    for atom in atoms:
        if isinstance(atom, str):
            put(atom)
            continue
        raw = atom.text.encode("utf-8")
        # Q keeps mostly-Latin text readable; B is shorter for everything else.
        q = _q_cost(raw) <= _b_cost(raw)
        cost = _q_cost if q else _b_cost
        size = _WRAP + cost(raw)
        if len(lines[-1]) + 1 + size <= FOLD or (not fresh and size <= _WORD_MAX):
            put(_encoded_word(raw, q))
            continue
        # Split only between grapheme clusters: a decoder that shows each encoded-word on its
        # own (or a client that cuts the Subject) must never show half an emoji or accent.
        joins = _JOINS.search(atom.text) is not None
        if not q and not joins:
            # Every character is a cluster: cut the octets at a character boundary directly, as
            # this runs per message for a long name.
            pos = 0
            while pos < len(raw):
                cut = min(pos + (min(FOLD - len(lines[-1]) - 1, _WORD_MAX) - _WRAP) // 4 * 3, len(raw))
                while cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a UTF-8 continuation octet
                    cut -= 1
                if cut > pos:
                    put(_encoded_word(raw[pos:cut], q))
                    pos = cut
                else:
                    lines.append("")
                    fresh = True
            continue
        clusters = _GRAPHEME.findall(atom.text) if joins else atom.text
        units = [g.encode("utf-8") for g in clusters]
        measure = _q_cost if q else len  # B: 4 characters per 3 octets
        ends = list(accumulate(map(measure, units)))
        i = 0
        while i < len(units):
            room = min(FOLD - len(lines[-1]) - 1, _WORD_MAX) - _WRAP
            limit = room if q else room // 4 * 3
            j = bisect_right(ends, (ends[i - 1] if i else 0) + limit, lo=i)
            if j > i:
                put(_encoded_word(b"".join(units[i:j]), q))
                i = j
            elif not fresh:
                lines.append("")  # a line of its own has room for the next cluster
                fresh = True
            else:
                # A cluster longer than an encoded-word (a pile of combining marks): split it
                # between code points, never inside a UTF-8 sequence.
                units[i : i + 1] = [c.encode("utf-8") for c in units[i].decode("utf-8")]
                ends = list(accumulate(map(measure, units)))
    return "\r\n".join(lines).encode("ascii") + CRLF


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


_stamp: tuple[int, bytes] = (0, b"")


def date_header() -> bytes:
    """``Date:`` the moment a message is built for sending, not when its issue was.

    A retry hours after the issue was built would otherwise look backdated to spam filters
    (SpamAssassin DATE_IN_PAST_03_06). Formatted at most once a second: build() runs per
    subscriber and format_datetime costs as much as the rest of a build.
    """
    global _stamp
    second = int(time.time())
    if _stamp[0] != second:
        value = format_datetime(datetime.fromtimestamp(second, UTC))
        _stamp = (second, f"Date: {value}\r\n".encode("ascii"))
    return _stamp[1]


class Skeleton:
    """Everything about an issue's messages that is the same for every subscriber."""

    def __init__(
        self,
        rendered: RenderedIssue,
        *,
        from_addr: str,
        reply_to: str | None,
        list_id: str,
        list_name: str,
        id_seed: str,
    ) -> None:
        self.fields = rendered.fields
        # Line breaks first: parseaddr gives up on a quoted name with a CR or LF in it.
        from_addr, reply_to = one_line(from_addr), one_line(reply_to or "")
        self.envelope_from = parseaddr(from_addr)[1]
        self.domain = self.envelope_from.rpartition("@")[2] or "localhost"
        self.id_seed = id_seed
        boundary = "=_nl" + secrets.token_hex(12)  # "=_" cannot occur in quoted-printable
        head = [
            address_header("From", *parseaddr(from_addr)),
            address_header("Reply-To", *parseaddr(reply_to)) if reply_to else b"",
            header("Subject", rendered.subject),
            address_header("List-Id", list_name, list_id),
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
        pattern = rendered.placeholders()
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
            date_header(),
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
    return dot_safe(binascii.b2a_qp(value.encode("utf-8")).replace(b"=\n", SOFT_BREAK) + SOFT_BREAK)


def _fill(parts: list[bytes], plan: Plan, encoded: list[bytes]) -> None:
    parts.extend(item if isinstance(item, bytes) else encoded[item] for item in plan)
