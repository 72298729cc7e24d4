"""Errors the library raises. Each carries a hint; only the CLI turns them into exit codes."""

from __future__ import annotations


class NewsletterError(Exception):
    """Base class: ``str(err)`` is the problem, ``err.hint`` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def with_hint(self) -> str:
        """The problem and, in parentheses, what to do about it: one line for a report or a log."""
        return f"{self} ({self.hint})" if self.hint else str(self)


class ConfigError(NewsletterError):
    """schedules.yaml, a subscriber list or a template is wrong; the message names file and key."""

    exit_code = 2


class FeedError(NewsletterError):
    """One feed could not be fetched or parsed. The run carries on without it."""


class StoreError(NewsletterError):
    """The state database cannot be read or written."""


class DeliveryError(NewsletterError):
    """A sender cannot go on at all (server unreachable, authentication refused)."""


class BusyError(NewsletterError):
    """Another process is sending the same schedule right now."""


class TemporaryFailure(Exception):
    """A recipient was refused for now (4xx): the delivery stays pending for a later run."""


class TargetUnavailable(TemporaryFailure):
    """A target did not answer at all, or asked to be left alone for longer than we wait.

    Every later item to the same target would wait the same way, so the run stops posting to
    it: this item and the rest stay pending for a later run.
    """


class PermanentFailure(Exception):
    """A recipient was refused for good (5xx): the delivery is marked failed with this reply."""


class TargetGone(PermanentFailure):
    """A webhook target answered 410 Gone: it is disabled until the configuration changes."""
