"""Every connection of one SMTP send, multiplexed in the delivery loop's own thread.

One ``selectors`` loop drives all connections with non-blocking sockets (TLS included):
it reads whatever replies have come, writes the next message's content where its 354 has come,
and asks the feed for messages and writes their outcomes in between. No thread waits on a
socket, and none hands the interpreter to another several times a message: with ten
connections that hand-over cost more than building the messages. Only opening a connection
(TCP, EHLO, STARTTLS, AUTH: smtplib, a few round trips once per connection) runs in a thread
of its own, and its result comes back to the loop.

Each connection speaks as ``smtpwire`` describes: pipelined when the server offers it (one
round trip a message), lock-step when not. The bound on duplicates: the end of data of a
connection's next message goes out only after its last outcome is on disk (``Feed.flush``),
so a process killed at any moment has at most one message per connection of unknown fate.
"""

from __future__ import annotations

import contextlib
import selectors
import smtplib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..errors import DeliveryError, PermanentFailure
from . import Feed, Job
from .smtpwire import (
    DOT,
    MAX_DROPS,
    Connection,
    Dropped,
    LaneLost,
    Pacing,
    Throttled,
    envelope_safe,
    refusal,
    reply_text,
    throttling,
    wire,
)

# How often the loop looks up at least (a stop, a lease to renew, a turn under a quota).
_LOOK = 0.25
# After the first outcome, how long to wait for the other connections' before writing them all
# in one transaction (a commit costs more CPU than a message); not at all once no end of data is
# waiting for its reply. Every connection with its next content ready waits for that commit.
GATHER = 0.002
_quiet = contextlib.suppress(OSError, KeyError, ValueError)  # tidying up: already closed
# What is written on a connection and whose reply is still to come.
_MAIL, _RCPT, _DATA, _RSET, _END, _EMPTY, _QUIT = b"MAIL", b"RCPT", b"DATA", b"RSET", b".", b"", b"QUIT"


@dataclass(eq=False)
class _Msg:
    job: Job
    content: bytes
    error: Exception | None = None  # the first refusal of its envelope: the reader's
    throttled: str = ""  # a throttling reply: the server's pace, sent again after a pause


