"""An issue's deliveries shared by every process that sends it, in leased batches.

Any number of processes (daemons on several hosts, a ``newsletter worker``, a hand-started
``send-digest``) deliver the same issue at once: each claims a batch of pending rows nobody
holds, sends them over its own connections, and marks each one only while its batch still
holds the row (the batch id is the fence). A batch's lease is renewed while its process
works; a process that dies stops renewing, and once the lease runs out (by the database's
clock) anyone reaps the batch and sends what is left of it. A holder on this host whose pid
is gone is reaped at once, so a rerun after a crash does not wait out the lease.

A process paused past its lease (SIGSTOP, a VM frozen) must not send what another has taken
over: before a message goes, its batch's lease is checked against this process's own
monotonic clock, which runs on while the process is stopped, with a margin. At most the
messages already on the wire go twice, as after a crash.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

from .errors import StoreError
from .model import Batch, Pending
from .storage import Storage

# Locally a lease is trusted for this share of its length from the moment before the claim
# (or the renewal) was sent: the rest is slack for the database's clock and the round trip.
TRUST = 0.75

_live: set[str] = set()  # this process's batches in use: same host and pid, not here: stale
_live_lock = threading.Lock()


def _host() -> str:
    """This host as batches name it: its hostname, and its PID namespace where there is one,
    since containers sharing a hostname (host networking) each have their own pid 1."""
    try:
        return f"{socket.gethostname()}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


HOST = _host()


def shown_host(host: str) -> str:
    """The host of a batch as people know it: its hostname."""
    return host.partition("#")[0]


def batch_id() -> str:
    return f"{shown_host(HOST)}:{os.getpid()}:{secrets.token_hex(6)}"


def holder_gone(batch: Batch) -> bool:
    """True when the batch's process is known to be gone: on this host only, where its pid
    can be looked at (another host's holder counts as there until its lease runs out)."""
    if batch.host != HOST:
        return False
    if batch.pid == os.getpid():
        with _live_lock:
            return batch.id not in _live  # ours, but its run ended without releasing it
    try:
        os.kill(batch.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap(store: Storage, issue_id: int | None = None) -> int:
    """Give back the rows of every batch whose lease ran out or whose holder is gone; how
    many rows."""
    freed = 0
    for batch in store.batches(issue_id):
        if batch.lease_left <= 0 or holder_gone(batch):
            freed += store.release_batch(batch.id)
    return freed


class Claims:
    """This run's batches of one issue: ``rows()`` claims them one after another as the
    delivery loop asks for more; ``usable``, ``batch_of`` and ``renew`` serve the loop;
    ``release`` hands back what is left when the run ends, whatever ended it."""

    def __init__(
        self,
        store: Storage,
        issue_id: int,
        list_name: str,
        *,
        size: int,
        lease: float,
        fresh_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.issue_id, self.list_name = store, issue_id, list_name
        self.size, self.lease, self.fresh_only, self.clock = size, lease, fresh_only, clock
        self.trusted: dict[str, float] = {}  # batch id -> until when (clock) it is ours
        self.lost: set[str] = set()  # batches whose lease ran out under us
        self.of: dict[str, str] = {}  # recipient -> batch id
        self.refused = 0  # outcomes not written: their batch was another's by then
        self.renewed = clock()
        self.host, self.pid = HOST, os.getpid()

    def rows(self) -> Iterator[Pending]:
        after = ""
        while True:
            reap(self.store, self.issue_id)
            batch, started = batch_id(), self.clock()
            with _live_lock:
                _live.add(batch)
            claimed = self.store.claim_batch(
                self.issue_id,
                batch,
                self.host,
                self.pid,
                size=self.size,
                lease=self.lease,
                after=after,
                fresh_only=self.fresh_only,
            )
            if not claimed:
                with _live_lock:
                    _live.discard(batch)
                return
            self.trusted[batch] = started + self.lease * TRUST
            rows = self.store.pending(self.issue_id, self.list_name, limit=claimed, batch=batch)
            for row in rows:
                self.of[row.recipient] = batch
            if not rows:
                return
            after = rows[-1].recipient
            yield from rows

    def batch_of(self, recipient: str) -> str | None:
        return self.of.get(recipient)

    def usable(self, recipient: str) -> bool:
        """May this row's message go now: its batch is still ours, by our own clock."""
        batch = self.of.get(recipient)
        if batch is None:
            return True
        return batch not in self.lost and self.clock() < self.trusted.get(batch, 0.0)

    def renew(self) -> None:
        """Extend every batch's lease, at most every third of it; a batch whose lease ran
        out is lost (its rows are skipped, its late outcomes refused)."""
        if self.clock() - self.renewed < self.lease / 3:
            return
        self.renewed = self.clock()
        for batch in [b for b in self.trusted if b not in self.lost]:
            started = self.clock()
            if self.store.renew_batch(batch, self.lease):
                self.trusted[batch] = started + self.lease * TRUST
            else:
                self.lost.add(batch)

    def release(self) -> None:
        """Hand back every row still pending in this run's batches (a failed release is
        reaped later: by lease, or at once on this host since the batch is no longer live)."""
        try:
            for batch in self.trusted:
                if batch not in self.lost:
                    self.store.release_batch(batch)
        except StoreError:
            pass
        finally:
            with _live_lock:
                _live.difference_update(self.trusted)
