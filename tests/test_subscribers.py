"""subscribers/NAME.csv: bad rows reported with file and line, duplicates mailed once."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.errors import ConfigError
from newsletter.subscribers import load_subscribers


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "readers.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_columns_become_fields_and_bad_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,name,City\n"
        "ann@example.com,Ann,Lisbon\n"
        "not-an-address,Bad,Nowhere\n"
        "ANN@Example.com,Ann again,Porto\n"
        ",Nobody,Void\n"
        "bob@example.org,,\n"
        "\n"
        "carol@exa mple.com,Carol,\n",
    )
    result = load_subscribers(path)
    assert [s.email for s in result.subscribers] == ["ann@example.com", "bob@example.org"]
    assert result.subscribers[0].name == "Ann"
    assert result.subscribers[0].fields == {"city": "Lisbon"}
    problems = "\n".join(result.problems)
    assert f"{path}:3: invalid address 'not-an-address'" in problems
    assert f"{path}:4: ANN@example.com already on line 2" in problems
    assert f"{path}:5: no email address" in problems
    assert f"{path}:8: invalid address 'carol@exa mple.com'" in problems
    assert len(result.problems) == 4


def test_utf8_bom_and_line_breaks_in_cells(tmp_path: Path) -> None:
    path = write(tmp_path, '\ufeffemail,name\nann@example.com,"Ann\nBcc: x@example.com"\n')
    [sub] = load_subscribers(path).subscribers
    assert sub.name == "Ann Bcc: x@example.com"


def test_a_list_without_an_email_column_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "mail,name\nann@example.com,Ann\n")
    with pytest.raises(ConfigError, match=r"readers.csv:1: the header row has no 'email' column"):
        load_subscribers(path)


def test_international_domains_are_sent_as_ascii(tmp_path: Path) -> None:
    path = write(tmp_path, "email\nann@bücher.example.com\n")
    [sub] = load_subscribers(path).subscribers
    assert sub.email == "ann@xn--bcher-kva.example.com"
