"""subscribers/NAME.csv: bad rows reported with file and line, duplicates mailed once, and the
store's checked copy follows the file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from newsletter import subscribers
from newsletter.errors import ConfigError
from newsletter.model import Subscriber
from newsletter.store import Store
from newsletter.subscribers import MAX_PROBLEMS, SubscriberList, sync


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as opened:
        yield opened


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "readers.csv"
    path.write_text(text, encoding="utf-8")
    return path


def listed(store: Store, name: str = "readers") -> list[tuple[Subscriber, bool]]:
    return list(store.subscribers(name))


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


def test_lists_are_read_in_pages_in_file_order(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\n" + "".join(f"r{i:03}@example.com\n" for i in range(250, 0, -1)))
    sync(store, "readers", path)
    seen = [sub.email for sub, _ in store.subscribers("readers", page=100)]
    assert seen == [f"r{i:03}@example.com" for i in range(250, 0, -1)]


def test_a_flood_of_bad_rows_is_summed_up(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "email\n" + "bad\n" * (MAX_PROBLEMS + 5) + "ann@example.com\n")
    result = sync(store, "readers", path)
    assert len(result.problems) == MAX_PROBLEMS + 1
    assert result.problems[-1] == f"{path}: 5 more problem(s) not shown"
    assert emails(store) == ["ann@example.com"]


def counting_checker(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every address the validator is asked about."""
    asked: list[str] = []
    real = subscribers.address_checker

    def checker() -> Callable[[str], str]:
        check = real()

        def counted(raw: str) -> str:
            asked.append(raw)
            return check(raw)

        return counted

    monkeypatch.setattr(subscribers, "address_checker", checker)
    return asked


def test_only_new_addresses_are_checked_and_an_unchanged_file_is_not_read(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = counting_checker(monkeypatch)
    path = write(tmp_path, "email\nann@example.com\nbob@example.org\n")
    sync(store, "readers", path)
    assert asked == ["ann@example.com", "bob@example.org"]
    write(tmp_path, "email\nann@example.com\nbob@example.org\ncarol@example.net\n")
    sync(store, "readers", path)
    assert asked[2:] == ["carol@example.net"]

    def fail(*_args: object) -> list[str]:
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(subscribers, "_read", fail)
    assert sync(store, "readers", path).problems == []


def test_new_rules_check_every_address_again(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "email\nann@example.com\nbob@example.org\n")
    sync(store, "readers", path)
    asked = counting_checker(monkeypatch)
    monkeypatch.setattr(subscribers, "RULES", subscribers.RULES + "-next")
    sync(store, "readers", path)
    assert asked == ["ann@example.com", "bob@example.org"]


def test_reading_a_long_list_does_not_lock_the_database(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the file is read and checked, another process must still be able to record a
    # delivery: only the final swap of the copy takes the write lock.
    path = write(tmp_path, "email\nann@example.com\nbob@example.org\n")
    writes: list[str] = []
    real = subscribers.address_checker

    def checker() -> Callable[[str], str]:
        check = real()

        def meanwhile(raw: str) -> str:
            with Store(f"sqlite:///{tmp_path / 'state.db'}", busy_timeout=0) as other:
                other.set_meta("probe", raw)
                writes.append(raw)
            return check(raw)

        return meanwhile

    monkeypatch.setattr(subscribers, "address_checker", checker)
    sync(store, "readers", path)
    assert writes == ["ann@example.com", "bob@example.org"]
    assert emails(store) == ["ann@example.com", "bob@example.org"]


def test_a_failed_read_inside_a_larger_transaction_leaves_no_rows_behind(
    tmp_path: Path, store: Store
) -> None:
    path = write(tmp_path, "email\nann@example.com\n")
    sync(store, "readers", path)
    with store.transaction():
        path.write_bytes(b"email\n" + b"".join(b"r%d@example.com\n" % n for n in range(50)) + b"\xff\n")
        with pytest.raises(ConfigError, match="not UTF-8"):
            sync(store, "readers", path)
    write(tmp_path, "email\nbob@example.org\n")
    sync(store, "readers", path)
    assert emails(store) == ["bob@example.org"]


@pytest.mark.parametrize(
    ("cell", "exported"),
    [
        ("=1+1", "'=1+1"),
        ("+33 1 23", "'+33 1 23"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("\0x", "'\0x"),
        ("Ann", "Ann"),
        ("Ann = Anna", "Ann = Anna"),
        ("'quoted", "'quoted"),
        ("", ""),
    ],
)
def test_cells_a_spreadsheet_would_run_get_a_leading_quote(cell: str, exported: str) -> None:
    from newsletter.subscribers import spreadsheet_safe

    assert spreadsheet_safe(cell) == exported
