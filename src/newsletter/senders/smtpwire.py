"""One SMTP connection that pipelines (RFC 2920): one round trip a message.

smtplib opens the connection (TCP or implicit TLS, EHLO, STARTTLS, AUTH: what it does well and
what it has been trusted with for decades); after that a lane speaks on the same socket
(``_write`` and ``_reply``, smtplib's ``send()`` and ``getreply()`` without their per-call
bookkeeping), so that one message's end of data and the next
message's envelope go out in one write and their replies are read back in order::

    C: <content of message k>.\\r\\nMAIL FROM:<...>\\r\\nRCPT TO:<...>\\r\\nDATA\\r\\n
    S: 250 (k queued)  250 (MAIL)  250 (RCPT)  354 (go ahead)

A server that does not advertise PIPELINING gets every command on its own, in lock-step.
Whichever way, every reply is read, a refused RCPT still gets its DATA reply (a 354 there is
answered with an empty message, which RFC 2920 forbids the server to deliver), and a message
counts as sent only after the 250 that follows its end of data.

The bound on duplicates: before the end of data of message k+1 goes out, the 250 of message k
must be on disk (``Feed.recorded``). A process killed at any moment has then at most one
message per connection whose fate it does not know.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeliveryError, PermanentFailure, TemporaryFailure
from . import Feed, Job

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


class _Stopped(Exception):
    """The run was stopped while a lane waited for its turn."""


class LaneLost(DeliveryError):
    """One more connection could not be opened (a server's limit per client, say): the
    connections already open go on without it."""

    others_go_on = True


class Pacing:
    """What a lane needs of the sender's shared pace (``quota.Pacer`` or a stand-in)."""

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for the next message's turn (False: the run was stopped meanwhile); raise to
        stop the run (a quota reached). Each turn is settled by ``ok`` or ``release``."""
        return True

    def try_acquire(self) -> bool:
        """A turn if one is free now, without waiting."""
        return True

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


@dataclass(eq=False)
class _Msg:
    job: Job
    content: bytes
    error: Exception | None = None  # the first refusal of its envelope: the reader's
    throttled: str = ""  # a throttling reply: the server's pace, sent again after a pause


class Lane:
    """One connection's worth of a send: takes jobs from the feed until it has none left.

    ``name`` says which sender and server errors are about; ``connect`` opens a ready
    connection (EHLO, TLS, AUTH done) or raises DeliveryError.
    """

    def __init__(
        self,
        feed: Feed,
        connect: Callable[[], smtplib.SMTP],
        pacing: Pacing,
        *,
        name: str,
        per_connection: int | None = None,
        conn: smtplib.SMTP | None = None,
    ) -> None:
        self.feed = feed
        self.connect = connect
        self.pacing = pacing
        self.name = name
        self.per_connection = per_connection
        self.conn = conn
        self.opened = conn is not None  # this lane has had a connection
        self.closing = ""  # the 421 a server last closed a connection with
        self.retry: deque[Job] = deque()  # from a connection that broke: they go first
        self.inflight: list[Job] = []  # written on this connection, not answered yet
        self.prev: Job | None = None  # answered last: on disk before our next end of data
        self.drops: dict[Job, int] = {}  # connections lost under a message not yet answered
        self.pipelining = self.size = False  # what the current connection's EHLO said
        self.expect: list[bytes] = []  # the commands written whose replies are still to read
        self.lockstep: list[bytes] = []  # without PIPELINING: commands still to write, one a reply

    def run(self) -> None:
        """Until the feed has no more; raises what ended the lane early (DeliveryError, a
        quota reached), after giving back every message taken and not answered."""
        clean = False
        try:
            while (job := self.retry.popleft() if self.retry else self.feed.take(wait=True)) is not None:
                self.retry.appendleft(job)
                if self.feed.stop.is_set():
                    break  # stopped: no new connection for what is left
                if self.conn is None:
                    self.conn = self._open()
                self._streak(self.conn)
            clean = True
        except _Stopped:
            clean = True
        finally:
            if self.inflight or not clean:
                # Mid-message, a QUIT would be read as content: hang up instead.
                self._hang_up()
            else:
                self._quit()
            self.pacing.release(len(self.inflight))
            back = [*self.inflight, *self.retry]
            self.inflight.clear()
            self.retry.clear()
            if back:
                self.feed.give_back(back)

    def _open(self) -> smtplib.SMTP:
        try:
            return self.connect()
        except DeliveryError as exc:
            if self.opened and self.closing:
                # What the server said as it closed the last one says more than the refusal.
                raise DeliveryError(
                    f"{exc}; it had closed the connection with {self.closing}", exc.hint
                ) from None
            if self.opened:
                raise  # it worked before and broke: the server is gone
            raise LaneLost(str(exc), exc.hint) from None
        finally:
            self.opened = True

    def _quit(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()
            except (OSError, smtplib.SMTPException):
                self.conn.close()
            self.conn = None

    def _hang_up(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _give_back_inflight(self) -> None:
        self._hang_up()
        self.pacing.release(len(self.inflight))
        back, self.inflight = self.inflight, []
        self.feed.give_back(back)

    def _broken(self) -> None:
        """The connection is gone: what was on it goes again on the next one, first."""
        self._hang_up()
        self.pacing.release(len(self.inflight))
        self.retry.extendleft(reversed(self.inflight))
        self.inflight.clear()

    # -- one connection ---------------------------------------------------------------------

    def _streak(self, conn: smtplib.SMTP) -> None:
        """Send on ``conn`` until work runs out, or the connection is used up or breaks (what
        was on it is then in ``retry``, for the next connection)."""
        self.pipelining = conn.has_extn("pipelining")
        self.size = conn.has_extn("size")
        sock = conn.sock
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The short envelope behind a long message must not wait for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            _kernel_timeout(sock)
        used = 0
        try:
            msg = self._next(wait=True)
            rset = False
            while msg is not None:
                self._send_envelope(conn, msg, rset)
                rset = False
                while msg is not None:
                    if not self._envelope_replies(conn, msg):
                        self._refused(msg)
                        rset = True
                        msg = self._next(wait=True)
                        break
                    # 354: the content goes now, the next envelope right behind its end of data.
                    if self.prev is not None:
                        self.feed.recorded(self.prev)
                        self.prev = None
                    if msg.job.valid is not None and not msg.job.valid():
                        # No longer ours to send (this process was paused past its batch's
                        # lease): hanging up mid-DATA makes the server drop it unsent.
                        self._give_back_inflight()
                        return
                    used += 1
                    last = self.per_connection is not None and used >= self.per_connection
                    nxt = self._next(wait=False) if self.pipelining and not last else None
                    tail = DOT
                    if nxt is not None:
                        tail += self._envelope(nxt, False)
                    elif last and self.pipelining:
                        tail += b"QUIT\r\n"  # may end a group (RFC 2920)
                    _write(conn, msg.content, tail)
                    self._answer(msg, *_reply(conn))
                    if last:
                        if self.pipelining:
                            self.conn = None
                            conn.close()
                        else:
                            self._quit()
                        return
                    if nxt is None:
                        msg = self._next(wait=True)
                        break  # its envelope is not written yet
                    self.expect = [b"MAIL", b"RCPT", b"DATA"]
                    msg = nxt
        except Throttled:
            self.pacing.throttled()  # every lane's next turn waits out the hold
            self._broken()
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            for job in self.inflight:
                self.drops[job] = self.drops.get(job, 0) + 1
                if self.drops[job] >= MAX_DROPS:
                    self._broken()
                    raise DeliveryError(
                        f"sender {self.name}: lost the connection twice while sending: {exc}",
                        hint="nothing was lost; the undelivered messages are sent on the next run",
                    ) from None
            self._broken()

    def _next(self, *, wait: bool) -> _Msg | None:
        """The next message to write on this connection, its turn taken; None: no work.

        ``wait=False`` is asked with a 354 outstanding: only a message that can go at once,
        since the content owed to the server must not wait for a turn (the turn it would wait
        for may be this very message's, under a day quota)."""
        while (job := self.retry.popleft() if self.retry else self.feed.take(wait=wait)) is not None:
            if job.valid is not None and not job.valid():
                self.feed.give_back([job])  # from a broken connection, and no longer ours
                continue
            msg = _Msg(job, wire(job.message.data, job.message.dot_safe))
            bad = [a for a in (job.message.envelope_from, job.message.recipient) if not _envelope_safe(a)]
            if bad:
                # SMTPUTF8 is not spoken, and nothing may break out of the command line.
                self.feed.done(job, PermanentFailure(f"address {bad[0]!r} cannot go into an SMTP envelope"))
                continue
            if not wait and not self.pacing.try_acquire():
                self.retry.appendleft(job)  # next, after this message's 250
                return None
            if wait and not self.pacing.acquire(self.feed.stop):
                self.retry.appendleft(job)
                raise _Stopped
            self.inflight.append(job)  # from here on it holds a turn until ok() or release()
            return msg
        return None

    def _envelope(self, msg: _Msg, rset: bool) -> bytes:
        m = msg.job.message
        opts = f" SIZE={len(msg.content)}" if self.size else ""
        head = "RSET\r\n" if rset else ""
        return f"{head}MAIL FROM:<{m.envelope_from}>{opts}\r\nRCPT TO:<{m.recipient}>\r\nDATA\r\n".encode()

    def _send_envelope(self, conn: smtplib.SMTP, msg: _Msg, rset: bool) -> None:
        commands = [line + b"\r\n" for line in self._envelope(msg, rset).split(b"\r\n") if line]
        self.expect = [c[:4] for c in commands]  # RSET, MAIL, RCPT, DATA
        if self.pipelining:
            conn.send(b"".join(commands))
            self.lockstep = []
        else:  # each command alone, the next written once the reply to this one is read
            conn.send(commands[0])
            self.lockstep = commands[1:]

    def _envelope_replies(self, conn: smtplib.SMTP, msg: _Msg) -> bool:
        """Read the replies to what the envelope wrote; True when the content may go.

        ``expect`` names the commands written, in order.
        """
        for command in self.expect:
            code, text = _reply(conn)
            if code == 421:  # closing: the connection is done, the message goes again
                self.closing = reply_text(code, text)
                if throttling(code, text):
                    self._throttled(msg, reply_text(code, text))
                raise smtplib.SMTPServerDisconnected(reply_text(code, text))
            if command == b"DATA":
                if code == 354 and (msg.error is not None or msg.throttled):
                    # DATA taken with no valid recipient: an empty message ends it (RFC 2920
                    # forbids the server to deliver it to anyone).
                    conn.send(DOT)
                    conn.getreply()
                    return False
                if code != 354:
                    self._step(msg, code, text)
                    return False
                return True
            if command != b"RSET":
                self._step(msg, code, text)
            if self.lockstep:
                if msg.error is not None or msg.throttled:
                    self.lockstep = []  # lock-step: no RCPT or DATA after a refusal
                    return False
                conn.send(self.lockstep.pop(0))
        return False  # not reached: every envelope ends with DATA

    def _step(self, msg: _Msg, code: int, text: bytes) -> None:
        if code < 400 or msg.error is not None or msg.throttled:
            return
        if throttling(code, text):
            msg.throttled = reply_text(code, text)
        else:
            msg.error = refusal(code, text)

    def _refused(self, msg: _Msg) -> None:
        """The envelope was refused (the reader's fault) or deferred (the server's pace)."""
        if msg.throttled:
            self._throttled(msg, msg.throttled)
        self.pacing.release()
        self._finish(msg, msg.error or PermanentFailure("refused"))

    def _answer(self, msg: _Msg, code: int, text: bytes) -> None:
        """The reply to a message's end of data: only a 250 here makes it sent."""
        if code == 250:
            self._finish(msg, None)
            self.pacing.ok()
        elif throttling(code, text):
            self._throttled(msg, reply_text(code, text))
        elif code == 421:  # closing without taking it: as a drop, the message goes again
            self.closing = reply_text(code, text)
            raise smtplib.SMTPServerDisconnected(reply_text(code, text))
        else:
            self.pacing.release()
            self._finish(msg, refusal(code, text))

    def _throttled(self, msg: _Msg, reply: str) -> None:
        if self.pacing.exhausted():
            self._broken()
            raise DeliveryError(
                f"sender {self.name}: the server keeps throttling: {reply}",
                hint="nothing was lost; the undelivered messages are sent on the next run",
            )
        raise Throttled(reply)

    def _finish(self, msg: _Msg, error: Exception | None) -> None:
        self.inflight.remove(msg.job)
        self.drops.pop(msg.job, None)
        self.feed.done(msg.job, error)
        self.prev = msg.job


def _envelope_safe(address: str) -> bool:
    return address.isascii() and _UNSAFE.search(address) is None


_UNSAFE = re.compile(r"[\r\n<> ]")


def _write(conn: smtplib.SMTP, content: bytes, tail: bytes) -> None:
    """``content`` then ``tail`` in one system call where the kernel takes both at once:
    neither is copied into the other (100 KB a message)."""
    sock = conn.sock
    if sock is None:
        raise smtplib.SMTPServerDisconnected("please run connect() first")
    try:
        if isinstance(sock, ssl.SSLSocket):  # no sendmsg() on TLS: two writes
            sock.sendall(content)
            sock.sendall(tail)
            return
        sent = sock.sendmsg((content, tail))
        if sent < len(content):
            sock.sendall(memoryview(content)[sent:])
            sock.sendall(tail)
        elif sent < len(content) + len(tail):
            sock.sendall(tail[sent - len(content) :])
    except OSError as exc:
        conn.close()
        raise smtplib.SMTPServerDisconnected(f"Server not connected: {_said(exc)}") from None


def _kernel_timeout(sock: socket.socket) -> None:
    """Leave the socket's timeout to the kernel (SO_RCVTIMEO, SO_SNDTIMEO). Python's own
    polls before every recv and send, and each system call hands the GIL over and back: twice
    a call instead of once, on every message of every connection. A read that times out then
    returns no bytes, which ``_reply`` tells from a closed connection by the time it took.

    Not on TLS: the ssl module retries a blocking socket's "want read" for ever, so there the
    kernel's timeout would never end a read."""
    timeout = sock.gettimeout()
    if not timeout or isinstance(sock, ssl.SSLSocket):
        return
    tv = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.settimeout(None)


def _said(exc: OSError) -> str:
    # The kernel's timeout (``_kernel_timeout``) surfaces as EAGAIN: it is a timeout.
    return "timed out" if isinstance(exc, BlockingIOError) else str(exc)


def _reply(conn: smtplib.SMTP) -> tuple[int, bytes]:
    """``conn.getreply()`` for the hot path: the same reply (code, its lines joined by
    newlines), the same errors, without smtplib's per-line bookkeeping (4 replies a message)."""
    file = conn.file
    if file is None:
        if conn.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        file = conn.file = conn.sock.makefile("rb")
    lines: list[bytes] = []
    started = time.monotonic()
    while True:
        try:
            line = file.readline(_MAXLINE + 1)
        except OSError as exc:
            conn.close()
            raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {_said(exc)}") from None
        if not line:
            conn.close()
            timeout = conn.timeout if isinstance(conn.timeout, float | int) else 0
            why = ": timed out" if timeout and time.monotonic() - started >= timeout - 0.01 else ""
            raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed{why}")
        if len(line) > _MAXLINE:
            conn.close()
            raise smtplib.SMTPResponseException(500, "Line too long.")
        lines.append(line[4:].strip(b" \t\r\n"))
        try:
            code = int(line[:3])
        except ValueError:
            return -1, b"\n".join(lines)  # a broken code: no continuation is read
        if line[3:4] != b"-":
            return code, b"\n".join(lines) if len(lines) > 1 else lines[0]
