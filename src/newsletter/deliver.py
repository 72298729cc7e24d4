"""The one loop over the ledger that email deliveries and webhook posts both go through.

The caller says how to get each pending item ready (``prepare``) and how to write an outcome
into its ledger (``record``); what a sender's exception means for the item and for the rest
of the run is decided here, once:

- ``TemporaryFailure``: pending again, or failed once the item has had ``max_attempts``;
  ``TargetUnavailable`` also ends the run (the next items would wait the same way).
- ``PermanentFailure``: failed. ``TargetGone`` (410): pending, and the run ends; the caller
  disables the target.
- ``DeliveryError``: the sender cannot go on; this item and the rest stay pending.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import DeliveryError, PermanentFailure, TargetGone, TargetUnavailable, TemporaryFailure
from .redact import redact

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


@dataclass
class Run:
    """What one pass of the loop did."""

    sent: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    aborted: str = ""  # DeliveryError: why the sender could not go on
    gone: str = ""  # TargetGone: the target's answer
    unavailable: str = ""  # TargetUnavailable: why the rest waits for a later run


def deliver(
    items: Iterable[T],
    prepare: Callable[[T], Attempt | None],
    record: Callable[[T, Outcome, str, str], None],
    *,
    max_attempts: int,
    stop: threading.Event | None = None,
    said: Callable[[str], str] = redact,
    progress: Callable[[int], None] | None = None,
) -> Run:
    """Try every item in turn, recording each outcome the moment it is known.

    ``prepare`` returns None for an item it dealt with itself (skipped), or raises
    ``Unsendable`` for one that can never go out. ``record(item, outcome, error, where)``
    writes the ledger. ``said`` turns every error into the text that is recorded and reported;
    by default it is redacted, since a server's reply or a target's URL may quote a password or
    a token. ``stop`` ends the loop between
    two items; ``progress`` is told of every answered item.
    """
    run = Run()
    for item in items:
        if stop is not None and stop.is_set():
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
        except DeliveryError as exc:
            run.aborted = said(exc.with_hint())
            break
        except TargetGone as exc:
            record(item, Outcome.PENDING, said(str(exc)), "")
            run.gone = said(str(exc))
            break
        except TemporaryFailure as exc:
            give_up = attempt.attempts + 1 >= max_attempts
            record(item, Outcome.FAILED if give_up else Outcome.PENDING, said(str(exc)), "")
            run.errors.append((attempt.label, said(str(exc))))
            if isinstance(exc, TargetUnavailable):
                run.unavailable = said(str(exc))
                break
        except PermanentFailure as exc:
            record(item, Outcome.FAILED, said(str(exc)), "")
            run.errors.append((attempt.label, said(str(exc))))
        else:
            record(item, Outcome.SENT, "", where)
            run.sent += 1
        if progress:
            progress(1)
    return run
