"""The ``file`` sender: one .eml file per message, for previews, archives and the example."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from ..files import private_dir, write_private
from . import Outgoing, Sender, SenderOptions


class FileOptions(SenderOptions):
    path: str = Field("outbox", description="folder, relative to schedules.yaml")


class FileSender(Sender):
    Options = FileOptions
    options: FileOptions

    @property
    def folder(self) -> Path:
        return (self.base_dir / self.options.path).resolve()

    def send(self, message: Outgoing) -> None:
        # Messages carry addresses and working unsubscribe links: folders 0700, files 0600.
        folder = private_dir(self.folder / message.label)
        safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", message.recipient)
        # All or nothing, so a retry replaces the file instead of adding a second one.
        write_private(folder / f"{safe}.eml", message.data)
