"""The one loop over the ledger that email deliveries and webhook posts both go through.

The caller says how to get each pending item ready (``prepare``) and how to write an outcome
into its ledger (``record``); what a sender's exception means for the item and for the rest
of the run is decided here, once:

- ``TemporaryFailure``: pending again, or failed once the item has had ``max_attempts``;
  ``TargetUnavailable`` also ends the run (the next items would wait the same way).
- ``PermanentFailure``: failed. ``TargetGone`` (410): pending, and the run ends; the caller
  disables the target.
- ``DeliveryError``: the sender cannot go on; this item and the rest stay pending.

A sender with lanes (the SMTP sender's connections) gets the messages through a ``Feed``: this
thread prepares them and writes every outcome, the lanes' threads talk to the server. Outcomes
that arrive together are written in one transaction, and a lane sends its next end of data
only once its last outcome is on disk, so grouping the writes does not loosen the bound: a
process killed at any moment resends at most one message per connection.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import DeliveryError, PermanentFailure, TargetGone, TargetUnavailable, TemporaryFailure
from .redact import redact
from .senders import Job, Outgoing, Sender

T = TypeVar("T")


class Outcome(enum.StrEnum):
    """What an attempt did to the item; the same words as both ledgers' statuses."""

    SENT = "sent"
    PENDING = "pending"
    FAILED = "failed"