class _Slot:
    """One of the sender's ``connections``: its connection now, or the one being opened."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: _Conn | None = None
        self.opening: Future[smtplib.SMTP] | None = None
        self.first: Job | None = None  # taken for the connection being opened
        self.opened = False  # it has had a connection: failing to open another ends the run
        self.lost = False  # its first connection could not be opened: it stays unused
        self.closing = ""  # the 421 a server last closed its connection with


class _Conn(Connection):
    """One open connection and where its conversation stands."""

    def __init__(self, slot: _Slot, smtp: smtplib.SMTP, timeout: float) -> None:
        super().__init__(smtp, timeout)
        self.slot = slot
        self.expect: deque[tuple[bytes, _Msg | None]] = deque()  # the replies still to read
        self.lockstep: list[bytes] = []  # without PIPELINING: commands still to write
        self.msg: _Msg | None = None  # whose envelope is out, or whose content waits (``ready``)
        self.ready = False  # its 354 came: the content goes once the last outcome is on disk
        self.unflushed = False  # its last outcome is not on disk yet
        self.ends = 0  # ends of data written whose reply is still to come
        self.inflight: list[Job] = []  # written on this connection, not answered yet
        self.used = 0
        self.last = False  # this connection's last message is written: it closes after it
        self.rset = False  # the envelope before was refused: the next one starts with RSET
        self.quitting = False
        self.watching = selectors.EVENT_READ

    @property
    def busy(self) -> bool:
        return bool(self.expect or self.out or self.ready)


class Mux:
    """All connections of one send, in the calling thread, until the feed has no more.

    ``connect`` opens a ready connection (EHLO, TLS, AUTH done) or raises DeliveryError; it
    runs in a thread of its own. ``first`` is a connection already open (the sender's ``open``).
    """

    def __init__(
        self,
        feed: Feed,
        connect: Callable[[], smtplib.SMTP],
        pacing: Pacing,
        *,
        name: str,
        connections: int,
        timeout: float,
        per_connection: int | None = None,
        first: smtplib.SMTP | None = None,
    ) -> None:
        self.feed, self.connect, self.pacing, self.name = feed, connect, pacing, name
        self.timeout, self.per_connection = timeout, per_connection
        self.slots = [_Slot(i) for i in range(connections)]
        self.first = first
        self.retry: deque[Job] = deque()  # from a connection that broke: they go first
        self.drops: dict[Job, int] = {}  # connections lost under a message not yet answered
        self.halted: BaseException | None = None  # why no new message starts (raised at the end)
        self.lost: LaneLost | None = None  # the last connection that could not be opened
        self.owed, self.owed_since = 0, 0.0  # outcomes given the feed and not flushed, since when
        self.throttling = ""  # the server's last throttling reply
        self.turn_at = 0.0  # no turn before this monotonic time (a rate, a hold)
        self.exhausted = False  # the feed has no more
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Until the feed has no more and every connection is closed; raises what ended the
        send early (DeliveryError, a quota reached), after every outcome known is on disk and
        every message taken and not answered is given back."""
        clean = False
        try:
            if self.first is not None:
                self._start(self.slots[0], self.first)
                self.first = None
            while self._round():
                pass
            clean = True
        finally:
            for slot in self.slots:
                if slot.conn is not None:
                    self._hang_up(slot.conn)
                if slot.first is not None:
                    self.retry.append(slot.first)
                    slot.first = None
            for slot in self.slots:
                if slot.opening is not None:
                    slot.opening.add_done_callback(_close_opened)
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()
            if self.retry:
                self.feed.give_back(list(self.retry))
                self.retry.clear()
        if clean:
            self.feed.flush()
        if self.halted is not None:
            raise self.halted

    def _round(self) -> bool:
        """One turn of the loop; False when everything is done."""
        self._hand_out()
        conns = [s.conn for s in self.slots if s.conn is not None]
        # Stopping: a connection still being opened is not waited for (it is closed once open).
        if not conns and (self.stopping or not any(s.opening for s in self.slots)):
            if self.retry and self.halted is None and not self.feed.stop.is_set():
                raise self.lost or DeliveryError(f"sender {self.name}: no connection left to send on")
            return False
        now = time.monotonic()
        waits = [_LOOK] + [c.deadline - now for c in conns if c.busy]
        if self.owed:
            waits.append(self.owed_since + GATHER - now)
        if self.turn_at > now and any(not c.busy and not c.quitting for c in conns):
            waits.append(self.turn_at - now)
        ready = self.selector.select(max(0.0, min(waits)))
        for key, events in ready:
            conn = key.data
            if conn is None:
                with _quiet:
                    self.wake_r.recv(4096)
                continue
            if conn.slot.conn is not conn:
                continue  # closed earlier in this turn
            self._guard(conn, self._service, conn, events)
        self._opened()
        now = time.monotonic()
        for conn in conns:
            if conn.slot.conn is conn and conn.busy and now > conn.deadline:
                self._guard(conn, self._timed_out, conn)
        # Outcomes that came together go to disk together, before any end of data behind them.
        live = [s.conn for s in self.slots if s.conn is not None]
        if self.owed and (now - self.owed_since >= GATHER or not any(c.ends for c in live)):
            self.feed.flush()
            self.owed = 0
            for conn in live:
                conn.unflushed = False
        for conn in live:
            if conn.ready and not conn.unflushed and conn.slot.conn is conn:
                self._guard(conn, self._content, conn)
        self.feed.tick()
        return True

    def _service(self, conn: _Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            conn.push()
        if events & selectors.EVENT_READ:
            for code, text in conn.read():
                if conn.slot.conn is not conn:
                    break
                self._reply(conn, code, text)
        self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        if conn.slot.conn is not conn:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if want != conn.watching:
            conn.watching = want
            self.selector.modify(conn.sock, want, conn)

    def _timed_out(self, conn: _Conn) -> None:
        raise Dropped("Connection unexpectedly closed: timed out")

    def _guard(self, conn: _Conn, step: Callable[..., None], *args: object) -> None:
        """Run one step of a connection; what breaks it is dealt with here."""
        try:
            step(*args)
        except Throttled as exc:
            self.throttling = str(exc)
            self.pacing.throttled()  # every connection's next turn waits out the hold
            self._hang_up(conn)
        except Dropped as exc:
            if conn.quitting and not conn.inflight:
                self._hang_up(conn)  # it had nothing more to say
                return
            for job in conn.inflight:
                self.drops[job] = self.drops.get(job, 0) + 1
                if self.drops[job] >= MAX_DROPS:
                    self._hang_up(conn)
                    self._halt(
                        DeliveryError(
                            f"sender {self.name}: lost the connection twice while sending: {exc}",
                            hint="nothing was lost; the undelivered messages are sent on the next run",
                        )
                    )
                    return
            self._hang_up(conn)
        except DeliveryError as exc:  # throttled past the sender's patience
            self._hang_up(conn)
            self._halt(exc)

    def _halt(self, exc: BaseException) -> None:
        """No new message starts; what is on the way is answered, then ``exc`` is raised."""
        if self.halted is None:
            self.halted = exc

    @property
    def stopping(self) -> bool:
        return self.halted is not None or self.feed.stop.is_set()

    # -- handing out ---------------------------------------------------------------------------

    def _hand_out(self) -> None:
        """Give every idle connection its next message; open connections for the rest."""
        # Messages on another connection, or taken for one being opened, may yet come back.
        holding = any((s.conn is not None and s.conn.inflight) or s.opening is not None for s in self.slots)
        for slot in self.slots:
            conn = slot.conn
            if conn is None or conn.busy or conn.quitting:
                continue
            msg = self._next(conn)
            if msg is not None:
                self._guard(conn, self._envelope, conn, msg)
            elif self.stopping or (self.exhausted and not self.retry and not holding):
                self._guard(conn, self._quit, conn)
        for slot in self.slots:
            if slot.conn is None and slot.opening is None and not slot.lost and not self.stopping:
                job = self._take()
                if job is None:
                    break
                slot.first = job
                slot.opening = _open_in_thread(self.connect, f"smtp-open-{slot.index}")
                slot.opening.add_done_callback(self._wake)

    def _wake(self, _: object) -> None:
        with _quiet:
            self.wake_w.send(b"!")

    def _opened(self) -> None:
        for slot in self.slots:
            future = slot.opening
            if future is None or not future.done():
                continue
            slot.opening = None
            job, slot.first = slot.first, None
            if job is not None:
                self.retry.appendleft(job)
            try:
                smtp = future.result()
            except DeliveryError as exc:
                if slot.opened and slot.closing:
                    # What the server said as it closed the last one says more than the refusal.
                    self._halt(
                        DeliveryError(f"{exc}; it had closed the connection with {slot.closing}", exc.hint)
                    )
                elif slot.opened:
                    self._halt(exc)  # it worked before and broke: the server is gone
                else:
                    slot.lost = True
                    self.lost = LaneLost(str(exc), exc.hint)
                continue
            if self.stopping:
                _close_opened(future)
                continue
            self._start(slot, smtp)

    def _start(self, slot: _Slot, smtp: smtplib.SMTP) -> None:
        slot.opened = True
        slot.closing = ""  # what the server said as it closed the one before: past now
        try:
            conn = _Conn(slot, smtp, self.timeout)
        except (Dropped, OSError):
            smtp.close()
            return
        # An outcome of the slot's last connection may not be on disk yet: this one's first
        # end of data waits for it too, or a kill now could leave two unknown on one slot.
        conn.unflushed = bool(self.owed)
        slot.conn = conn
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _take(self) -> Job | None:
        """The next job to send: one given back first, then a new one from the feed."""
        if self.stopping:
            return None
        while True:
            if self.retry:
                job: Job | None = self.retry.popleft()
            elif self.exhausted:
                return None
            else:
                job = self.feed.take()
            if job is None:
                self.exhausted = True
                return None
            if job.valid is not None and not job.valid():
                self.feed.give_back([job])  # from a broken connection, and no longer ours
                continue
            address = next(
                (a for a in (job.message.envelope_from, job.message.recipient) if not envelope_safe(a)), None
            )
            if address is not None:
                # SMTPUTF8 is not spoken, and nothing may break out of the command line.
                self._owe()
                self.feed.done(job, PermanentFailure(f"address {address!r} cannot go into an SMTP envelope"))
                continue
            return job

    def _next(self, conn: _Conn) -> _Msg | None:
        """The next message for ``conn``, its turn taken; None: none now (no work, no turn)."""
        if time.monotonic() < self.turn_at:
            return None
        job = self._take()
        if job is None:
            return None
        try:
            if self.throttling and self.pacing.exhausted():
                self._throttled(self.throttling)  # raises: patience is at an end
            wait = self.pacing.turn()
        except Exception as exc:  # a quota reached, or throttled past the sender's patience
            self.retry.appendleft(job)
            self._halt(exc)
            return None
        if wait is not None:
            self.retry.appendleft(job)  # next, once its turn comes
            self.turn_at = time.monotonic() + (wait or 0.05)
            return None
        conn.inflight.append(job)  # from here on it holds a turn until ok() or release()
        return _Msg(job, wire(job.message.data, job.message.dot_safe))

    # -- what is written -----------------------------------------------------------------------

    def _envelope(self, conn: _Conn, msg: _Msg) -> None:
        conn.msg = msg
        commands = _commands(msg, conn.rset, conn.size)
        conn.rset = False
        if conn.pipelining:
            conn.expect.extend((c[:4], msg) for c in commands)
            conn.write(b"".join(commands))
        else:  # each command alone, the next written once the reply to this one is read
            conn.expect.append((commands[0][:4], msg))
            conn.lockstep = commands[1:]
            conn.write(commands[0])
        self._watch(conn)

    def _content(self, conn: _Conn) -> None:
        """After its 354, and with the last outcome on disk: the content, and behind its end
        of data the next envelope (or QUIT, after the connection's last message)."""
        msg = conn.msg
        assert msg is not None
        conn.ready = False
        if msg.job.valid is not None and not msg.job.valid():
            # No longer ours to send (this process was paused past its batch's lease):
            # hanging up mid-DATA makes the server drop it unsent.
            self._hang_up(conn)
            return
        conn.used += 1
        conn.last = self.per_connection is not None and conn.used >= self.per_connection
        nxt = self._next(conn) if conn.pipelining and not conn.last and not self.stopping else None
        conn.expect.append((_END, msg))
        conn.ends += 1
        conn.msg = nxt
        if nxt is not None:
            commands = _commands(nxt, False, conn.size)
            conn.expect.extend((c[:4], nxt) for c in commands)
            conn.write(msg.content, DOT + b"".join(commands))
        elif conn.last and conn.pipelining:
            conn.write(msg.content, DOT + b"QUIT\r\n")  # may end a group (RFC 2920)
        else:
            conn.write(msg.content, DOT)
        self._watch(conn)

    def _quit(self, conn: _Conn) -> None:
        conn.quitting = True
        conn.expect.append((_QUIT, None))
        conn.write(b"QUIT\r\n")
        self._watch(conn)

    # -- what is read --------------------------------------------------------------------------

    def _reply(self, conn: _Conn, code: int, text: bytes) -> None:
        if not conn.expect:
            if code == 421:  # "idle timeout, closing": said as the server hangs up
                conn.slot.closing = reply_text(code, text)
            raise Dropped(f"a reply nothing asked for: {reply_text(code, text)}")
        command, msg = conn.expect.popleft()
        if command == _QUIT:
            self._hang_up(conn)
        elif command == _END:
            assert msg is not None
            conn.ends -= 1
            self._answer(conn, msg, code, text)
            if conn.last:
                if conn.pipelining:
                    self._hang_up(conn)  # its QUIT went behind the end of data
                else:
                    self._quit(conn)
        elif command == _EMPTY:  # the empty message that ended a DATA with no recipient
            assert msg is not None
            self._refused(conn, msg)
        else:
            assert msg is not None
            self._envelope_reply(conn, msg, command, code, text)

    def _envelope_reply(self, conn: _Conn, msg: _Msg, command: bytes, code: int, text: bytes) -> None:
        if code == 421:  # closing: the connection is done, the message goes again
            conn.slot.closing = reply_text(code, text)
            if throttling(code, text):
                self._throttled(reply_text(code, text))
            raise Dropped(reply_text(code, text))
        if command == _DATA:
            if code == 354 and (msg.error is not None or msg.throttled):
                # DATA taken with no valid recipient: an empty message ends it (RFC 2920
                # forbids the server to deliver it to anyone).
                conn.expect.append((_EMPTY, msg))
                conn.write(DOT)
            elif code != 354:
                self._step(msg, code, text)
                self._refused(conn, msg)
            else:
                conn.ready = True
            return
        if command != _RSET:
            self._step(msg, code, text)
        if conn.lockstep:
            if msg.error is not None or msg.throttled:
                conn.lockstep = []  # lock-step: no RCPT or DATA after a refusal
                self._refused(conn, msg)
                return
            nxt = conn.lockstep.pop(0)
            conn.expect.append((nxt[:4], msg))
            conn.write(nxt)

    def _step(self, msg: _Msg, code: int, text: bytes) -> None:
        if code < 400 or msg.error is not None or msg.throttled:
            return
        if throttling(code, text):
            msg.throttled = reply_text(code, text)
        else:
            msg.error = refusal(code, text)

    def _refused(self, conn: _Conn, msg: _Msg) -> None:
        """The envelope was refused (the reader's fault) or deferred (the server's pace)."""
        if msg.throttled:
            self._throttled(msg.throttled)
        self.pacing.release()
        conn.rset = True
        if conn.msg is msg:
            conn.msg = None
        self._finish(conn, msg, msg.error or PermanentFailure("refused"))

    def _answer(self, conn: _Conn, msg: _Msg, code: int, text: bytes) -> None:
        """The reply to a message's end of data: only a 250 here makes it sent."""
        if code == 250:
            self._finish(conn, msg, None)
            self.pacing.ok()
        elif throttling(code, text):
            self._throttled(reply_text(code, text))
        elif code == 421:  # closing without taking it: as a drop, the message goes again
            conn.slot.closing = reply_text(code, text)
            raise Dropped(reply_text(code, text))
        else:
            self.pacing.release()
            self._finish(conn, msg, refusal(code, text))

    def _throttled(self, reply: str) -> None:
        if self.pacing.exhausted():
            raise DeliveryError(
                f"sender {self.name}: the server keeps throttling: {reply}",
                hint="nothing was lost; the undelivered messages are sent on the next run",
            )
        raise Throttled(reply)

    def _finish(self, conn: _Conn, msg: _Msg, error: Exception | None) -> None:
        conn.inflight.remove(msg.job)
        self.drops.pop(msg.job, None)
        self._owe()
        self.feed.done(msg.job, error)
        conn.unflushed = True

    def _owe(self) -> None:
        if not self.owed:
            self.owed_since = time.monotonic()
        self.owed += 1

    # -- ending a connection -------------------------------------------------------------------

    def _hang_up(self, conn: _Conn) -> None:
        """Close without a word (mid-message, a QUIT would be read as content); what was on
        it and not answered goes again on the next connection, first."""
        if conn.slot.conn is conn:
            conn.slot.conn = None
            with _quiet:
                self.selector.unregister(conn.sock)
        conn.close()
        if conn.inflight:
            self.pacing.release(len(conn.inflight))
            self.retry.extendleft(reversed(conn.inflight))
            conn.inflight.clear()


def _commands(msg: _Msg, rset: bool, size: bool) -> list[bytes]:
    m = msg.job.message
    opts = f" SIZE={len(msg.content)}" if size else ""
    head = [b"RSET\r\n"] if rset else []
    return [
        *head,
        f"MAIL FROM:<{m.envelope_from}>{opts}\r\n".encode(),
        f"RCPT TO:<{m.recipient}>\r\n".encode(),
        b"DATA\r\n",
    ]


def _open_in_thread(connect: Callable[[], smtplib.SMTP], name: str) -> Future[smtplib.SMTP]:
    """``connect()`` in a thread of its own. A daemon thread, unlike a pool's: a stopped
    process does not wait at exit for a server that is slow to answer a connection it no
    longer needs (``_close_opened`` closes it if it ever opens)."""
    future: Future[smtplib.SMTP] = Future()

    def opening() -> None:
        try:
            future.set_result(connect())
        except BaseException as exc:  # the loop raises or reports it (DeliveryError)
            future.set_exception(exc)

    threading.Thread(target=opening, name=name, daemon=True).start()
    return future


def _close_opened(future: Future[smtplib.SMTP]) -> None:
    """A connection opened after the send ended: closed at once."""
    if future.exception() is None:
        future.result().close()
