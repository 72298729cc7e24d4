"""The wire format: headers, MIME structure, and the per-subscriber splice."""

from __future__ import annotations

import base64
import email
import email.policy
import html
import json
import random
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import pytest
import regex

from conftest import FeedServer, Mailbox, Project, Route, item, rss
from newsletter.build import IssueBuilder
from newsletter.config import load_config
from newsletter.context import RunContext
from newsletter.message import Recipient, Skeleton
from newsletter.model import StoredEntry
from newsletter.render import RenderedIssue, Section, article, render_issue
from newsletter.store import Store

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


# -- Subject: any title, decoded by any decoder, reads as written -----------------------------

SUBJECTS = {
    "cyrillic": "Городская администрация обсуждает новый детсад и Ледовый дворец в районе набережной",
    "cyrillic-after-ascii": "Weekly #12: Мэрия обсуждает детсад и Ледовый дворец, а также новый парк у реки",
    "greek": "Η κυβέρνηση ανακοίνωσε νέα μέτρα για την ενέργεια και τις μεταφορές στην Αθήνα σήμερα",
    "japanese": "東京都は来年度から新しい保育園と アイスアリーナ の建設を始めると発表しました。" * 2,
    "chinese": "北京市政府宣布 明年将开始建设新的幼儿园和冰上运动中心 以满足市民需求",
    "korean": "서울시는 내년부터 새로운 어린이집과 아이스링크 건설을 시작한다고 발표했습니다",
    "arabic": "أعلنت البلدية عن خطة جديدة لبناء روضة أطفال وقصر للجليد في وسط المدينة هذا العام",
    "hebrew": "העירייה הודיעה על תוכנית חדשה לבניית גן ילדים והיכל קרח במרכז העיר השנה",
    "thai": "กรุงเทพมหานครประกาศแผนสร้างโรงเรียนอนุบาลและลานสเก็ตน้ำแข็งแห่งใหม่ในปีนี้ ข่าว ด่วน",
    "emoji-zwj": "Family day 👨‍👩‍👧‍👦 👩🏽‍🚀 🏳️‍🌈 🇩🇪🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍🤝‍🧑🏻 at the rink 🎉🎉🎉 more 👨‍👩‍👧‍👦" * 2,
    "combining": "Tiếng Việt: Thành phố công bố nhà trẻ Ле́довый e\u0301e\u0301 n\u0303 a\u0308\u0301",
    "mixed": "Release 2.0 — naïve café notes from the Zürich meetup, and a résumé of the Köln talk",
    "spaces": "a   b\t\tc   ünï   x  日本   語  ",
    "ascii-edges": "Breaking news today: 東京 Олимпиада and more from our reporters on the ground",
    "ascii-long": " ".join(f"word{n}" for n in range(70)),
    "ascii-long-word": "see https://example.org/" + "x" * 150 + " for the full story",
    "lookalike": "=?utf-8?q?not_encoded?= a_b = c? _x_ =?",
    "punctuation": 'Ann "quoted" (paren) <angle> @at, comma; colon: back\\slash — ünïcode',
    "short": "é",
    "long-cyrillic": "Новости города и области: " * 16,
    "zalgo": "Z" + "\u0301\u0302\u0303\u0304" * 30 + "algo",
}


def subject_message(subject: str) -> bytes:
    issue = RenderedIssue(subject, "<p>Hi</p>", "Hi\n", "NLx", [])
    return skeleton(issue).build(recipient())[1]


def head_lines(data: bytes) -> list[str]:
    return data.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")


def field_lines(data: bytes, name: str) -> list[str]:
    """The field's lines on the wire, folded."""
    found = re.search(rf"^{name}: .*?\r\n(?![ \t])", data.decode("ascii"), re.S | re.M)
    assert found, name
    return found.group(0).split("\r\n")[:-1]


def raw_field(data: bytes, name: str) -> str:
    """The field's value unfolded as RFC 5322 says (CRLF removed, the space kept), not decoded."""
    return "".join(field_lines(data, name))[len(name) + 2 :]