class Unsendable(Exception):
    """Raised by ``prepare``: this item can never go out (a header value it cannot carry, a
    link over the service's limit). Failed for good, without a sender seeing it."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label


@dataclass
class Attempt:
    """One pending item, ready to go."""

    send: Callable[[], str | None]  # returns where it landed, if the sender says
    attempts: int  # how many times it was tried before
    label: str  # how errors name it: the recipient, or the post's title
    message: Outgoing | None = None  # for a sender with lanes: what ``send`` would send
    valid: Callable[[], bool] | None = None  # False: it must not go after all (``Job.valid``)


@dataclass
class Run:
    """What one pass of the loop did."""

    sent: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    aborted: str = ""  # DeliveryError: why the sender could not go on
    gone: str = ""  # TargetGone: the target's answer
    unavailable: str = ""  # TargetUnavailable: why the rest waits for a later run
    paused: str = ""  # a quota or a send window: why the rest waits, and until when


def deliver(
    items: Iterable[T],
    prepare: Callable[[T], Attempt | None],
    record: Callable[[T, Outcome, str, str], None],
    *,
    max_attempts: int,
    stop: threading.Event | None = None,
    said: Callable[[str], str] = redact,
    progress: Callable[[int], None] | None = None,
    hold: Callable[[], str] | None = None,
) -> Run:
    """Try every item in turn, recording each outcome the moment it is known.

    ``prepare`` returns None for an item it dealt with itself (skipped), or raises
    ``Unsendable`` for one that can never go out. ``record(item, outcome, error, where)``
    writes the ledger. ``said`` turns every error into the text that is recorded and reported;
    by default it is redacted, since a server's reply or a target's URL may quote a password or
    a token. ``stop`` ends the loop between
    two items, and so does a reason ``hold`` returns (a send window closing: ``Run.paused``);
    ``progress`` is told of every answered item.
    """
    run = Run()
    for item in items:
        if stop is not None and stop.is_set():
            break
        if hold is not None and (paused := hold()):
            run.paused = paused
            break
        try:
            attempt = prepare(item)
        except Unsendable as exc:
            # Our own words about our own message, not a server's: nothing in it to blank.
            record(item, Outcome.FAILED, str(exc), "")
            run.errors.append((exc.label, str(exc)))
            continue
        if attempt is None:
            continue
        try:
            where = attempt.send() or ""
        except Exception as exc:
            if not _judge(run, item, attempt, exc, record, max_attempts, said):
                raise
        else:
            record(item, Outcome.SENT, "", where)
            run.sent += 1
        if run.aborted or run.gone or run.unavailable:
            break
        if progress:
            progress(1)
    return run


def _judge(
    run: Run,
    item: T,
    attempt: Attempt,
    exc: Exception,
    record: Callable[[T, Outcome, str, str], None],
    max_attempts: int,
    said: Callable[[str], str],
) -> bool:
    """Record what a sender's exception means; False for one that is not a sender's verdict."""
    if isinstance(exc, DeliveryError):
        run.aborted = said(exc.with_hint())
    elif isinstance(exc, TargetGone):
        record(item, Outcome.PENDING, said(str(exc)), "")
        run.gone = said(str(exc))
    elif isinstance(exc, TemporaryFailure):
        give_up = attempt.attempts + 1 >= max_attempts
        record(item, Outcome.FAILED if give_up else Outcome.PENDING, said(str(exc)), "")
        run.errors.append((attempt.label, said(str(exc))))
        if isinstance(exc, TargetUnavailable):
            run.unavailable = said(str(exc))
    elif isinstance(exc, PermanentFailure):
        record(item, Outcome.FAILED, said(str(exc)), "")
        run.errors.append((attempt.label, said(str(exc))))
    else:
        return False
    return True


# After the first outcome, how long to wait for others before writing them together: a commit
# per outcome costs more CPU than its message, and every lane that answered waits for the
# commit before its next end of data (at a distance that wait is on each message's round trip).
GATHER = 0.002


@dataclass(eq=False)
class _Ref(Generic[T]):
    item: T
    attempt: Attempt
    on_disk: threading.Event = field(default_factory=threading.Event)


class _Feed:
    """The queue between this thread and the lanes (see ``senders.Feed``)."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.cv = threading.Condition()
        self.work: deque[Job] = deque()
        self.closed = False  # nothing more will come; the lanes finish what is queued
        self.broken = False  # the loop itself failed: no lane may send another end of data
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.run_stop = stop or threading.Event()  # the caller's: SIGTERM
        self.stop = threading.Event()  # the lanes': the run's stop, or this send's halt
        self.out: set[_Ref[Any]] = set()  # handed out, outcome not on disk yet
        self.handed = self.answered = 0  # all run long: what went out, what came back answered
        self.held = 0  # taken by a lane, neither answered nor given back

    def put(self, jobs: Iterable[Job]) -> None:
        with self.cv:
            self.work.extend(jobs)
            self.cv.notify_all()

    def finish(self, drop: bool = False) -> None:
        """Nothing more comes; with ``drop``, what nobody has taken yet stays pending."""
        with self.cv:
            self.closed = True
            for job in self.work if drop else ():
                self.out.discard(job.ref)  # type: ignore[arg-type]
            if drop:
                self.work.clear()
                self.stop.set()  # a lane waiting for its turn gives it up
            self.cv.notify_all()

    def take(self, wait: bool) -> Job | None:
        with self.cv:
            while True:
                while not self.work:
                    # Closed, but another lane still holds messages: it may give them back.
                    if not wait or self.stop.is_set() or (self.closed and not self.held):
                        return None
                    self.cv.wait()
                job = self.work.popleft()
                if job.valid is None or job.valid():
                    self.held += 1
                    return job
                self.events.put(("back", [job]))  # no longer ours to send: it stays pending

    def done(self, job: Job, error: Exception | None) -> None:
        with self.cv:
            self.held -= 1
            self.cv.notify_all()
        self.events.put(("done", (job, error)))

    def recorded(self, job: Job) -> None:
        ref = job.ref
        assert isinstance(ref, _Ref)
        ref.on_disk.wait()
        if self.broken:
            raise DeliveryError("the delivery loop stopped before this outcome was written")

    def give_back(self, jobs: list[Job]) -> None:
        with self.cv:
            self.held -= len(jobs)
            if self.stop.is_set():
                self.events.put(("back", jobs))  # halted: they stay pending
            else:
                self.work.extendleft(reversed(jobs))  # the other lanes send them first
            self.cv.notify_all()

    def gather(self, lanes: int) -> list[tuple[str, Any]]:
        """Whatever the lanes said, all that came together; none for a while: [], so the loop
        can look at the run's stop. It waits for more only while more lanes could answer:
        with one connection, never."""
        try:
            events = [self.events.get(timeout=0.5)]
        except queue.Empty:
            return []
        until = time.monotonic() + GATHER
        with contextlib.suppress(queue.Empty):
            while len(events) < 500:
                wait = until - time.monotonic() if len(events) < lanes else 0.0
                events.append(self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait())
        return events

    def fail(self) -> None:
        """Release every lane waiting for a record that will not come; none sends again."""
        self.broken = True
        self.finish(drop=True)
        for ref in list(self.out):
            ref.on_disk.set()


