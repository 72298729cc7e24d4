"""share.py: every snippet fits its network by that network's own count; links parse back."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest
import regex

from newsletter import share
from newsletter.share import (
    ELLIPSIS,
    NETWORKS,
    SUMMARY_FLOOR,
    add_utm,
    check_template,
    count,
    hashtags_from,
    share_links,
    snippet,
)

FAMILY = "👩‍👩‍👧"  # woman ZWJ woman ZWJ girl: five code points, one grapheme
FLAGS = "🇯🇵🇫🇷"  # two flags, four regional indicators
TECHNOLOGIST = "🧑🏽‍💻"  # skin tone plus ZWJ, newer than many emoji tables
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco. "
)
LINK = "https://blog.example.org/posts/2026/faster-builds?ref=feed"


def graphemes(text: str) -> list[str]:
    return regex.findall(r"\X", text)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --- Counting: known answers -------------------------------------------------------------------

# X values agree with twitter-text v3 (checked against the twitter-text-parser port, whose import
# fails on current setuptools) except the two newer emoji, which weigh 2 as every emoji does.
X_KNOWN = [
    ("a" * 280, 280),
    ("日" * 140, 280),
    ("", 0),
    ("https://example.com/" + "x" * 300, 23),
    ("https://x.co", 23),
    ("example.com", 23),
    ("x.com", 23),
    ("see example.com/path?q=1 now", 31),
    ("example.com.", 24),
    ("file.py", 23),
    ("node.js", 7),
    ("django.contrib.auth.middleware", 30),
    ("me@example.com", 14),
    ("ftp://example.com", 17),
    ("http://localhost:8000/xyz", 25),
    ("foo_bar.example.com", 27),
    ("これはexample.comです", 33),
    ("https://例え.jp/テスト", 29),
    ("(https://en.wikipedia.org/wiki/Foo_(bar))", 25),
    ("Read https://example.com/a?b=c, then example.org.", 59),
    ("a https://x.com b http://foo.bar/baz", 51),
    (FAMILY, 2),
    ("🇯🇵", 2),
    (FLAGS, 4),
    ("👍🏽", 2),
    ("1️⃣", 2),
    ("🏴󠁧󠁢󠁳󠁣󠁴󠁿", 2),
    (TECHNOLOGIST, 2),
    ("🐦‍🔥", 2),
    ("e\u0301", 1),
    ("Cafe\u0301", 4),
    ("Привет мир", 10),
    ("“quoted” — ok…", 15),
    ("a\r\nb", 3),
    ("#BuildSystems", 13),
]


@pytest.mark.parametrize(("text", "expected"), X_KNOWN, ids=[repr(t[:30]) for t, _ in X_KNOWN])
def test_x_weighted_count(text: str, expected: int) -> None:
    assert count("x", text) == expected


OTHER_KNOWN = [
    ("bluesky", FAMILY, 1),
    ("bluesky", FLAGS, 2),
    ("bluesky", "e\u0301", 1),
    ("bluesky", "日本語", 3),
    ("bluesky", "https://example.com/" + "x" * 100, 120),  # the visible link text counts
    ("mastodon", "a" * 500, 500),
    ("mastodon", "https://example.com/" + "x" * 300, 23),
    ("mastodon", "https://x.co", 23),  # a short link counts 23 too
    ("mastodon", "example.com", 11),  # no scheme, no link
    ("mastodon", "see https://a.io/x and https://b.io/y", 55),
    ("mastodon", FAMILY, 5),  # code points
    ("threads", FAMILY, 18),  # UTF-8 bytes
    ("threads", "🇯🇵", 8),
    ("threads", "日本", 2),
    ("linkedin", "😀", 2),  # UTF-16 code units
    ("reddit", "abc", 3),
    ("telegram", "👍🏽", 4),
]


@pytest.mark.parametrize(("network", "text", "expected"), OTHER_KNOWN)
def test_other_counts(network: str, text: str, expected: int) -> None:
    assert count(network, text) == expected


def test_unknown_network() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        count("myspace", "hi")
    with pytest.raises(ValueError, match="unknown network"):
        snippet("myspace", "t", "s", LINK)


# --- Hashtags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("categories", "expected"),
    [
        (["Build systems"], ["#BuildSystems"]),
        (["rust-lang", "snake_case", "Node.js"], ["#RustLang", "#SnakeCase", "#NodeJs"]),
        (["", "   ", "!!!", "2024", "3.14"], []),
        (["3D printing"], ["#3DPrinting"]),
        (["日本語", "Cafe\u0301"], ["#日本語", "#Café"]),
        (["#BuildSystems", "build systems", "Build Systems"], ["#BuildSystems"]),
        (["C++"], ["#C"]),
    ],
)
def test_hashtags_from(categories: list[str], expected: list[str]) -> None:
    assert hashtags_from(categories) == expected


# --- Snippets: the hard cases, on every network ------------------------------------------------


@dataclass
class Case:
    title: str = "Faster incremental builds"
    summary: str = LOREM
    link: str = LINK
    categories: list[str] = field(default_factory=lambda: ["Build systems", "Rust lang"])


CASES = {
    "short": Case(summary="One line."),
    "long title": Case(title="A remarkably long title about build caches " * 20),
    "long summary": Case(summary=LOREM * 60),
    "cjk": Case(
        title="日本語のタイトル" * 10,
        summary="日本語の本文です。ビルドが速くなりました。" * 300,
        link="https://例え.jp/記事",
        categories=["日本語", "技術"],
    ),
    "zwj families": Case(title=f"Families {FAMILY}", summary=FAMILY * 2000),
    "zwj with spaces": Case(summary=(FAMILY + " ") * 1000),
    "flags": Case(summary=FLAGS * 1000),
    "technologists": Case(summary=TECHNOLOGIST * 1000),
    "combining accents": Case(title="Cafe\u0301 " * 60, summary="Cre\u0300me bru\u0302le\u0301e " * 400),
    "no precomposed form": Case(summary="q\u0301" * 3000),
    "links in summary": Case(summary=("See https://example.com/" + "a" * 60 + " and example.org/x ") * 100),
    "link without scheme": Case(link="example.com/posts/1", summary=LOREM * 40),
    "categories with spaces": Case(
        summary=LOREM * 5,
        categories=[
            "Build systems",
            "Rust lang",
            "  ",
            "!!!",
            "2024",
            "Developer tools",
            "Performance tuning",
            "Continuous integration",
            "Release engineering",
        ],
    ),
}


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_snippet_fits_and_keeps_what_matters(network: str, case: Case) -> None:
    net = NETWORKS[network]
    text = snippet(network, case.title, case.summary, case.link, case.categories)

    # Measured by the network's own rule (Telegram also shows the link above the text).
    assert count(network, net.posted(text, case.link)) <= net.limit
    if network == "bluesky":
        assert len(graphemes(text)) <= 300
    assert text.strip()

    # The link survives whole wherever the template carries it.
    if "{link}" in net.template:
        assert case.link in text

    # Nothing was cut inside a grapheme cluster: every cluster out was a cluster in.
    tags = hashtags_from(case.categories)
    source = nfc(" ".join([case.title, case.summary, case.link, *tags]))
    assert set(graphemes(text)) <= set(graphemes(source)) | {ELLIPSIS, "\n"}

    # Hashtags are kept from the front, dropped from the end.
    kept = [word for word in text.split() if word in tags]
    assert kept == tags[: len(kept)]

    # A title or summary that lost its tail says so.
    whole_title = " ".join(nfc(case.title).split())
    if "{title}" in net.template and whole_title not in text:
        assert ELLIPSIS in text


def test_short_text_is_left_alone() -> None:
    text = snippet("x", "Title", "One line.", LINK, ["Build systems"])
    assert text == f"Title\n\nOne line.\n\n{LINK} #BuildSystems"
    assert ELLIPSIS not in text


def test_summary_is_cut_first_on_a_word_boundary() -> None:
    title = "Faster incremental builds"
    tags = ["#BuildSystems", "#RustLang"]
    text = snippet("x", title, LOREM * 5, LINK, ["Build systems", "Rust lang"])
    head, cut, tail = text.split("\n\n")
    assert head == title
    assert tail == f"{LINK} {' '.join(tags)}"
    assert cut.endswith(ELLIPSIS)
    kept = cut.removesuffix(ELLIPSIS)
    assert (LOREM * 5).startswith(kept)
    assert (LOREM * 5)[len(kept)] in " ,."  # ends where a word ended
    # It uses the room: no more than one word (plus the ellipsis) short of the limit.
    assert 280 - 16 <= count("x", text) <= 280


def test_hashtags_go_from_the_end_before_the_summary_goes_below_its_floor() -> None:
    categories = [f"Category number {n}" for n in range(1, 9)]
    all_tags = hashtags_from(categories)
    text = snippet("x", "A title of some length, " * 4, LOREM * 5, LINK, categories)
    assert count("x", text) <= 280
    _title, cut, tail = text.split("\n\n")
    kept = tail.split()[1:]
    assert 0 < len(kept) < len(all_tags)
    assert kept == all_tags[: len(kept)]
    assert len(cut) > SUMMARY_FLOOR


def test_title_is_cut_only_after_summary_and_hashtags_are_gone() -> None:
    title = "word " * 100
    text = snippet("x", title, LOREM, LINK, ["Build systems"])
    cut, link = text.split("\n\n")
    assert link == LINK
    assert cut.endswith("word" + ELLIPSIS)
    assert count("x", text) <= 280


@pytest.mark.parametrize("unit", [FAMILY, FLAGS, TECHNOLOGIST, "q\u0301", "日"])
@pytest.mark.parametrize("network", ["x", "bluesky", "mastodon", "threads", "linkedin"])
def test_cut_never_splits_a_grapheme(network: str, unit: str) -> None:
    text = snippet(network, "T", unit * (4000 // len(unit)), LINK)  # no spaces: cut between clusters
    _title, cut, link = text.split("\n\n")
    assert link == LINK
    body = cut.removesuffix(ELLIPSIS)
    assert cut.endswith(ELLIPSIS)
    assert body
    assert set(graphemes(body)) <= set(graphemes(unit))  # whole flags and families only
    assert count(network, text) <= NETWORKS[network].limit


def test_cjk_is_cut_between_characters_not_dropped() -> None:
    summary = "日本語の本文です。ビルドが速くなりました" * 50
    text = snippet("bluesky", "タイトル", summary, "https://例え.jp/記事")
    _title, cut, _link = text.split("\n\n")
    assert len(graphemes(text)) <= 300
    assert len(cut) > 200  # most of the room went to the summary, not to nothing


def test_nfc_before_counting_and_posting() -> None:
    text = snippet("x", "Cafe\u0301", "Cre\u0300me", LINK)
    assert text.startswith("Café\n\nCrème")
    assert count("x", "Cafe\u0301") == count("x", "Café") == 4


def test_mastodon_limit_is_per_instance() -> None:
    text = snippet("mastodon", "Title", LOREM * 10, LINK, ["Build systems"], limit=120)
    assert count("mastodon", text) <= 120
    assert LINK in text


def test_telegram_link_travels_above_the_text() -> None:
    text = snippet("telegram", "Title", LOREM * 100, LINK, ["Build systems"])
    assert LINK not in text
    assert count("telegram", f"{LINK}\n{text}") <= 4096
    assert text.endswith("#BuildSystems")


def test_reddit_gets_a_title() -> None:
    assert snippet("reddit", "Title", LOREM, LINK) == "Title"
    long = snippet("reddit", "word " * 200, LOREM, LINK)
    assert count("reddit", long) <= 300
    assert long.endswith(ELLIPSIS)


def test_link_that_cannot_fit_is_an_error() -> None:
    with pytest.raises(ValueError, match="link alone"):
        snippet("bluesky", "Title", "Summary", "https://example.com/" + "x" * 400)


LONG_LINK = "https://blog.example.org/" + "a-very-long-slug-" * 23  # 416 characters


def test_a_link_too_long_for_one_network_costs_that_network_only() -> None:
    with pytest.raises(share.LinkTooLong) as err:
        snippet("bluesky", "Title", "Summary", LONG_LINK)
    assert "too long for bluesky" in err.value.reason and "300" in err.value.reason
    links = share_links("Title", LONG_LINK, {}, mastodon_instance="mastodon.social")
    assert "bluesky" not in links
    # X and Mastodon count any link as 23; the others take it in url= or have room for it.
    assert {"x", "mastodon", "threads", "linkedin", "facebook", "reddit", "email"} <= set(links)
    assert LONG_LINK in parse(links["x"])[1]["text"][0]


# An untitled entry (a micro-post): its text is what there is to share.
MICRO = "Shipped the new build cache today: cold builds are twice as fast, warm ones barely notice. " * 6


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_an_untitled_entry_is_shared_by_its_summary(network: str) -> None:
    net = NETWORKS[network]
    text = snippet(network, "", MICRO, LINK, ["Build systems"])
    assert text.startswith("Shipped the new build cache today"), text
    assert count(network, net.posted(text, LINK)) <= net.limit
    if "{link}" in net.template:
        assert LINK in text


@pytest.mark.parametrize("template", ["{title}", "{title} {link}", "{title} — {link} {hashtags}"])
def test_title_only_templates_fall_back_to_the_summary(template: str) -> None:
    text = snippet("x", "  ", MICRO, LINK, ["Build systems"], template=template)
    assert text.startswith("Shipped the new build cache") and ELLIPSIS in text  # cut to fit
    assert count("x", text) <= 280
    # A titled entry keeps its title: the fallback is for untitled ones only.
    assert snippet("x", "Title", MICRO, LINK, template=template).startswith("Title")


def test_share_links_of_an_untitled_entry_carry_its_text() -> None:
    links = share_links("", LINK, {}, summary=MICRO)
    (title,) = parse(links["reddit"])[1]["title"]
    assert title.startswith("Shipped the new build cache") and count("reddit", title) <= 300
    mail = parse(links["email"])[1]
    assert mail["subject"][0].startswith("Shipped the new") and len(mail["subject"][0]) <= share.SUBJECT_MAX
    assert parse(links["x"])[1]["text"][0].startswith("Shipped the new build cache")


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_no_control_character_reaches_a_snippet(network: str) -> None:
    text = snippet(
        network,
        "Evil\x1b[31m title\x07\r\nInjected: yes",
        "Sum\x1b[2Jmary\x00 with \x9b1m C1 and \x85 NEL",
        "https://blog.test/x\r\nSet-Cookie: a=b",
        ["Tag\x1b[0m"],
    )
    # Line breaks between title, summary and link are the template's; nothing else may move
    # a cursor or start a line that was not there.
    assert not regex.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), repr(text)
    assert "\nInjected" not in text and "\nSet-Cookie" not in text


def test_custom_template() -> None:
    text = snippet(
        "x", "Title", LOREM, LINK, ["Build systems"], template="{title} — {link} {{via}} {hashtags}"
    )
    assert text == f"Title — {LINK} {{via}} #BuildSystems"


@pytest.mark.parametrize(
    "template", ["{title.__class__}", "{0}", "{}", "{title!r}", "{title:>10}", "{nope}", "{title", "}"]
)
def test_bad_templates(template: str) -> None:
    with pytest.raises(ValueError, match="snippet template"):
        check_template(template)
    with pytest.raises(ValueError, match="snippet template"):
        snippet("x", "Title", "Summary", LINK, template=template)


# --- Share-intent links ----------------------------------------------------------------------

TRICKY = f"Ünïcode & = ? # % + / {FAMILY}\nline two  with two spaces"
TRICKY_LINK = "https://example.com/a%20b?x=1&y=%2F#frag"
TEXTS = {name: f"{TRICKY} ({name})" for name in NETWORKS}


def parse(url: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else f"{parts.scheme}:{parts.path}"
    return base, parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)


@pytest.mark.parametrize(
    ("network", "base", "params"),
    [
        ("x", "https://twitter.com/intent/tweet", {"text": TEXTS["x"]}),
        ("bluesky", "https://bsky.app/intent/compose", {"text": TEXTS["bluesky"]}),
        ("threads", "https://www.threads.com/intent/post", {"text": TEXTS["threads"]}),
        ("linkedin", "https://www.linkedin.com/sharing/share-offsite/", {"url": TRICKY_LINK}),
        ("facebook", "https://www.facebook.com/sharer/sharer.php", {"u": TRICKY_LINK}),
        ("reddit", "https://www.reddit.com/submit", {"url": TRICKY_LINK, "title": TEXTS["reddit"]}),
        ("telegram", "https://t.me/share/url", {"url": TRICKY_LINK, "text": TEXTS["telegram"]}),
        ("whatsapp", "https://api.whatsapp.com/send", {"text": TEXTS["whatsapp"]}),
        ("email", "mailto:", {"subject": "A & B ? C", "body": TEXTS["email"]}),
        ("mastodon", "https://mastodon.social/share", {"text": TEXTS["mastodon"]}),
    ],
)
def test_share_links_parse_back(network: str, base: str, params: dict[str, str]) -> None:
    links = share_links("A & B ? C", TRICKY_LINK, TEXTS, mastodon_instance="mastodon.social")
    url = links[network]
    assert not regex.search(r"\s", url)
    assert parse(url) == (base, {key: [value] for key, value in params.items()})


@pytest.mark.parametrize(
    "instance",
    [
        "mastodon.social",
        " https://mastodon.social/ ",
        "MASTODON.social",
        "@me@mastodon.social",
        "mastodon.social/@me",
    ],
)
def test_mastodon_instance_forms(instance: str) -> None:
    url = share_links("T", LINK, {}, mastodon_instance=instance)["mastodon"]
    assert url.startswith("https://mastodon.social/share?text=")


@pytest.mark.parametrize("instance", ["localhost", "not a host", "https://", "a b.social"])
def test_bad_mastodon_instance(instance: str) -> None:
    with pytest.raises(ValueError, match="Mastodon server"):
        share_links("T", LINK, {}, mastodon_instance=instance)


def test_share_links_without_texts_fall_back_to_title_and_link() -> None:
    links = share_links("Title " * 100, LINK, {})
    assert "mastodon" not in links
    for network in ("x", "bluesky", "threads", "whatsapp"):
        (text,) = parse(links[network])[1]["text"]
        assert LINK in text
        assert count(network, text) <= NETWORKS[network].limit


# --- UTM -----------------------------------------------------------------------------------------

UTM = "utm_source=news&utm_medium=social&utm_campaign=weekly"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://ex.com/a", f"https://ex.com/a?{UTM}"),
        ("https://ex.com", f"https://ex.com?{UTM}"),
        ("https://ex.com/a?", f"https://ex.com/a?{UTM}"),
        ("https://ex.com/a?x=1", f"https://ex.com/a?x=1&{UTM}"),
        ("https://ex.com/a?x=1&", f"https://ex.com/a?x=1&{UTM}"),
        ("https://ex.com/a?flag", f"https://ex.com/a?flag&{UTM}"),
        ("https://ex.com/a?a=1&a=2", f"https://ex.com/a?a=1&a=2&{UTM}"),
        ("https://ex.com/a?q=a+b&p=%2F&e=", f"https://ex.com/a?q=a+b&p=%2F&e=&{UTM}"),
        ("https://ex.com/a?sig=AbC%3D%3D&exp=1", f"https://ex.com/a?sig=AbC%3D%3D&exp=1&{UTM}"),
        ("https://ex.com/a#frag", f"https://ex.com/a?{UTM}#frag"),
        ("https://ex.com/a?x=1#frag?y=2&z", f"https://ex.com/a?x=1&{UTM}#frag?y=2&z"),
        ("https://ex.com/a?#", f"https://ex.com/a?{UTM}#"),
        (
            "https://ex.com/a?utm_source=keep&utm_medium=",
            "https://ex.com/a?utm_source=keep&utm_medium=&utm_campaign=weekly",
        ),
        (
            "https://ex.com/a?utm%5Fsource=enc",
            "https://ex.com/a?utm%5Fsource=enc&utm_medium=social&utm_campaign=weekly",
        ),
        ("HTTP://EX.COM/a", f"HTTP://EX.COM/a?{UTM}"),
        # Every key already there: not one byte changes.
        (
            "https://ex.com/?utm_source=a&utm_medium=b&utm_campaign=c",
            "https://ex.com/?utm_source=a&utm_medium=b&utm_campaign=c",
        ),
        # Not http(s): left alone.
        ("mailto:me@ex.com?subject=x", "mailto:me@ex.com?subject=x"),
        ("/relative?x=1", "/relative?x=1"),
        ("relative/path", "relative/path"),
        ("//ex.com/a", "//ex.com/a"),
        ("ftp://ex.com/f", "ftp://ex.com/f"),
        ("#frag", "#frag"),
        ("", ""),
    ],
)
def test_add_utm(url: str, expected: str) -> None:
    assert add_utm(url, "news", "social", "weekly") == expected


def test_add_utm_encodes_values_and_keeps_their_case() -> None:
    url = add_utm("https://ex.com/a?x=1", "news letter", "social", "Spring a&b=c+d/é", content="hero image")
    assert url == (
        "https://ex.com/a?x=1&utm_source=news%20letter&utm_medium=social"
        "&utm_campaign=Spring%20a%26b%3Dc%2Bd%2F%C3%A9&utm_content=hero%20image"
    )
    params = parse_qs(urlsplit(url).query)
    assert params["utm_campaign"] == ["Spring a&b=c+d/é"]
    assert params["utm_source"] == ["news letter"]


def test_add_utm_skips_empty_values() -> None:
    assert add_utm("https://ex.com/", "news", "", "weekly", content="") == (
        "https://ex.com/?utm_source=news&utm_campaign=weekly"
    )


def test_the_config_checks_networks_against_share_without_importing_it_up_front() -> None:
    from newsletter.config import ShareSettings

    assert ShareSettings(networks=list(NETWORKS)).networks == list(NETWORKS)
    with pytest.raises(ValueError, match=r"unknown network\(s\) \['myspace'\]; known: x, mastodon, "):
        ShareSettings(networks=["x", "myspace"])
    # share's regexes cost time at import, which a configuration naming no networks must not pay.
    code = "import sys, newsletter.config; print('newsletter.share' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_top_level_domains_agree_with_the_public_suffix_list() -> None:
    # share reads only the one-label rules; it must answer as the whole list does, for every
    # label the list names, in Unicode, xn-- and upper case, and for names that are no TLD.
    from publicsuffixlist import PSLFILE, PublicSuffixList

    full = PublicSuffixList(only_icann=True, accept_unknown=False)
    labels = {"node", "js", "py", "local", "zz", "ＣＯＭ", "-"}
    with open(PSLFILE, encoding="utf-8") as rules:
        for line in rules:
            if line.strip() and not line.startswith("//"):
                labels.update(line.strip().lstrip("!*.").split("."))
    labels |= {label.encode("idna").decode("ascii") for label in labels if not label.isascii()}
    labels |= {label.upper() for label in labels}
    disagree = sorted(label for label in labels if share._is_tld(label) != full.is_public(label))
    assert disagree == []
    assert share._is_tld("com") and share._is_tld("xn--p1ai") and share._is_tld("рф")
    assert not share._is_tld("js")
