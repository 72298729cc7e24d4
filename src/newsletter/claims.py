"""An issue's deliveries shared by every process that sends it, in leased batches.

Any number of processes (daemons on several hosts, a ``newsletter worker``, a hand-started
``send-digest``) deliver the same issue at once: each claims a batch of pending rows nobody
holds, sends them over its own connections, and marks each one only while its batch still
holds the row (the batch id is the fence). A batch's lease is renewed while its process
works; a process that dies stops renewing, and once the lease runs out (by the database's
clock) any other process reaps the batch and sends what is left of it. Its own process never
does while it still uses the batch: a lease that ran out under it means it was held up, and
what it has on the wire would go twice. A holder on this host whose pid is gone is reaped at
once, so a rerun after a crash does not wait out the lease.

A process paused past its lease (SIGSTOP, a frozen container) must not send what another has
taken over: before a message goes, its batch's lease is checked against this process's own
clock (CLOCK_BOOTTIME, which runs on while the process is stopped and while the machine
sleeps), with a margin. At most the messages already on the wire go twice, as after a crash.

A batch whose rows all have an outcome is given back at once (between two transactions),
so a run holds, renews, and the reapers look at, only the batches it is still sending. A
reader a server deferred is pending again then, tried by a later retry run, never by a join.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator

from .errors import StoreError
from .locks import HOST, pid_gone, shown_host
from .model import Batch, Pending
from .storage import Storage

# Locally a lease is trusted for this share of its length from the moment before the claim
# (or the renewal) was sent: the rest is slack for the database's clock and the round trip.
TRUST = 0.75

_live: set[str] = set()  # this process's batches in use: same host and pid, not here: stale
_live_lock = threading.Lock()


def _boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


clock: Callable[[], float] = _boot_clock if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic


def batch_id() -> str:
    return f"{shown_host(HOST)}:{os.getpid()}:{secrets.token_hex(6)}"


def _in_use_here(batch: Batch) -> bool:
    if batch.host != HOST or batch.pid != os.getpid():
        return False
    with _live_lock:
        return batch.id in _live


def holder_gone(batch: Batch) -> bool:
    """True when the batch's process is known to be gone: on this host only, where its pid
    can be looked at (another host's holder counts as there until its lease runs out)."""
    if batch.host == HOST and batch.pid == os.getpid():
        with _live_lock:
            return batch.id not in _live  # ours, but its run ended without releasing it
    return pid_gone(batch.host, batch.pid)


def reap(store: Storage, issue_id: int) -> int:
    """Take the batches whose lease ran out or whose holder is gone, and free their rows
    still pending (and any left behind by an earlier reap); how many rows."""
    freed = 0
    for batch in store.batches(issue_id):
        if _in_use_here(batch):
            # Ours, and a run of ours still has it: if its lease ran out, we were held up (a
            # slow commit, a stall), not gone. Taking it back would send again what our
            # connections have on the wire; our renewal keeps it unless another took it.
            continue
        if batch.lease_left <= 0:
            freed += store.reap_batch(batch.id)  # unless a renewal came in meanwhile
        elif holder_gone(batch):
            freed += store.reap_batch(batch.id, expired_only=False)
    return freed + store.free_orphans(issue_id)  # none on SQLite: nothing is skipped there


class _Held:
    """One batch of this run: until when it is trusted, and what is left of it."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.open = 0  # rows handed to the delivery loop, outcome not in yet
        self.sent = 0
        self.yielded = False  # every row of it has been handed out


class Claims:
    """This run's batches of one issue: ``rows()`` claims them one after another as the
    delivery loop asks for more; ``usable``, ``batch_of``, ``answered`` and ``renew`` serve
    the loop; ``release`` hands back what is left when the run ends, whatever ended it."""

    def __init__(
        self,
        store: Storage,
        issue_id: int,
        list_name: str,
        *,
        size: int,
        lease: float,
        fresh_only: bool = False,
        clock: Callable[[], float] = clock,
    ) -> None:
        self.store, self.issue_id, self.list_name = store, issue_id, list_name
        self.size, self.lease, self.fresh_only, self.clock = size, lease, fresh_only, clock
        self.held: dict[str, _Held] = {}  # batch id -> its state, while this run holds it
        self.lost: set[str] = set()  # batches whose lease ran out under us
        self.finished: set[str] = set()  # every row answered: to give back at the next tick
        self.of: dict[str, str] = {}  # recipient -> batch id, until its outcome is in
        self.refused = 0  # outcomes not written: their batch was another's by then
        self.renewed = clock()
        self.pid = os.getpid()

    def rows(self) -> Iterator[Pending]:
        after = ""
        while True:
            reap(self.store, self.issue_id)
            batch, started = batch_id(), self.clock()
            with _live_lock:
                _live.add(batch)
            try:
                claimed = self.store.claim_batch(
                    self.issue_id,
                    batch,
                    HOST,
                    self.pid,
                    size=self.size,
                    lease=self.lease,
                    after=after,
                    fresh_only=self.fresh_only,
                )
            except BaseException:
                # It may have committed all the same (a connection cut after the COMMIT): no
                # longer live, a batch of this pid is reaped at once by the next reap here.
                with _live_lock:
                    _live.discard(batch)
                raise
            if not claimed:
                with _live_lock:
                    _live.discard(batch)
                return
            held = self.held[batch] = _Held(started + self.lease * TRUST)
            rows = self.store.pending(self.issue_id, self.list_name, after, limit=claimed, batch=batch)
            for row in rows:
                self.of[row.recipient] = batch
            held.open = len(rows)
            if not rows:
                return
            after = rows[-1].recipient
            yield from rows
            held.yielded = True
            self._done_with(batch)

    def batch_of(self, recipient: str) -> str | None:
        return self.of.get(recipient)

    def usable(self, recipient: str) -> bool:
        """May this row's message go now: its batch is still ours, by our own clock."""
        batch = self.of.get(recipient)
        if batch is None:
            return False  # not a row of this run's batches
        held = self.held.get(batch)
        return held is not None and batch not in self.lost and self.clock() < held.until

    def answered(self, recipient: str, sent: bool = False) -> None:
        """The row's outcome is in."""
        batch = self.of.pop(recipient, None)
        held = self.held.get(batch) if batch is not None else None
        if batch is None or held is None:
            return
        held.open -= 1
        held.sent += sent
        self._done_with(batch)

    def _done_with(self, batch: str) -> None:
        # Nothing of it left to send: given up at the next tick (outside the transaction
        # the outcome is written in) rather than renewed.
        held = self.held[batch]
        if held.yielded and held.open <= 0 and batch not in self.lost:
            self.finished.add(batch)

    def tick(self) -> None:
        """Between two transactions: give back the batches done with, renew the others."""
        for batch in sorted(self.finished):
            self.store.release_batch(batch)
            self.finished.discard(batch)
            del self.held[batch]
            with _live_lock:
                _live.discard(batch)
        self.renew()

    def renew(self) -> None:
        """Extend every held batch's lease, at most every third of it (called outside any
        transaction, so a renewal is seen at once). A lease that ran out is renewed too, if
        nobody has taken the batch up meanwhile; a batch another has taken is lost: its rows
        are skipped, its late outcomes refused."""
        if self.clock() - self.renewed < self.lease / 3:
            return
        self.renewed = self.clock()
        for batch, held in list(self.held.items()):
            if batch in self.lost or batch in self.finished:
                continue
            started = self.clock()
            if self.store.renew_batch(batch, self.lease, held.sent):
                held.until = started + self.lease * TRUST
            else:
                self.lost.add(batch)

    def release(self) -> None:
        """Hand back every row still pending in this run's batches (a failed release is
        reaped later: by lease, or at once on this host since the batch is no longer live)."""
        try:
            for batch in self.held:
                if batch not in self.lost:
                    self.store.release_batch(batch)
        except StoreError:
            pass
        finally:
            with _live_lock:
                _live.difference_update(self.held)
