"""subscribers/NAME.csv: bad rows reported with file and line, duplicates mailed once, and the
store's checked copy follows the file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from newsletter.errors import ConfigError
from newsletter.store import Store
from newsletter.subscribers import MAX_PROBLEMS, Subscriber, SubscriberList, sync


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as opened:
        yield opened


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "readers.csv"
    path.write_text(text, encoding="utf-8")
    return path


def listed(store: Store, name: str = "readers") -> list[tuple[Subscriber, bool]]:
    return store.subscribers(name, limit=10_000)


def emails(store: Store, name: str = "readers") -> list[str]:
    return [sub.email for sub, _ in listed(store, name)]


def test_columns_become_fields_and_bad_rows_are_reported_and_skipped(tmp_path: Path, store: Store) -> None:
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
    result = sync(store, "readers", path)
    assert emails(store) == ["ann@example.com", "bob@example.org"]
    ann = store.subscriber("readers", "ANN@EXAMPLE.COM")
    assert ann == Subscriber("ann@example.com", "Ann", {"city": "Lisbon"})
    problems = "\n".join(result.problems)
    assert f"{path}:3: invalid address 'not-an-address'" in problems
    assert f"{path}:4: ANN@example.com already on line 2" in problems
    assert f"{path}:5: no email address" in problems
    assert f"{path}:8: invalid address 'carol@exa mple.com'" in problems
    assert len(result.problems) == 4
    # An unchanged file is not read again, and its problems are still reported.
    assert sync(store, "readers", path) == result


def test_utf8_bom_and_line_breaks_in_cells(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, '\ufeffemail,name\nann@example.com,"Ann\nBcc: x@example.com"\n')
    sync(store, "readers", path)
    [(sub, _)] = listed(store)
    assert sub.name == "Ann Bcc: x@example.com"


def test_a_list_without_an_email_column_is_an_error(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "mail,name\nann@example.com,Ann\n")
    with pytest.raises(ConfigError, match=r"readers.csv:1: the header row has no 'email' column"):
        sync(store, "readers", path)


def test_international_domains_are_sent_as_ascii(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\nann@bücher.example.com\n")
    sync(store, "readers", path)
    assert emails(store) == ["ann@xn--bcher-kva.example.com"]


def test_an_edited_file_replaces_the_copy(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email,name\nann@example.com,Ann\nbob@example.org,Bob\n")
    sync(store, "readers", path)
    write(tmp_path, "email,name\nbob@example.org,Robert\ncarol@example.net,Carol\n")
    result = sync(store, "readers", path)
    assert result == SubscriberList("readers", path, [])
    assert [(s.email, s.name) for s, _ in listed(store)] == [
        ("bob@example.org", "Robert"),
        ("carol@example.net", "Carol"),
    ]
    assert store.subscriber_counts("readers") == (2, 2)


def test_a_file_broken_by_an_edit_keeps_the_last_good_copy(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\nann@example.com\n")
    sync(store, "readers", path)
    path.write_bytes(b"email\nann@example.com\nbob@\xff\xfe.org\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        sync(store, "readers", path)
    assert emails(store) == ["ann@example.com"]
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read subscriber list"):
        sync(store, "readers", path)
    assert emails(store) == ["ann@example.com"]


def test_unsubscribed_addresses_are_counted_and_marked(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\nann@example.com\nbob@example.org\n")
    sync(store, "readers", path)
    store.suppress("readers", "Bob@Example.org", "cli")
    assert store.subscriber_counts("readers") == (2, 1)
    assert [(s.email, off) for s, off in listed(store)] == [
        ("ann@example.com", False),
        ("bob@example.org", True),
    ]


def test_lists_are_paged_in_address_order(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\n" + "".join(f"r{i:03}@example.com\n" for i in range(250, 0, -1)))
    sync(store, "readers", path)
    seen: list[str] = []
    after = ""
    while page := store.subscribers("readers", after, limit=100):
        seen += [sub.email for sub, _ in page]
        after = page[-1][0].key
    assert seen == [f"r{i:03}@example.com" for i in range(1, 251)]


def test_a_flood_of_bad_rows_is_summed_up(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\n" + "bad\n" * (MAX_PROBLEMS + 5) + "ann@example.com\n")
    result = sync(store, "readers", path)
    assert len(result.problems) == MAX_PROBLEMS + 1
    assert result.problems[-1] == f"{path}: 5 more problem(s) not shown"
    assert emails(store) == ["ann@example.com"]
