"""subscribers/NAME.csv: one row per reader, ``email`` required, other columns become fields.

The file is the list; the store keeps a checked copy of it, which is what runs read.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import ConfigError
from .model import Subscriber, SubscriberRow
from .sanitize import one_line
from .storage import Storage, SubscriberStaging


@dataclass(frozen=True)
class SubscriberList:
    """What a sync found: the list as stored now, and what is wrong in its file."""

    name: str
    path: Path
    problems: list[str]  # "file:line: what is wrong", rows skipped


# Part of every list's fingerprint: change it when the checks change, and every list is read again.
# 2: cells go through sanitize.one_line (control characters too, not only line breaks): CSV cells
# end up in headers (the To: name).
RULES = "2"
# Problems kept per list: a file with 100,000 bad rows should not make a report of 100,000 lines.
MAX_PROBLEMS = 100


def fingerprint(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read subscriber list: {exc.strerror}") from None
    return f"{RULES}:{digest}"


def sync(store: Storage, name: str, path: Path) -> SubscriberList:
    """Bring the store's copy of list ``name`` up to date with ``path``; say what is wrong in it.

    The file is read and checked only when its content changed since the last run, and then
    an address that was valid last time is not checked again, so a run with 100,000
    subscribers costs a hash of the file, and memory does not grow with it. A file that cannot
    be read leaves the previous copy in place.
    """
    source = fingerprint(path)
    cached = store.subscriber_source(name)
    if cached is not None and cached.fingerprint == source:
        return SubscriberList(name, path, cached.problems)
    # Addresses checked under other rules (RULES changed) are all checked again.
    reuse = cached is not None and cached.fingerprint.startswith(f"{RULES}:")
    problems = store.replace_subscribers(name, source, reuse, lambda staging: _read(path, staging))
    return SubscriberList(name, path, problems)


def _read(path: Path, staging: SubscriberStaging) -> list[str]:
    problems: list[str] = []
    more = 0
    check: Callable[[str], str] | None = None

    def problem(text: str) -> None:
        nonlocal more
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)
        else:
            more += 1

    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read subscriber list: {exc.strerror}") from None
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
                raw = one_line(row.get(columns["email"]) or "")
                if not raw:
                    if any(one_line(v) for v in row.values() if isinstance(v, str)):
                        problem(f"{path}:{line}: no email address; row skipped")
                    continue
                email = staging.checked(raw)
                if email is None:
                    check = check or address_checker()
                    try:
                        email = check(raw)
                    except ValueError as exc:
                        problem(f"{path}:{line}: invalid address {raw!r}: {exc}; skipped")
                        continue
                extra = {
                    c.strip().lower(): one_line(v)
                    for c, v in row.items()
                    if c and c.strip().lower() not in ("email", "name") and isinstance(v, str)
                }
                name = one_line(row.get(columns["name"]) or "") if "name" in columns else ""
                first = staging.add(SubscriberRow(Subscriber(email, name, extra), raw, line))
                if first is not None:
                    problem(f"{path}:{line}: {email} already on line {first}; one email goes to it")
        except csv.Error as exc:
            raise ConfigError(f"{path}:{reader.line_num}: broken CSV: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text", hint="save the file as UTF-8") from None
    if more:
        problems.append(f"{path}: {more} more problem(s) not shown")
    return problems


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (OWASP "CSV Injection"; ASVS 1.2.10 adds NUL): =HYPERLINK() in a name would run on export.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\0")


def spreadsheet_safe(cell: str) -> str:
    """``cell`` as a spreadsheet shows it as text: a formula-like start gets a leading ' (OWASP)."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def export(store: Storage, name: str, out: TextIO) -> None:
    """List ``name`` as CSV, without the addresses that unsubscribed, every cell spreadsheet-safe.

    The rule applies to every cell, the address and the header included: ``-x@example.org``
    is a valid address and column names come from the file.
    """
    extra = store.subscriber_fields(name)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([spreadsheet_safe(c) for c in ("email", "name", *extra)])
    for sub, suppressed in store.subscribers(name):
        if not suppressed:
            row = (sub.email, sub.name, *(sub.fields.get(k, "") for k in extra))
            writer.writerow([spreadsheet_safe(c) for c in row])


def address_checker() -> Callable[[str], str]:
    """A function giving the address to send to, or ValueError saying what is wrong."""
    # 25 ms to import: only runs that meet a new address pay for it.
    from email_validator import EmailNotValidError, validate_email

    def check(raw: str) -> str:
        try:
            # No SMTPUTF8: many servers still refuse it, so such an address is reported.
            checked = validate_email(raw, check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError as exc:
            raise ValueError(str(exc)) from None
        return checked.ascii_email or checked.normalized

    return check