def assert_subject_reads(subject: str) -> None:
    data = subject_message(subject)
    expected = " ".join(subject.split())
    # The email package's parser, and the RFC 2047 decoder most clients follow.
    assert parse(data)["Subject"] == expected
    value = raw_field(data, "Subject")
    assert str(make_header(decode_header(value))) == expected
    lines = field_lines(data, "Subject")
    assert all(len(line) <= 998 for line in lines)
    if max(map(len, subject.split() or [""])) <= 60:
        assert all(len(line) <= 78 for line in lines), [line for line in lines if len(line) > 78]
    # Each encoded-word is at most 75 characters and decodes on its own; two that follow each
    # other split the text between grapheme clusters, unless one cluster is too long for a word.
    previous: tuple[int, str] | None = None
    for m in re.finditer(r"=\?utf-8\?([bq])\?([^?]*)\?=", value, re.I):
        assert len(m.group(0)) <= 75
        body = m.group(2)
        octets = (
            base64.b64decode(body)
            if m.group(1).lower() == "b"
            else re.sub(rb"=([0-9A-F]{2})", lambda h: bytes([int(h[1], 16)]), body.replace("_", " ").encode())
        )
        piece = octets.decode("utf-8")  # strict: no UTF-8 sequence is split
        if previous and not value[previous[0] : m.start()].strip():
            joined = regex.findall(r"\X", previous[1] + piece)
            apart = regex.findall(r"\X", previous[1]) + regex.findall(r"\X", piece)
            if len(joined) != len(apart):
                assert max(len(g.encode()) for g in joined) > 45, (previous[1], piece)
        previous = (m.end(), piece)


@pytest.mark.parametrize("subject", SUBJECTS.values(), ids=SUBJECTS.keys())
def test_subject_decodes_to_the_title_in_every_script(subject: str) -> None:
    assert_subject_reads(subject)


