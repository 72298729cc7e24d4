"""Shared pieces of the bench/ scripts: loopback SMTP servers in their own processes, output.

Nothing here is a benchmark by itself. ``python bench/_support.py aiosmtpd PORT`` is the
aiosmtpd server the scripts start in a child process, so that it does not share the client's
GIL: it answers ``count`` on stdin with a JSON line and stops when stdin closes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"  # virtual environments for peers (rss2email); never a project dependency
LOOPBACK = "127.0.0.1"


def line_buffered() -> None:
    """Figures appear as soon as they exist, also when piped: the scripts take minutes."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server process exited with {proc.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g} s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Ends one process that this script started, by its own handle."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


# -- aiosmtpd in a child process ---------------------------------------------------------------


class AiosmtpdProcess:
    """aiosmtpd accepting everything, counting messages and bytes, in its own interpreter."""

    name = "aiosmtpd"

    def __init__(self, line_limit: int = 0) -> None:
        # line_limit: raise aiosmtpd's 1001-byte line limit (RFC 5321), for peers that exceed it.
        self.line_limit = line_limit
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> AiosmtpdProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "aiosmtpd", str(self.port), str(self.line_limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            stop_process(self.proc)
            raise RuntimeError(f"aiosmtpd child did not start (said {ready!r})")
        return self

    def stats(self) -> dict[str, int]:
        """messages and bytes so far; last_max_line: the last message's longest line (with line_limit)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        data: dict[str, int] = json.loads(self.proc.stdout.readline())
        return data

    def counts(self) -> tuple[int, int]:
        """(messages, bytes) the server has accepted so far."""
        data = self.stats()
        return int(data["messages"]), int(data["bytes"])

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc)


def _serve_aiosmtpd(port: int, line_limit: int) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    if line_limit:
        SMTP.line_length_limit = line_limit

    class Counting:
        def __init__(self) -> None:
            self.messages = self.bytes = self.last_max_line = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages += 1
            self.bytes += len(envelope.content)
            if line_limit:  # only where long lines are let in; it costs a pass over the data
                self.last_max_line = max(map(len, envelope.content.split(b"\r\n")))
            return "250 OK"

    handler = Counting()
    # A benchmark must never be refused by its own server: room for any digest.
    controller = Controller(handler, hostname=LOOPBACK, port=port, data_size_limit=64 * 2**20)
    controller.start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                counts = {
                    "messages": handler.messages,
                    "bytes": handler.bytes,
                    "last_max_line": handler.last_max_line,
                }
                print(json.dumps(counts), flush=True)
    finally:
        controller.stop()


# -- Postfix's smtp-sink -----------------------------------------------------------------------


def find_smtp_sink() -> str | None:
    return shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink") if os.access(p, os.X_OK)),
        None,
    )


def _run(
    cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def ensure_smtp_sink(log: Any = print) -> tuple[str | None, str]:
    """(path of smtp-sink, how it got there) or (None, why it cannot be had).

    Installs Debian's ``postfix`` when smtp-sink is missing and we are root. The package is
    preseeded to "No configuration", so no mail service starts; should one run anyway, it is
    stopped and disabled, because only smtp-sink may listen here.
    """
    path = find_smtp_sink()
    if path:
        return path, "already installed"
    if not shutil.which("apt-get"):
        return None, "smtp-sink is missing and there is no apt-get to install postfix"
    if os.geteuid() != 0:
        return None, "smtp-sink is missing; installing Debian's postfix needs root (apt-get install postfix)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log("  smtp-sink missing: installing Debian's postfix (apt-get, No configuration) ...")
    try:
        if shutil.which("debconf-set-selections"):
            subprocess.run(
                ["debconf-set-selections"],
                input="postfix postfix/main_mailer_type select No configuration\n",
                text=True,
                capture_output=True,
                timeout=60,
                check=False,
            )
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
        done = _run(install, 600, env)
        if done.returncode != 0:
            _run(["apt-get", "update", "-q"], 600, env)
            done = _run(install, 600, env)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, "apt-get install postfix failed: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        return None, "apt-get install postfix timed out"
    stop_postfix_service()
    path = find_smtp_sink()
    if not path:
        return None, "postfix installed but smtp-sink not found"
    return path, "installed Debian's postfix just now (mail service stopped)"


def require_smtp_sink(label: str = "server") -> str:
    """smtp-sink's path, said as ``label: path (how)``; a bench that cannot run without it
    exits saying why."""
    path, how = ensure_smtp_sink()
    if path is None:
        sys.exit(f"CANNOT RUN: {how}")
    print(f"{label}: {path} ({how})")
    return path


def exit_on_problems(problems: list[str]) -> None:
    """A run that did not deliver what it should have lists why and exits non-zero."""
    if problems:
        print("\nproblems")
        for problem in problems:
            print(f"  {problem}")
        sys.exit(1)


def stop_postfix_service() -> None:
    """The postfix package's own mail service must not run: stop it, keep it from starting."""
    if shutil.which("postfix") and _run(["postfix", "status"], 30).returncode == 0:
        _run(["postfix", "stop"], 60)
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        _run(["systemctl", "disable", "--now", "postfix"], 60)
    elif shutil.which("update-rc.d") and Path("/etc/init.d/postfix").exists():
        _run(["update-rc.d", "postfix", "disable"], 60)


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1: a C server that accepts and discards mail, counting it."""

    name = "smtp-sink"

    def __init__(self, path: str) -> None:
        self.path = path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = bytearray()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> SmtpSink:
        # -c: a running count of delivered messages on stdout; -u nobody: it refuses to keep
        # root; backlog 1000. Nothing is written to disk.
        cmd = [self.path, "-c", "-u", "nobody", f"{LOOPBACK}:{self.port}", "1000"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        try:
            wait_for_port(self.port, proc=self.proc)
        except RuntimeError:
            stop_process(self.proc)
            raise RuntimeError(
                f"smtp-sink did not start: {bytes(self._out).decode(errors='replace')}"
            ) from None
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            self._out += chunk[-4096:]
            del self._out[:-8192]

    def counts(self) -> tuple[int, int]:
        """(messages, 0): smtp-sink counts messages only; read from its -c counter."""
        time.sleep(0.2)  # the counter is printed after the reply; let the last one arrive
        counters = re.findall(rb"mesg=(\d+)", bytes(self._out))  # "sess=1 quit=0 mesg=42\r"
        return (int(counters[-1]) if counters else 0), 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self._reader is not None:
                self._reader.join(5)


# -- output --------------------------------------------------------------------------------------


def show(label: str, value: str, width: int = 50) -> None:
    print(f"  {label:<{width}} {value}")


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} msg/s  ({seconds / count * 1e6:,.1f} µs/msg)"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- smtp-sink with a clock ----------------------------------------------------------------------


class TimedSmtpSink(SmtpSink):
    """SmtpSink that also notes when its counter moved: a run timed from the server's side.

    ``moves`` holds (perf_counter(), messages) each time the -c counter went up, so a caller can
    tell when a client's first message arrived and when its last did.
    """

    _COUNTER = re.compile(rb"mesg=(\d+)[\r\n]")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.moves: list[tuple[float, int]] = [(time.perf_counter(), 0)]
        self._lock = threading.Lock()

    def __enter__(self) -> TimedSmtpSink:
        super().__enter__()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        tail = b""
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            stamp = time.perf_counter()
            self._out += chunk[-4096:]
            del self._out[:-8192]
            text = tail + chunk
            found = self._COUNTER.findall(text)
            # A counter cut in two by the read is matched whole with the next chunk.
            tail = text[-64:]
            if found:
                count = int(found[-1])
                with self._lock:
                    if count > self.moves[-1][1]:
                        self.moves.append((stamp, count))

    def received(self) -> int:
        """Messages counted so far, without counts()'s pause."""
        with self._lock:
            return self.moves[-1][1]

    def wait_for(self, count: int, timeout: float = 5.0) -> int:
        """Waits until the counter reaches count (the counter is printed after the reply)."""
        deadline = time.monotonic() + timeout
        while self.received() < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received()

    def span(self, before: int, after: int) -> tuple[float, float] | None:
        """(when the counter first passed before, when it reached after), or None."""
        with self._lock:
            moves = list(self.moves)
        first = next((t for t, n in moves if n > before), None)
        last = next((t for t, n in moves if n >= after), None)
        return None if first is None or last is None else (first, last)


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "aiosmtpd":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it by closing stdin
        _serve_aiosmtpd(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else 0)
    else:
        sys.exit(f"usage: {sys.argv[0]} aiosmtpd PORT [LINE_LIMIT]")
