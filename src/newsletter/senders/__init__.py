"""Sender plugins.

A sender is a small class with its options declared as a pydantic model. Built-in senders are
registered exactly like third-party ones, through the ``newsletter.senders`` entry point group
in a package's metadata::

    [project.entry-points."newsletter.senders"]
    smtp = "newsletter.senders.smtp:SmtpSender"

``send`` raises :class:`TemporaryFailure` (retry later) or :class:`PermanentFailure` (give up)
for one message, and :class:`DeliveryError` when it cannot go on at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

ENTRY_POINT_GROUP = "newsletter.senders"


class SenderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Outgoing:
    """One finished message: the bytes on the wire and the envelope."""

    envelope_from: str
    recipient: str
    message_id: str
    data: bytes
    label: str  # "<schedule>-<issue number>", for senders that file messages away


class Sender:
    Options: ClassVar[type[SenderOptions]] = SenderOptions

    def __init__(self, name: str, options: SenderOptions, base_dir: Path) -> None:
        self.name = name
        self.options = options
        self.base_dir = base_dir

    def open(self) -> None:
        """Called once before a batch; connect here."""

    def send(self, message: Outgoing) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Called once after a batch, also after errors."""

    def __enter__(self) -> Sender:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@cache
def sender_types() -> dict[str, type[Sender]]:
    types: dict[str, type[Sender]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down with it
            raise ConfigError(
                f"sender plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                hint="reinstall or uninstall the package that provides it",
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, Sender)):
            raise ConfigError(f"sender plugin {ep.name!r} ({ep.value}) is not a Sender subclass")
        types[ep.name] = cls
    if not types:
        raise ConfigError(
            "no sender types are registered",
            hint="install the package (pip install -e .) so its entry points exist",
        )
    return types
