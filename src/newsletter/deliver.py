"""The one loop over the ledger that email deliveries and webhook posts both go through.

The caller says how to get each pending item ready (``prepare``) and how to write an outcome
into its ledger (``record``); what a sender's exception means for the item and for the rest
of the run is decided here, once:

- ``TemporaryFailure``: pending again, or failed once the item has had ``max_attempts``;
  ``TargetUnavailable`` also ends the run (the next items would wait the same way).
- ``PermanentFailure``: failed. ``TargetGone`` (410): pending, and the run ends; the caller
  disables the target.
- ``DeliveryError``: the sender cannot go on; this item and the rest stay pending.

A sender with lanes (the SMTP sender's connections) gets the messages through a ``Feed``, in
this thread: it takes each message as a connection is ready for it and hands back each outcome.
Outcomes that arrive together are written in one transaction, and a connection sends its next
end of data only once its last outcome is on disk, so grouping the writes does not loosen the
bound: a process killed at any moment resends at most one message per connection.
"""

from __future__ import annotations

import contextlib
import enum
import threading
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


class _Feed(Generic[T]):
    """What a sender with lanes takes its messages from and gives its outcomes to
    (``senders.Feed``): the items prepared one at a time as it asks, the outcomes written
    together at each ``flush``, all in this thread."""

    def __init__(
        self,
        todo: Iterator[T],
        prepare: Callable[[T], Attempt | None],
        record: Callable[[T, Outcome, str, str], None],
        run: Run,
        *,
        max_attempts: int,
        stop: threading.Event | None,
        said: Callable[[str], str],
        progress: Callable[[int], None] | None,
        hold: Callable[[], str] | None,
        batch: Callable[[], AbstractContextManager[object]],
        tick: Callable[[], None] | None,
    ) -> None:
        self.todo, self.prepare, self.record, self.run = todo, prepare, record, run
        self.max_attempts, self.said, self.progress = max_attempts, said, progress
        self.hold, self.batch, self.ticks = hold, batch, tick
        self.stop = stop or threading.Event()
        self.outcomes: list[tuple[_Ref[T], Exception | None]] = []
        self.exhausted = False
        self.handed = self.answered = 0
        self.failure: Exception | None = None  # not a sender's verdict: raised once it ends

    def take(self) -> Job | None:
        run = self.run
        while not self.exhausted:
            if self.stop.is_set() or run.aborted or run.gone or run.unavailable or run.paused or self.failure:
                return None
            if self.hold is not None and (paused := self.hold()):
                run.paused = paused
                return None
            item = next(self.todo, _END)
            if item is _END:
                self.exhausted = True
                return None
            try:
                attempt = self.prepare(item)
            except Unsendable as exc:
                self.record(item, Outcome.FAILED, str(exc), "")
                run.errors.append((exc.label, str(exc)))
                continue
            if attempt is None:
                continue
            assert attempt.message is not None, "a sender with lanes needs Attempt.message"
            self.handed += 1
            return Job(attempt.message, _Ref(item, attempt), attempt.valid)
        return None

    def done(self, job: Job, error: Exception | None) -> None:
        ref = job.ref
        assert isinstance(ref, _Ref)
        self.outcomes.append((ref, error))

    def flush(self) -> None:
        if not self.outcomes:
            return
        outcomes, self.outcomes = self.outcomes, []
        run = self.run
        with self.batch():
            for ref, error in outcomes:
                if error is None:
                    self.record(ref.item, Outcome.SENT, "", "")
                    run.sent += 1
                elif not _judge(run, ref.item, ref.attempt, error, self.record, self.max_attempts, self.said):
                    self.failure = error
        self.answered += len(outcomes)
        if self.progress:
            self.progress(len(outcomes))

    def give_back(self, jobs: list[Job]) -> None:
        pass  # never answered: they stay pending, as the ledger has them

    def tick(self) -> None:
        if self.ticks is not None:
            self.ticks()


@dataclass(eq=False)
class _Ref(Generic[T]):
    item: T
    attempt: Attempt


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
    """``deliver`` for a sender with lanes: its ``send_many`` takes the items as it can send
    them. ``batch`` opens the transaction that outcomes arriving together share; ``hold``
    returns why sending must pause (a send window closing), checked before each message;
    ``tick`` is called a few times a second, outside any transaction, however slow the
    server is."""
    run = Run()
    feed = _Feed(
        iter(items),
        prepare,
        record,
        run,
        max_attempts=max_attempts,
        stop=stop,
        said=said,
        progress=progress,
        hold=hold,
        batch=batch,
        tick=tick,
    )
    last_error: DeliveryError | None = None
    try:
        sender.send_many(feed)
    except DeliveryError as exc:
        last_error = exc
    except Exception as exc:
        if not hasattr(exc, "until"):
            raise
        run.paused = str(exc)  # a quota: the rest waits
    if feed.failure is not None:
        raise feed.failure
    unfinished = feed.answered < feed.handed or not feed.exhausted
    if last_error is not None and unfinished and not run.paused:
        run.aborted = said(last_error.with_hint())
    return run


_END: Any = object()
