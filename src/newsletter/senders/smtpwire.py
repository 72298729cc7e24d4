"""The SMTP conversation of a pipelining client (RFC 2920): one round trip a message.

smtplib opens each connection (TCP or implicit TLS, EHLO, STARTTLS, AUTH: what it does well and
what it has been trusted with for decades); after that ``smtpmux`` speaks on its socket, so that
one message's end of data and the next message's envelope go out in one write and their
replies are read back in order::

    C: <content of message k>.\\r\\nMAIL FROM:<...>\\r\\nRCPT TO:<...>\\r\\nDATA\\r\\n
    S: 250 (k queued)  250 (MAIL)  250 (RCPT)  354 (go ahead)

A server that does not advertise PIPELINING gets every command on its own, in lock-step.
Whichever way, every reply is read, a refused RCPT still gets its DATA reply (a 354 there is
answered with an empty message, which RFC 2920 forbids the server to deliver), and a message
counts as sent only after the 250 that follows its end of data.

This module holds what that conversation is made of: the content as it goes on the wire, the
replies as they are read, what a reply means, what a connection asks of the quota, and the
non-blocking socket each connection writes and reads through.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import time
from collections import deque

from ..errors import DeliveryError, PermanentFailure, TemporaryFailure

DOT = b".\r\n"
_MAXLINE = 8192  # smtplib's limit on a reply line (its _MAXLINE)
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
# Replies that mean "slower, please", not "not this reader": Amazon SES's "454 Throttling
# failure: Maximum sending rate exceeded", and a 421/451/452 that says it is about a rate
# ("452 4.5.3 Too many recipients"), unlike "452 4.2.2 Mailbox full", which is that reader's.
# Any other 421 closes the connection ("too many messages on this connection"): reconnect
# and send the message again, as after a drop, without slowing anyone down.
THROTTLING = frozenset({454})
_RATE_WORDS = re.compile(rb"(?i)throttl|\brate\b|rate.limit|exceeded|slow down|4\.7\.28|too many recipients")
# A message is sent again on a new connection after its first one broke, once.
MAX_DROPS = 2


def wire(data: bytes, dot_safe: bool = False) -> bytes:
    """The message as DATA content: CRLF at the end, dot-stuffed where a line starts with a
    dot. A message built ``dot_safe`` has none (its quoted-printable writes them ``=2E``)
    and is sent as it is; any other is scanned once, at C speed, never by a regex."""
    if dot_safe and data.endswith(b"\r\n"):
        return data
    if b"\r" in data.replace(b"\r\n", b"") or b"\n" in data.replace(b"\r\n", b""):
        # A bare CR or LF: as smtplib does, every line end becomes CRLF first, so that no
        # ".\n" can end the data early on a lenient server.
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\r\n." in data:
        data = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def reply_text(code: int, text: bytes | str) -> str:
    """A server's reply as one line (a multi-line reply's lines joined), for the ledger."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(f"{code} {text}".split())


def refusal(code: int, text: bytes | str) -> Exception:
    reply = reply_text(code, text)
    return TemporaryFailure(reply) if 400 <= code < 500 else PermanentFailure(reply)


def throttling(code: int, text: bytes) -> bool:
    return code in THROTTLING or (code in (421, 451, 452) and _RATE_WORDS.search(text) is not None)


class Throttled(Exception):
    """The server asked us to slow down; the message goes again after a pause."""


class LaneLost(DeliveryError):
    """One more connection could not be opened (a server's limit per client, say): the
    connections already open go on without it."""


class Pacing:
    """What the connections need of the sender's shared pace (``quota.Pacer`` or a stand-in)."""

    def turn(self) -> float | None:
        """Take the next message's turn now: None. Or how long until one may be free (0:
        once a turn on the way settles), taking none. Raises to stop the send (a quota
        reached). Each turn taken is settled by ``ok`` or ``release``."""
        return None

    def release(self, n: int = 1) -> None:
        """``n`` turns taken did not end in an accepted message."""

    def throttled(self) -> float:
        """The server said slow down: return how long to pause."""
        return 1.0

    def ok(self) -> None:
        """A message was accepted."""

    def exhausted(self) -> bool:
        """Throttled for longer than the sender's patience: stop, the rest stays pending."""
        return False


