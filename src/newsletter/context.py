"""What one job, command or web request runs with: its store, senders, token signer, clock.

A ``RunContext`` is made in one place per unit of work (a CLI command, a daemon job, a web
request) and belongs to the thread that made it; the ``Config`` it reads stays inert and is
shared. The next backends plug in here: ``config.open_store()`` picks the store, and every
sender instance comes from ``sender()``, never from a shared object.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Self

from .model import now
from .tokens import UnsubscribeTokens

if TYPE_CHECKING:
    from .config import Config
    from .senders import Sender
    from .storage import Storage

Clock = Callable[[], datetime]


class RunContext:
    """The live half of a run; close it (``with``) to close its store."""

    def __init__(
        self,
        config: Config,
        store: Storage,
        *,
        stop: threading.Event | None = None,
        clock: Clock = now,
    ) -> None:
        self.config = config
        self.store = store
        # Set from another thread (SIGTERM in the daemon): a send ends between two messages.
        self.stop = stop
        self.clock = clock

    @classmethod
    def open(cls, config: Config, *, stop: threading.Event | None = None, clock: Clock = now) -> Self:
        """A context on a new connection to the configured store."""
        return cls(config, config.open_store(), stop=stop, clock=clock)

    def sender(self, name: str) -> Sender:
        """A new instance of the sender ``name``: a socket or session is never shared."""
        return self.config.sender(name)

    @cached_property
    def tokens(self) -> UnsubscribeTokens:
        """The unsubscribe token signer; the secret is read (or made and stored) once."""
        secret = os.environ.get("NEWSLETTER_SECRET") or self.store.secret("unsubscribe")
        return UnsubscribeTokens(secret)

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
