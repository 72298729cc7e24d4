"""One run of a schedule at a time, across processes: a lock row in the store, kept fresh.

Whether a holder is still there is decided here, not in the store: a lock row names its
owner as host:pid:nonce, and a holder on this host whose pid is gone has died.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import BusyError, StoreError
from .storage import Storage

# Opens a new connection to the same store with the busy timeout given (seconds): the lock
# learns the backend from its caller, so any store that implements Storage can hold locks.
Opener = Callable[[float], Storage]


def _host() -> str:
    """This host as lock and batch holders name it: where a pid can be looked up. The
    hostname alone is not that: two VMs may share one, and containers sharing one (host
    networking) each have their own pid 1. So the boot id and the PID namespace go with it."""
    name = socket.gethostname().replace(":", "_")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{name}#{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


HOST = _host()


def shown_host(host: str) -> str:
    """A holder's host as people know it: its hostname."""
    return host.partition("#")[0]


def pid_gone(host: str, pid: int) -> bool:
    """True only when a holder is known dead: on this host, and its pid is gone."""
    if host != HOST:
        return False  # another machine: only the expiry time can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lock_owner() -> str:
    """A name for this holder that no other process, here or elsewhere, will have."""
    return f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"


def alive(owner: str) -> bool:
    """False only when ``owner`` is known dead: its host is this one and its pid is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return not pid.isdigit() or not pid_gone(host, int(pid))


def acquire(store: Storage, name: str, owner: str, ttl: float) -> str | None:
    """Take the lock ``name``, or return who holds it. A holder that died (same host, pid
    gone) or stopped refreshing it (``ttl`` passed) no longer counts."""
    holder = store.acquire_lock(name, owner, ttl)
    if holder is not None and not alive(holder):
        # Taken over only if the dead one still holds it: a live process may have beaten us.
        holder = store.acquire_lock(name, owner, ttl, dead=holder)
    return holder


class ScheduleLock:
    """One run of a schedule at a time, across processes; refreshed while the run lasts."""

    TTL = 60.0

    def __init__(self, opener: Opener, store: Storage, name: str, wait: float, stop: threading.Event | None):
        self.opener, self.store, self.name = opener, store, f"schedule:{name}"
        self.schedule, self.wait, self.stop = name, wait, stop
        self.owner = lock_owner()
        self._done = threading.Event()

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.wait
        while (holder := acquire(self.store, self.name, self.owner, self.TTL)) is not None:
            if time.monotonic() >= deadline or (self.stop is not None and self.stop.is_set()):
                host, _, rest = holder.partition(":")
                raise BusyError(
                    f"schedule {self.schedule!r} is being built by another process"
                    f" (pid {rest.partition(':')[0]} on {shown_host(host)}); nothing done",
                    hint="it finishes the issue itself; run again later or pass --wait SECONDS",
                )
            time.sleep(0.5)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        # Its own connection (a SQLite connection belongs to the thread that made it), with a
        # short busy timeout: a refresh that cannot get through now is tried again later, and
        # if none does the lock simply expires, as it would had this process died.
        store: Storage | None = None
        try:
            while True:
                if store is None:
                    # A connection lost (the database restarted) is opened again next time.
                    with contextlib.suppress(StoreError):
                        store = self.opener(2)
                if self._done.wait(self.TTL / 3):
                    return
                if store is None:
                    continue
                try:
                    store.refresh_lock(self.name, self.owner, self.TTL)
                except StoreError:
                    store.close()
                    store = None
        finally:
            if store is not None:
                store.close()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        # Released on a short-fused connection: when the database is locked, the run is
        # already failing with that error, and the row expires (or its pid is seen gone).
        with contextlib.suppress(StoreError), self.opener(2) as store:
            store.release_lock(self.name, self.owner)
