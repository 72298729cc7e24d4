"""Reference SMTP clients for bench_latency.py: what a sender could reach, and plain smtplib.

    python bench/refclient.py --port PORT --message FILE [--messages 2000] [--connections 20]
                              [--seconds 40] [--client pipelined|smtplib] [--host 127.0.0.1]

``pipelined``: RFC 2920 pipelining at one round trip a message. After the 354 to DATA, one
write carries the content, the end-of-data "." and the next message's MAIL FROM, RCPT TO and
DATA; the replies are read in order. The message is encoded once (CRLF line ends, dot-stuffed),
so a message costs a write and a few reply lines. Connections run in threads and take the next
recipient from one shared counter, so a slow connection sends fewer messages, not later ones.

``smtplib``: ``smtplib.SMTP.sendmail`` of the same bytes on one connection, in lock-step (four
round trips a message: MAIL, RCPT, DATA, content), the baseline.

Every reply code is checked: a 4xx/5xx refusal of a message counts as a failure and the client
goes on with the next; a reply that fits no step of the conversation (a 354 where a 250 belongs,
a closed connection, a line that is no reply) aborts the run. A message counts as sent only after
the 250 that follows its end-of-data. ``--seconds``: no new message starts after that many
seconds, so slow configurations stop on time; the result says how many were sent.

Prints one JSON line: sent, failed, seconds (connect to QUIT), cpu_seconds (this process's user
+ system time over the same span, all threads), connections.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import smtplib
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter

ENVELOPE_FROM = "news@example.org"
LOCAL_HOSTNAME = "localhost"
TIMEOUT = 60.0


class ProtocolError(Exception):
    """A reply that does not fit the conversation: the run is aborted, its figures are worthless."""


@dataclass
class Result:
    client: str
    connections: int
    sent: int
    failed: int
    seconds: float
    cpu_seconds: float


def encode(message: bytes) -> bytes:
    """The DATA content on the wire: CRLF line ends, a final CRLF, leading dots doubled."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def recipient(n: int) -> str:
    return f"reader{n:06d}@example.com"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Replies:
    """SMTP replies read from a socket, in order, through one buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("the server closed the connection")
            self.buf += chunk

    def read(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = self._line().rstrip(b"\r\n")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def expect(self, code: int, step: str) -> list[bytes]:
        got, lines = self.read()
        if got != code:
            text = b" ".join(lines).decode(errors="replace")[:120]
            raise ProtocolError(f"{step}: expected {code}, got {got} {text}")
        return lines


def _ok(code: int, wanted: int, step: str) -> bool:
    """True for the wanted code, False for a refusal of this message (4xx/5xx); else abort."""
    if code == wanted:
        return True
    if 400 <= code < 600:
        return False
    raise ProtocolError(f"{step}: expected {wanted} or a refusal, got {code}")


def _envelope(rcpt: str) -> bytes:
    return f"MAIL FROM:<{ENVELOPE_FROM}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()


class _Counter:
    """The next recipient for any connection, until the count is reached or time is up."""

    def __init__(self, total: int, deadline: float) -> None:
        self.total, self.deadline = total, deadline
        self.next = 0
        self.lock = threading.Lock()
        self.sent = self.failed = 0

    def take(self) -> str | None:
        with self.lock:
            if self.next >= self.total or perf_counter() >= self.deadline:
                return None
            self.next += 1
            return recipient(self.next)

    def done(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.sent += 1
            else:
                self.failed += 1


def _pipelined_connection(host: str, port: int, content: bytes, counter: _Counter) -> None:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = _Replies(sock)
        replies.expect(220, "greeting")
        sock.sendall(f"EHLO {LOCAL_HOSTNAME}\r\n".encode())
        features = replies.expect(250, "EHLO")
        if not any(f.upper().split(b" ")[0] == b"PIPELINING" for f in features[1:]):
            raise ProtocolError("the server does not offer PIPELINING")
        end_of_data = content + b".\r\n"
        rcpt = counter.take()
        if rcpt is not None:
            sock.sendall(_envelope(rcpt))
        while rcpt is not None:
            # The replies to MAIL, RCPT and DATA of the message whose envelope went last.
            mail, _ = replies.read()
            to, _ = replies.read()
            data, _ = replies.read()
            # A list, not all() over a generator: every code is checked, even after a refusal.
            accepted = all([_ok(mail, 250, "MAIL"), _ok(to, 250, "RCPT"), _ok(data, 354, "DATA")])
            nxt = counter.take()
            following = _envelope(nxt) if nxt is not None else b""
            if accepted:
                sock.sendall(end_of_data + following)
                code, _ = replies.read()
                counter.done(_ok(code, 250, "end of data"))
            elif data == 354:
                # DATA accepted although MAIL or RCPT was not: end the empty transaction.
                sock.sendall(b".\r\nRSET\r\n" + following)
                replies.read()
                replies.expect(250, "RSET")
                counter.done(False)
            else:
                sock.sendall(b"RSET\r\n" + following)
                replies.expect(250, "RSET")
                counter.done(False)
            rcpt = nxt
        sock.sendall(b"QUIT\r\n")
        replies.expect(221, "QUIT")


def send_pipelined(
    host: str, port: int, message: bytes, messages: int, connections: int, seconds: float = 0.0
) -> Result:
    """messages copies of message over connections pipelined connections; seconds > 0 stops early."""
    content = encode(message)  # once, outside the timing: the point of pre-encoded bytes
    cpu0, start = _cpu(), perf_counter()
    counter = _Counter(messages, start + seconds if seconds > 0 else float("inf"))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _pipelined_connection(host, port, content, counter)
        except BaseException as exc:
            errors.append(exc)
            counter.deadline = 0.0  # the others stop after their message in flight

    threads = [threading.Thread(target=run, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = perf_counter() - start, _cpu() - cpu0
    if errors:
        raise ProtocolError(f"{len(errors)} connection(s) aborted: {errors[0]}") from errors[0]
    return Result("pipelined", connections, counter.sent, counter.failed, elapsed, cpu)


def send_smtplib(host: str, port: int, message: bytes, messages: int, seconds: float = 0.0) -> Result:
    """smtplib.sendmail of message, lock-step on one connection."""
    sent = failed = 0
    cpu0, start = _cpu(), perf_counter()
    deadline = start + seconds if seconds > 0 else float("inf")
    with smtplib.SMTP(host, port, local_hostname=LOCAL_HOSTNAME, timeout=TIMEOUT) as conn:
        for n in range(1, messages + 1):
            if perf_counter() >= deadline:
                break
            try:
                refused = conn.sendmail(ENVELOPE_FROM, [recipient(n)], message)
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError):
                failed += 1
                conn.rset()
                continue
            if refused:
                failed += 1
            else:
                sent += 1
    return Result("smtplib", 1, sent, failed, perf_counter() - start, _cpu() - cpu0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", type=Path, required=True, help="a message file (.eml)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20, help="pipelined only; smtplib uses 1")
    parser.add_argument("--seconds", type=float, default=0.0, help="start no message after this; 0: none")
    parser.add_argument("--client", choices=["pipelined", "smtplib"], default="pipelined")
    args = parser.parse_args(argv)
    message = args.message.read_bytes()
    try:
        if args.client == "pipelined":
            result = send_pipelined(
                args.host, args.port, message, args.messages, args.connections, args.seconds
            )
        else:
            result = send_smtplib(args.host, args.port, message, args.messages, args.seconds)
    except (ProtocolError, OSError, smtplib.SMTPException) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(1)
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