def envelope_safe(address: str) -> bool:
    return address.isascii() and _UNSAFE.search(address) is None


_UNSAFE = re.compile(r"[\r\n<> ]")


class ReplyReader:
    """SMTP replies out of the bytes a connection has read, however they were cut up: each
    reply as (code, its lines' text joined by newlines), as smtplib's ``getreply()`` gives it.
    A line with no valid code gives code -1 (and ends that reply)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lines: list[bytes] = []  # of a multi-line reply not complete yet

    def feed(self, data: bytes) -> None:
        self.buf += data

    def take(self) -> list[tuple[int, bytes]]:
        """The replies complete so far; ValueError for a line longer than any server writes."""
        end = self.buf.rfind(b"\n")
        if end < 0:
            if len(self.buf) > _MAXLINE:
                raise ValueError("Line too long.")
            return []
        *lines, rest = bytes(self.buf).split(b"\n")
        self.buf = bytearray(rest)
        replies: list[tuple[int, bytes]] = []
        for line in lines:
            if len(line) >= _MAXLINE:
                raise ValueError("Line too long.")
            self.lines.append(line[4:].strip(b" \t\r"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1  # a broken code: no continuation is read
            else:
                if line[3:4] == b"-":
                    continue
            text = b"\n".join(self.lines) if len(self.lines) > 1 else self.lines[0]
            self.lines = []
            replies.append((code, text))
        if len(rest) > _MAXLINE:
            raise ValueError("Line too long.")
        return replies


class Dropped(Exception):
    """The connection is gone (closed, reset, timed out, a 421): what was on it goes again."""


class Connection:
    """One open connection's socket, non-blocking: what is written and not yet taken by the
    kernel, the replies as they come, and when the server must next be heard from."""

    def __init__(self, smtp: smtplib.SMTP, timeout: float) -> None:
        sock = smtp.sock
        if sock is None:
            raise Dropped("please run connect() first")
        self.smtp, self.sock, self.timeout = smtp, sock, timeout
        self.pipelining = smtp.has_extn("pipelining")
        self.size = smtp.has_extn("size")
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # The short envelope behind a long message must not wait for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.replies = ReplyReader()
        self.out: deque[memoryview] = deque()  # written by us, not yet taken by the kernel
        self.deadline = time.monotonic() + timeout

    def write(self, *parts: bytes) -> None:
        self.out.extend(memoryview(p) for p in parts if p)
        self.deadline = time.monotonic() + self.timeout  # for its reply, or its taking
        self.push()

    def push(self) -> None:
        """Hand the kernel what it takes now; the rest when the socket can take more."""
        out = self.out
        try:
            while out:
                # No sendmsg() on TLS; on TCP one call takes the content and what follows it.
                sent = self.sock.send(out[0]) if self.tls else self.sock.sendmsg(list(out)[:8])
                self.deadline = time.monotonic() + self.timeout
                while sent and out:
                    if sent >= len(out[0]):
                        sent -= len(out.popleft())
                    else:
                        out[0] = out[0][sent:]
                        sent = 0
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            raise Dropped(f"Server not connected: {exc}") from None

    def read(self) -> list[tuple[int, bytes]]:
        """The replies complete so far; raises Dropped when the server is gone."""
        got = False
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Dropped("Connection unexpectedly closed")
                got = True
                self.replies.feed(chunk)
                if len(chunk) < 65536 and not (self.tls and self.sock.pending()):  # type: ignore[attr-defined]
                    break
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError as exc:
            raise Dropped(f"Connection unexpectedly closed: {exc}") from None
        if got:
            self.deadline = time.monotonic() + self.timeout
        try:
            return self.replies.take()
        except ValueError as exc:
            raise Dropped(str(exc)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.smtp.close()
