"""The ``file`` sender: one .eml file per message, for previews, archives and the example."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field

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
        folder = self.folder / message.label
        folder.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", message.recipient)
        target = folder / f"{safe}.eml"
        # Write then rename, so a killed process never leaves half a message behind and a
        # retry replaces the file instead of adding a second one.
        tmp = target.with_suffix(".eml.tmp")
        tmp.write_bytes(message.data)
        os.replace(tmp, target)