def deliver_lanes(
    items: Iterable[T],
    prepare: Callable[[T], Attempt | None],
    record: Callable[[T, Outcome, str, str], None],
    sender: Sender,
    *,
    max_attempts: int,
    stop: threading.Event | None = None,
    said: Callable[[str], str] = redact,
    progress: Callable[[int], None] | None = None,
    hold: Callable[[], str] | None = None,
    batch: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    tick: Callable[[], None] | None = None,
) -> Run:
    """``deliver`` for a sender with lanes: its ``lane`` runs in that many threads, all fed
    from here. ``batch`` opens the transaction that outcomes arriving together share; ``hold``
    returns why sending must pause (a send window closing), checked before each message;
    ``tick`` is called at least twice a second, outside any transaction, however slow the
    lanes are."""
    run = Run()
    feed = _Feed(stop)
    threads = [
        threading.Thread(target=_lane, args=(sender, i, feed), name=f"{sender.name}-{i}", daemon=True)
        for i in range(sender.lanes())
    ]
    for thread in threads:
        thread.start()
    alive = len(threads)
    todo: Iterator[T] = iter(items)
    exhausted = False
    failure: BaseException | None = None  # not a sender's verdict: raised once the lanes stop
    last_error: DeliveryError | None = None

    def refill() -> None:
        nonlocal exhausted
        if not feed.closed:
            # Each lane holds up to two (one answering, one whose envelope is out): one more
            # each waits in the queue, so a lane finds one to pipeline behind its end of data.
            exhausted = _fill(feed, todo, prepare, record, run, 3 * alive, alive, stop, hold)
            if exhausted or run.paused or feed.run_stop.is_set():
                feed.finish(drop=not exhausted)

    try:
        while alive:
            refill()
            if feed.run_stop.is_set() and not feed.stop.is_set():
                feed.finish(drop=True)
            answered: list[_Ref[T]] = []
            # Wait for the lanes outside the transaction: other processes write too.
            events = feed.gather(alive)
            if tick is not None:
                tick()
            with batch() if events else contextlib.nullcontext():
                for kind, value in events:
                    if kind == "done":
                        job, error = value
                        ref = job.ref
                        if error is None:
                            record(ref.item, Outcome.SENT, "", "")
                            run.sent += 1
                        elif not _judge(run, ref.item, ref.attempt, error, record, max_attempts, said):
                            failure = error
                        answered.append(ref)
                    elif kind == "back":  # taken, never answered, and the send halted: pending
                        feed.out.difference_update(j.ref for j in value)
                    else:
                        alive -= 1
                        if isinstance(value, DeliveryError):
                            last_error = value
                            if not getattr(value, "others_go_on", False):
                                feed.finish(drop=True)  # the server is gone: nobody goes on
                        elif value is not None:
                            if hasattr(value, "until"):
                                run.paused = str(value)  # a quota: the rest waits
                            else:
                                failure = value
                            feed.finish(drop=True)
                    if failure is not None:
                        feed.finish(drop=True)
            feed.answered += len(answered)
            for ref in answered:
                feed.out.discard(ref)
            # The lanes hear first (they wait on it); the queue's spare messages (a third of
            # its capacity) cover what they take to pipeline until the refill below.
            for ref in answered:
                ref.on_disk.set()
            if answered:
                refill()
            if progress and answered:
                progress(len(answered))
    except BaseException:
        feed.fail()
        raise
    finally:
        feed.finish(drop=True)
        for thread in threads:
            thread.join()
    if failure is not None:
        raise failure
    unfinished = feed.answered < feed.handed or not exhausted
    if last_error is not None and unfinished and not run.paused:
        run.aborted = said(last_error.with_hint())
    return run


def _lane(sender: Sender, index: int, feed: _Feed) -> None:
    """One lane's thread: whatever ends it, the loop hears of it exactly once."""
    try:
        sender.lane(index, feed)
    except BaseException as exc:
        feed.events.put(("ended", exc))
    else:
        feed.events.put(("ended", None))


def _fill(
    feed: _Feed,
    todo: Iterator[T],
    prepare: Callable[[T], Attempt | None],
    record: Callable[[T, Outcome, str, str], None],
    run: Run,
    capacity: int,
    spare: int,
    stop: threading.Event | None,
    hold: Callable[[], str] | None,
) -> bool:
    """Hand out messages until ``capacity`` are out, or outcomes wait to be written while
    ``spare`` are queued; True when there are no more."""
    jobs: list[Job] = []
    while len(feed.out) < capacity:
        if stop is not None and stop.is_set():
            break
        if hold is not None and (paused := hold()):
            run.paused = paused
            break
        item = next(todo, _END)
        if item is _END:
            feed.put(jobs)
            return True
        try:
            attempt = prepare(item)  # type: ignore[arg-type]
        except Unsendable as exc:
            record(item, Outcome.FAILED, str(exc), "")  # type: ignore[arg-type]
            run.errors.append((exc.label, str(exc)))
            continue
        if attempt is None:
            continue
        assert attempt.message is not None, "a sender with lanes needs Attempt.message"
        ref = _Ref(item, attempt)
        feed.out.add(ref)
        feed.handed += 1
        jobs.append(Job(attempt.message, ref, attempt.valid))
        if len(feed.work) < spare:
            feed.put(jobs)  # a lane may be about to look for one to pipeline: now, not at the end
            jobs = []
        elif not feed.events.empty():
            break  # lanes wait for their outcomes to be written, and the queue has spares
    feed.put(jobs)
    return False


_END: Any = object()
