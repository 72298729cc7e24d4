"""A scriptable SMTP server on 127.0.0.1 that notes what it was told, when, and in what order.

It answers as a ``Script`` says (refuse some recipients, throttle, close with 421, cut a
connection mid-DATA, go away after some messages, take its time over each message) and keeps,
for every connection, the commands in the order they came, each with whether it had already
arrived before the server answered what came before it: the proof that a client pipelines,
or that it does not.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

THROTTLING = "454 4.7.0 Throttling failure: Maximum sending rate exceeded"
CLOSING = "421 4.7.0 Too many messages on this connection, closing"


@dataclass
class Script:
    """How the server answers. Counts of MAILs and messages run over all connections."""

    pipelining: bool = True  # advertise PIPELINING in the EHLO reply
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> its RCPT reply
    # The reply to a DATA none of whose recipients was taken: a refusal, or a 354 after which
    # the client owes an empty message (RFC 2920), answered with 554 and delivered to nobody.
    data_without_recipients: str = "554 5.5.1 No valid recipients"
    throttle_first: int = 0  # the first N MAIL FROMs get ``throttle_reply``
    throttle_reply: str = THROTTLING
    # (j, k): the k-th MAIL FROM (1-based) on connection j (0-based) gets ``close_reply``, and
    # the server closes that connection; once.
    close_at: tuple[int, int] | None = None
    close_reply: str = CLOSING
    drop_on_connection: int | None = None  # connection j (0-based) is cut mid-DATA, once
    down_after: int | None = None  # after N messages the server goes away, mid-DATA of the next
    accept_delay: float = 0.0  # seconds each message takes before its 250
    # Only the first N connections are served: every later one is refused at its greeting with
    # 421, ``refuse_delay`` seconds in, as under Postfix's smtpd_client_connection_rate_limit.
    connection_limit: int | None = None
    refuse_delay: float = 0.0
    # A connection that says nothing for this long between messages is told "421 timeout
    # exceeded" and closed, as Postfix's smtpd does after smtpd_timeout.
    idle_timeout: float | None = None
    # How long to look for bytes the client may have sent ahead, before each reply; after an
    # end of data, ``dot_linger`` (a pipelining client writes the next envelope behind the dot).
    linger: float = 0.002
    dot_linger: float = 0.002


@dataclass
class Command:
    verb: str  # MAIL, RCPT, DATA, RSET, QUIT, EHLO ...; "." for the end of a message's data
    line: bytes
    early: bool  # it was here before the server answered the command (or data) before it
    at: float  # time.monotonic() when it was read


@dataclass
class Connection:
    index: int
    commands: list[Command] = field(default_factory=list)
    replies: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), line)
    accepted: list[str] = field(default_factory=list)  # the recipient of each message taken
    mails: int = 0  # MAIL FROMs seen on this connection
    dropped: bool = False  # this server cut it mid-DATA
    refused: bool = False  # turned away at the greeting (``connection_limit``)
    timed_out: bool = False  # closed for saying nothing (``idle_timeout``)

    def verbs(self) -> list[str]:
        return [c.verb for c in self.commands]


class _Gone(Exception):
    """The client closed the connection."""


class _Wire:
    """The connection's incoming bytes, with a look at whether more are already here."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()

    async def _more(self) -> None:
        data = await self.reader.read(1 << 16)
        if not data:
            raise _Gone
        self.buf += data

    async def readline(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            await self._more()
        line = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        return line

    async def ahead(self, linger: float) -> bool:
        """Has the client sent more before our answer? Waits up to ``linger`` for it."""
        if self.buf:
            return True
        try:
            await asyncio.wait_for(self._more(), linger)
        except TimeoutError:
            return False
        except _Gone:
            return False
        return True


class ScriptedSmtp:
    """The server, in a thread of its own; ``close()`` stops it."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.connections: list[Connection] = []
        self.mails = 0  # MAIL FROMs seen, over all connections
        self.messages: list[tuple[int, str, bytes]] = []  # (connection, recipient, content)
        self.empty_data: list[bytes] = []  # what came after a 354 with no valid recipient
        self.throttled: list[float] = []  # when each throttling reply went out
        self.first_accepted_mail: float | None = None  # when the first MAIL that got 250 came
        self.down = False
        self._dropped = False
        self.closed_at: Command | None = None  # the MAIL FROM that ``close_at`` answered
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(5), "the scripted SMTP server did not start"

    # -- what it saw ---------------------------------------------------------------------

    def by_recipient(self) -> Counter[str]:
        return Counter(r.lower() for _, r, _ in self.messages)

    def carried(self) -> list[Connection]:
        """The connections that delivered at least one message."""
        return [c for c in self.connections if c.accepted]

    # -- running ---------------------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _go_down(self) -> None:
        """Stop listening and cut every connection: the server is gone."""
        self.down = True
        self._server.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(len(self.connections))
        self.connections.append(conn)
        try:
            limit = self.script.connection_limit
            if limit is not None and conn.index >= limit:
                conn.refused = True
                await asyncio.sleep(self.script.refuse_delay)
                writer.write(b"421 4.7.0 scripted.test Error: too many connections from 127.0.0.1\r\n")
                await writer.drain()
                return
            if not self.down:
                await self._converse(conn, _Wire(reader), writer)
        except (_Gone, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _converse(self, conn: Connection, wire: _Wire, writer: asyncio.StreamWriter) -> None:
        script = self.script
        early = False  # did the next line arrive before our last answer?

        async def say(reply: str, linger: float = script.linger) -> None:
            nonlocal early
            early = await wire.ahead(linger)
            conn.replies.append((time.monotonic(), reply.split("\r\n")[-1]))
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()

        def note(verb: str, line: bytes) -> None:
            conn.commands.append(Command(verb, line, early, time.monotonic()))

        conn.replies.append((time.monotonic(), "220 scripted.test ESMTP"))
        writer.write(b"220 scripted.test ESMTP\r\n")
        await writer.drain()
        mail = False
        rcpts: list[str] = []
        while True:
            if script.idle_timeout is not None and not mail:
                try:
                    line = await asyncio.wait_for(wire.readline(), script.idle_timeout)
                except TimeoutError:
                    conn.timed_out = True
                    await say("421 4.4.2 scripted.test Error: timeout exceeded", linger=0)
                    return
            else:
                line = await wire.readline()
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            note(verb, line)
            address = m.group(1).decode() if (m := re.search(rb"<([^>]*)>", line)) else ""
            if self.down:
                return
            if verb == "EHLO":
                offers = ["scripted.test", "8BITMIME", "SIZE 52428800"]
                if script.pipelining:
                    offers.append("PIPELINING")
                await say("\r\n".join(f"250-{o}" for o in offers[:-1]) + f"\r\n250 {offers[-1]}")
            elif verb == "HELO":
                await say("250 scripted.test")
            elif verb == "MAIL":
                self.mails += 1
                conn.mails += 1
                mail, rcpts = False, []
                if self.mails <= script.throttle_first:
                    await say(script.throttle_reply)
                    self.throttled.append(time.monotonic())
                    if script.throttle_reply.startswith("421"):
                        return  # 421: the server closes the connection (RFC 5321)
                elif script.close_at == (conn.index, conn.mails) and self.closed_at is None:
                    self.closed_at = conn.commands[-1]
                    await say(script.close_reply)
                    return
                else:
                    mail = True
                    if self.first_accepted_mail is None:
                        self.first_accepted_mail = time.monotonic()
                    await say("250 2.1.0 OK")
            elif verb == "RCPT":
                refusal = script.refuse.get(address.lower())
                if not mail:
                    await say("503 5.5.1 Error: need MAIL command")
                elif refusal:
                    await say(refusal)
                else:
                    rcpts.append(address)
                    await say("250 2.1.5 OK")
            elif verb == "DATA":
                if not mail:
                    await say("503 5.5.1 Error: need MAIL command")
                elif not rcpts and not script.data_without_recipients.startswith("354"):
                    await say(script.data_without_recipients)
                elif not rcpts:
                    # RFC 2920: the client must now send an empty message; nobody gets it.
                    await say(script.data_without_recipients)
                    self.empty_data.append(await self._read_data(wire))
                    note(".", b".\r\n")
                    await say("554 5.5.1 No valid recipients")
                    mail = False
                else:
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    if script.drop_on_connection == conn.index and not self._dropped:
                        self._dropped = conn.dropped = True
                        await wire.readline()  # a little of the message, then the line goes dead
                        return
                    if script.down_after is not None and len(self.messages) >= script.down_after:
                        await wire.readline()
                        self._go_down()
                        return
                    data = await self._read_data(wire)
                    note(".", b".\r\n")
                    for rcpt in rcpts:  # taken from here on: a reply lost now makes a duplicate
                        self.messages.append((conn.index, rcpt, data))
                        conn.accepted.append(rcpt)
                    if script.accept_delay:
                        await asyncio.sleep(script.accept_delay)
                    await say("250 2.0.0 Message accepted", script.dot_linger)
                    mail, rcpts = False, []
            elif verb == "RSET":
                mail, rcpts = False, []
                await say("250 2.0.0 OK")
            elif verb == "NOOP":
                await say("250 2.0.0 OK")
            elif verb == "QUIT":
                await say("221 2.0.0 Bye", 0)
                return
            else:
                await say("502 5.5.2 Command not recognized")

    @staticmethod
    async def _read_data(wire: _Wire) -> bytes:
        lines = []
        while (line := await wire.readline()) != b".\r\n":
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)
