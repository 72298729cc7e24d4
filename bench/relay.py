"""A TCP relay on 127.0.0.1 that puts a network distance between a client and a local server.

    python bench/relay.py LISTEN_PORT TARGET_PORT RTT_MS

This kernel has no sch_netem, so distance is made in user space: for each accepted connection
the relay opens one to 127.0.0.1:TARGET_PORT and forwards every chunk it reads RTT/2 later, in
each direction, in order. Reads are large (256 KB) and the queue is one per direction, so the
relay adds delay, not a bandwidth limit; ``bench_latency.py`` measures its ceiling to show that.

It prints ``ready PORT`` once listening (LISTEN_PORT 0 takes a free port) and runs until
SIGTERM, SIGINT or its stdin closes. Importable: ``serve(listen_port, target_port, rtt_ms)`` in an
asyncio loop, or ``RelayProcess(target_port, rtt_ms)`` to run it in a child process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
READ_SIZE = 256 * 1024
# A slow reader on one side stops reads on the other, as TCP's own window would: the relay's
# queue then holds at most what arrived within one one-way delay, not a whole run.
HIGH_WATER = 8 * 2**20


class _Pipe:
    """One direction: chunks read from one socket, written to the other when their time comes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.out: asyncio.Transport | None = None
        self.timer: asyncio.Handle | None = None

    def push(self, data: bytes | None) -> None:
        """data None: the reading side closed; the writing side is closed at the same delay."""
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None and self.out is not None:
            self._arm()

    def attach(self, out: asyncio.Transport) -> None:
        self.out = out
        if self.queue and self.timer is None:
            self._arm()

    def _arm(self) -> None:
        due = self.queue[0][0]
        if due <= self.loop.time():
            self.timer = self.loop.call_soon(self._flush)
        else:
            self.timer = self.loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self.timer = None
        out = self.out
        assert out is not None
        now = self.loop.time()
        ready: list[bytes] = []
        closing = False
        while self.queue and self.queue[0][0] <= now:
            data = self.queue.popleft()[1]
            if data is None:
                closing = True
                break
            ready.append(data)
        if ready and not out.is_closing():
            out.write(b"".join(ready) if len(ready) > 1 else ready[0])
        if closing:
            self.queue.clear()
            if not out.is_closing():
                out.close()  # close() flushes what is buffered first
            return
        if self.queue:
            self._arm()


class _Side(asyncio.Protocol):
    """One socket of a relayed pair: what it reads goes into its pipe, towards the other socket."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe  # the direction this side reads into
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.pipe.push(data)

    def eof_received(self) -> bool:
        self.pipe.push(None)
        return True  # keep the transport open until the pipe closes it at the delayed time

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.push(None)

    # Flow control: our transport's write buffer is full, so the peer stops reading.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class _ClientSide(_Side):
    """The accepted connection: opens the one to the real server, holding reads until it is up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int, delay: float) -> None:
        super().__init__(_Pipe(loop, delay))
        self.loop = loop
        self.target_port = target_port
        self.delay = delay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.loop.create_task(self._open())

    async def _open(self) -> None:
        assert self.transport is not None
        back = _Pipe(self.loop, self.delay)
        try:
            server_transport, server_side = await self.loop.create_connection(
                lambda: _Side(back), LOOPBACK, self.target_port
            )
        except OSError:
            self.transport.close()
            return
        back.attach(self.transport)
        self.pipe.attach(server_transport)
        self.peer, server_side.peer = server_side, self
        if not self.transport.is_closing():
            self.transport.resume_reading()


async def serve(listen_port: int, target_port: int, rtt_ms: float, ready: Any = None) -> None:
    """Relays until cancelled. ready(port) is called once listening."""
    loop = asyncio.get_running_loop()
    delay = rtt_ms / 2000.0
    server = await loop.create_server(
        lambda: _ClientSide(loop, target_port, delay), LOOPBACK, listen_port, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(port)
    async with server:
        await server.serve_forever()


class RelayProcess:
    """The relay in a child process, so that it does not share the client's GIL."""

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        self.target_port, self.rtt_ms = target_port, rtt_ms
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> RelayProcess:
        cmd = [sys.executable, str(Path(__file__).resolve()), "0", str(self.target_port), f"{self.rtt_ms:g}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline().split()
        if len(said) != 2 or said[0] != "ready":
            self.__exit__()
            raise RuntimeError(f"the relay did not start (said {' '.join(said)!r})")
        self.port = int(said[1])
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        finally:
            if proc.stdin is not None:
                proc.stdin.close()


def _main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit(f"usage: {argv[0]} LISTEN_PORT TARGET_PORT RTT_MS")
    listen_port, target_port, rtt_ms = int(argv[1]), int(argv[2]), float(argv[3])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        # The parent may die without a signal: its end of our stdin closing stops us too.
        if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
            loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or task.cancel())
        await serve(listen_port, target_port, rtt_ms, lambda port: print(f"ready {port}", flush=True))

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(run())


if __name__ == "__main__":
    _main(sys.argv)
