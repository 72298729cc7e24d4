"""The wire format: headers, MIME structure, and the per-subscriber splice."""

from __future__ import annotations

import email
import email.policy
import html
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import parseaddr

import pytest

from newsletter.message import Recipient, Skeleton
from newsletter.render import RenderedIssue, Section, article, render_issue
from newsletter.store import StoredEntry

DATE = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LONG_UNSUB = "https://news.example.org/unsubscribe/" + "t" * 300


def rendered(title: str = "Post one", summary: str = "<p>Body.</p>", footer_field: str = "") -> RenderedIssue:
    e = StoredEntry(1, "f", title, "https://blog.example.org/1", summary, "", DATE, "", [], DATE)
    section = Section("Feed", "", [article(e, "Feed", 600)])
    return render_issue(
        templates_dir=None,
        title="Weekly",
        subject_template="{{ title }}: {{ issue.top_title }}",
        number=1,
        date=DATE,
        sections=[section],
    )


def skeleton(r: RenderedIssue) -> Skeleton:
    return Skeleton(
        r,
        from_addr="Weekly <news@example.net>",
        reply_to=None,
        date=DATE,
        list_id="weekly.example.net",
        list_name="Weekly",
        id_seed="weekly:1",
    )


def recipient(email_addr: str = "ann@example.com", name: str = "Ann", unsub: str = LONG_UNSUB) -> Recipient:
    return Recipient(email_addr, name, {"email": email_addr, "name": name, "unsubscribe_url": unsub})


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_message_is_multipart_alternative_with_the_list_headers() -> None:
    _, data = skeleton(rendered()).build(recipient())
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    for name in ("From", "To", "Subject", "Date", "Message-ID", "List-Id", "List-Unsubscribe"):
        assert msg[name], name
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"] == "Weekly <weekly.example.net>"
    assert msg["Subject"] == "Weekly: Post one"
    assert "https://blog.example.org/1" in msg.get_body(("plain",)).get_content()


def test_long_list_unsubscribe_reaches_the_wire_as_one_url() -> None:
    _, data = skeleton(rendered()).build(recipient())
    lines = data.split(b"\r\n")
    header = [line for line in lines if line.startswith(b"List-Unsubscribe:")]
    assert header == [b"List-Unsubscribe: <" + LONG_UNSUB.encode() + b">"]
    assert b"=?" not in header[0]
    assert parse(data)["List-Unsubscribe"] == f"<{LONG_UNSUB}>"


def test_no_line_is_longer_than_998_and_lines_end_in_crlf() -> None:
    huge_line = "<p>" + "x" * 5000 + "</p>"
    _, data = skeleton(rendered(summary=huge_line)).build(recipient())
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_feed_text_with_line_breaks_cannot_inject_headers() -> None:
    r = rendered(title="Hello\r\nBcc: victim@example.com\r\n\r\n<script>x</script>")
    _, data = skeleton(r).build(recipient(name="Eve\r\nBcc: other@example.com"))
    msg = parse(data)
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]
    assert msg["Subject"].startswith("Weekly: Hello Bcc: victim@example.com")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith(b"Bcc") for line in head.split(b"\r\n"))


def test_non_ascii_names_and_subjects_are_encoded_and_round_trip() -> None:
    r = rendered(title="Café ☕ and naïve résumé")
    _, data = skeleton(r).build(recipient(name="Zoë Ñandú"))
    assert data.isascii()
    msg = parse(data)
    assert msg["Subject"] == "Weekly: Café ☕ and naïve résumé"
    assert msg["To"].addresses[0].display_name == "Zoë Ñandú"


@pytest.mark.parametrize("name", ["🎉" * 200, "Zoë " * 100, "x" * 5000])
def test_long_names_are_folded_into_short_lines_and_round_trip(name: str) -> None:
    _, data = skeleton(rendered()).build(recipient(name=name))
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert all(len(line) <= 998 for line in head)
    to = parse(data)["To"]
    assert to.addresses[0].addr_spec == "ann@example.com"
    # Decoded by RFC 2047 6.2, which drops the space between adjacent encoded-words; CPython's
    # new header parser keeps it (and so does its own folding), mail clients do not.
    unfolded = re.search(rb"^To: (.*?)\r\n(?! )", data, re.S | re.M)
    assert unfolded
    display, addr = parseaddr(
        str(make_header(decode_header(unfolded.group(1).replace(b"\r\n", b"").decode())))
    )
    assert addr == "ann@example.com"
    assert display == " ".join(name.split())[:200].rstrip()


@pytest.mark.parametrize(
    "name",
    ["Ann", "Tom & Jerry <b>bold</b>", 'Quote " and = sign', "Zoë 日本語 🎉", "a" * 300, ""],
)
def test_spliced_parts_equal_a_direct_render_for_this_subscriber(name: str) -> None:
    r = rendered()
    values = {"email": "ann@example.com", "name": name, "unsubscribe_url": "https://u.example/?a=1&b=2"}
    _, data = skeleton(r).build(Recipient("ann@example.com", name, values))
    msg = parse(data)
    expected_html, expected_text = r.html, r.text
    for i, field in enumerate(r.fields):
        token = f"{r.prefix}F{i}E"
        value = " ".join(values[field].split())
        expected_html = expected_html.replace(token, html.escape(value, quote=True))
        expected_text = expected_text.replace(token, value)
    # MIME text travels with CRLF line ends; compare the text itself.
    assert msg.get_body(("html",)).get_content().replace("\r\n", "\n") == expected_html
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == expected_text


def test_message_id_is_stable_per_recipient_and_unique_across_them() -> None:
    s = skeleton(rendered())
    a1, _ = s.build(recipient("ann@example.com"))
    a2, _ = s.build(recipient("ANN@example.com"))
    b, _ = s.build(recipient("bob@example.com"))
    assert a1 == a2 != b
    assert a1.startswith("<") and a1.endswith("@example.net>")