@pytest.mark.parametrize("size", [1, 5, 20, 39, 40, 41, 60, 100, 200, 400])
@pytest.mark.parametrize("word", ["детсад", "日本語", "ไทย", "👩🏽‍🚀", "é", "Ab", "Ελλάδα"])
def test_subject_decodes_at_every_length(word: str, size: int) -> None:
    # Words of a script around every point where a fold can fall, up to ~400 characters.
    text = " ".join([word] * (size // (len(word) + 1) + 1))[:size].rstrip()
    assert_subject_reads(f"Weekly: {text} end")
    assert_subject_reads(f"{text} и")


POOLS = [
    "abcdefghij ABC 0123 -:,.!?'\"()=_/@",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "日本語東京大阪ニュースのをにはがで中文新闻한국어뉴스",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "אבגדהוזחטיכלמנסעפצקרשת",
    "กขคงจฉชซญดตถทนบปผพฟมยรลวสหอฮะาำิีึืุู่้๊๋",
    "🎉❤️👍🏽🇩🇪\u200d👩👨👧",
    "e\u0301\u0308\u0303\u0327ñü",
]


def test_subject_decodes_for_generated_titles() -> None:
    rng = random.Random(2047)  # fixed: a failure is reproducible from its seed and index
    for n in range(400):
        pools = rng.sample(POOLS, rng.randint(1, 4))
        words = [
            "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 14)))
            for _ in range(rng.randint(1, 40))
        ]
        title = (" " * rng.randint(1, 3)).join(words)
        try:
            assert_subject_reads(title)
        except AssertionError as exc:
            raise AssertionError(f"title {n}: {title!r}") from exc


# -- Date: when the message is sent, not when its issue was built -----------------------------


def test_date_is_when_the_message_is_built_and_the_message_id_is_stable() -> None:
    s = skeleton(rendered())
    first_id, first = s.build(recipient())
    again_id, _ = s.build(recipient())
    assert first_id == again_id
    stamped = parse(first)["Date"].datetime
    assert abs(stamped - datetime.now(UTC)) < timedelta(seconds=5)
    assert head_lines(first).count(f"Date: {format_datetime(stamped)}") == 1


def test_a_retry_of_an_issue_built_an_hour_ago_is_dated_now_with_the_same_message_id(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], smtp_port=port)
    box.rcpt_replies = {"bob@example.com": "451 4.7.1 Greylisted, try again later"}
    assert project.run("send-digest", "weekly").exit_code == 1
    config = load_config(project.config)
    # As far as the store knows, the issue was built an hour ago.
    hour_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with sqlite3.connect(config.database_url.removeprefix("sqlite:///")) as db:
        (payload,) = db.execute("SELECT payload FROM issues").fetchone()
        db.execute(
            "UPDATE issues SET created_at = ?, payload = ?",
            (hour_ago.isoformat(), json.dumps({**json.loads(payload), "date": hour_ago.isoformat()})),
        )
    db.close()
    with Store(config.database_url) as store:
        builder = IssueBuilder(RunContext(config, store), "weekly")
        (issue,) = store.unfinished_issues("weekly")
        earlier_id = builder.skeleton(issue).message_id("bob@example.com")

    box.rcpt_replies = {}
    assert project.run("send-digest", "weekly").exit_code == 0
    (retry,) = [m for m in box.parsed() if "bob@example.com" in str(m["To"])]
    assert abs(retry["Date"].datetime - datetime.now(UTC)) < timedelta(seconds=30)
    assert retry["Message-ID"] == earlier_id


# -- control characters never reach a header -------------------------------------------------

CONTROLS = ["\x1b", "\x07", "\x00", "\r", "\n", "\x85", "\u2028", "\x7f", "\x9b", "\t", "\x0b"]
NASTY = "a\x1b[31mred\x07 b\x00c\rSubject: x\nd\x85e\u2028f\x7fg\x9bh\ti\x0bj"


@pytest.mark.parametrize("plain", [True, False], ids=["ascii", "non-ascii"])
def test_control_characters_in_title_and_names_reach_no_header(plain: bool) -> None:
    text = NASTY if plain else NASTY + " Ünïcode 日本語"
    issue = RenderedIssue(f"Weekly: {text}", "<p>Hi</p>", "Hi\n", "NLx", [])
    s = Skeleton(
        issue,
        # Quoted, as a configuration would have to: parseaddr reads "[" and ":" as syntax.
        from_addr=f'"{text}" <news@example.net>',
        reply_to=f'"{text}" <reply@example.net>',
        list_id="weekly.example.net",
        list_name=text,
        id_seed="weekly:1",
    )
    _, data = s.build(recipient(name=text))
    head = data.split(b"\r\n\r\n", 1)[0]
    # Nothing but printable ASCII on the wire, each line ending in CRLF.
    assert all(0x20 <= b < 0x7F for b in head.replace(b"\r\n", b""))
    msg = parse(data)
    assert len(msg.get_all("Subject")) == 1
    assert msg.defects == []
    for name in ("Subject", "From", "Reply-To", "To", "List-Id"):
        decoded = [str(msg[name]), str(make_header(decode_header(raw_field(data, name))))]
        for value in decoded:
            assert not any(c in value for c in CONTROLS), (name, value)
            assert "red" in value and " j" in value, (name, value)


# -- Leading dots: a built message needs no SMTP dot-stuffing -----------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "<p>.starts with a dot</p>",
        "<pre>\n.\n..\n...\n.end</pre>",
        "<p>" + "x" * 74 + "\n." + "é" * 40 + "</p>",  # the dot's line must break, never mid-escape
        "<p>" + ". " * 200 + "</p>",
    ],
)
@pytest.mark.parametrize("name", ["Ann", ".Ann", "." + "=" * 60 + "\u00e9" * 30])
def test_no_line_of_a_built_message_starts_with_a_dot_and_the_text_is_unchanged(body: str, name: str) -> None:
    r = rendered(summary=body)
    values = {"email": "ann@example.com", "name": name, "unsubscribe_url": "https://u.example/x"}
    _, data = skeleton(r).build(Recipient("ann@example.com", name, values))
    lines = data.split(b"\r\n")
    assert not [line for line in lines if line.startswith(b".")]
    assert max(len(line) for line in lines) <= 998
    assert all(len(line) <= 76 for line in data.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))
    msg = parse(data)
    expected_html, expected_text = r.html, r.text
    for i, field in enumerate(r.fields):
        token = f"{r.prefix}F{i}E"
        expected_html = expected_html.replace(token, html.escape(values[field], quote=True))
        expected_text = expected_text.replace(token, values[field])
    assert msg.get_body(("html",)).get_content().replace("\r\n", "\n") == expected_html
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == expected_text
