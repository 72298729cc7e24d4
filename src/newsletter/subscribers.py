"""subscribers/NAME.csv: one row per reader, ``email`` required, other columns become fields."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from email_validator import EmailNotValidError, validate_email

from .errors import ConfigError


@dataclass(frozen=True)
class Subscriber:
    email: str
    name: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The ledger key: one email per address, whatever its case."""
        return self.email.lower()


@dataclass
class SubscriberList:
    name: str
    path: Path
    subscribers: list[Subscriber]
    problems: list[str]  # "file:line: what is wrong", rows skipped


def _clean(value: str | None) -> str:
    # CSV cells end up in headers (the To: name); never let a line break through.
    return " ".join((value or "").split())


def load_subscribers(path: Path) -> SubscriberList:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read subscriber list: {exc.strerror}") from None
    subscribers: list[Subscriber] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    with handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames or []
            columns = {c.strip().lower(): c for c in header if c}
            if "email" not in columns:
                raise ConfigError(
                    f"{path}:1: the header row has no 'email' column",
                    hint="the first line must name the columns, e.g. email,name",
                )
            for row in reader:
                line = reader.line_num
                raw = _clean(row.get(columns["email"]))
                if not raw:
                    if any(_clean(v) for v in row.values() if isinstance(v, str)):
                        problems.append(f"{path}:{line}: no email address; row skipped")
                    continue
                try:
                    # No SMTPUTF8: many servers still refuse it, so such an address is reported.
                    checked = validate_email(raw, check_deliverability=False, allow_smtputf8=False)
                except EmailNotValidError as exc:
                    problems.append(f"{path}:{line}: invalid address {raw!r}: {exc}; skipped")
                    continue
                email = checked.ascii_email or checked.normalized
                if email.lower() in seen:
                    problems.append(
                        f"{path}:{line}: {email} already on line {seen[email.lower()]}; one email goes to it"
                    )
                    continue
                seen[email.lower()] = line
                extra = {
                    c.strip().lower(): _clean(v)
                    for c, v in row.items()
                    if c and c.strip().lower() not in ("email", "name") and isinstance(v, str)
                }
                name = _clean(row.get(columns["name"])) if "name" in columns else ""
                subscribers.append(Subscriber(email, name, extra))
        except csv.Error as exc:
            raise ConfigError(f"{path}:{reader.line_num}: broken CSV: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text", hint="save the file as UTF-8") from None
    return SubscriberList(path.stem, path, subscribers, problems)
