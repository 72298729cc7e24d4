"""Ready-to-post text and share links for social networks, and UTM tags for links.

Each network measures a post its own way (as the platforms document it):
X weighs characters and turns every link into 23, Mastodon counts code points and 23 per
link, Bluesky counts graphemes, Threads counts emoji as their UTF-8 bytes. ``snippet`` builds a
post from a template and cuts it until the network's own count says it fits; ``share_links``
turns those posts into share-intent URLs; ``add_utm`` tags a link without touching the rest of it.

Snippet templates are Python format strings that may use only ``{title}``, ``{summary}``,
``{link}`` and ``{hashtags}`` (literal braces are ``{{`` and ``}}``). No attribute access, indexing
or format specs: a template comes from a schedule file and is checked by ``check_template``.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from string import Formatter
from urllib.parse import quote, unquote_plus, urlsplit

import regex
from publicsuffixlist import PSLFILE

from .sanitize import one_line

ELLIPSIS = "…"
# A subject (mailto:) made from an untitled entry's text: about what a mail client shows.
SUBJECT_MAX = 70
URL_WEIGHT = 23  # X wraps every link in a 23-character t.co link; Mastodon reserves 23 per link
DEFAULT_TEMPLATE = "{title}\n\n{summary}\n\n{link} {hashtags}"
TEMPLATE_FIELDS = frozenset({"title", "summary", "link", "hashtags"})
# Hashtags are given up (from the end) only once the summary would keep fewer characters than this.
SUMMARY_FLOOR = 60

_GRAPHEME = regex.compile(r"\X")
# A grapheme cluster with any of these is an emoji: pictographs and their ZWJ sequences, flags
# (regional-indicator pairs, tag sequences), keycaps. Newer emoji are covered by the regex
# package's Unicode data, not by a list frozen in some year.
_EMOJI = regex.compile(r"\p{Extended_Pictographic}|\p{Regional_Indicator}|\u20e3")
_EMOJI_START = regex.compile(r"(?=[\p{Extended_Pictographic}\p{Regional_Indicator}0-9#*])\X")  # keycaps: 1️⃣


# --- Links as twitter-text finds them (X, and Mastodon, which reuses twitter-text's regexes) ---

# Characters a domain label may hold: anything but spaces, ASCII punctuation and invisible marks.
_DC = (
    r"[^\s!#$%&'()*+,\-./:;<=>?@\[\\\]^_{|}~\x85\xa0\u1680\u180e\u2000-\u200a\u2028\u2029\u202f"
    r"\u205f\u3000\ufeff\ufffe\uffff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_LABEL = rf"{_DC}(?:{_DC}|[_-]){{0,62}}+"  # at most 63 characters, which also keeps the scan linear
_CANDIDATE = regex.compile(
    # As in twitter-text, a link follows the start of the text or a character that is no ASCII
    # letter or digit, @, $ or #; the regex takes that character, so "éexample.com" links from "e".
    rf"(?:[^a-z0-9@＠$#＃\ufeff\ufffe\uffff]|^)(?P<scheme>https?://)?(?P<domain>{_LABEL}(?:\.{_LABEL}){{1,126}}+)",
    regex.IGNORECASE,
)
# Without a scheme only names in Latin letters are links (twitter-text's "ASCII domains").
_LATIN = r"a-z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0300-\u036f\u1e00-\u1eff"
_LATIN_NAME = regex.compile(rf"(?:[{_LATIN}-]+\.)+(?:{_DC}|-)+", regex.IGNORECASE)
_AFTER_TLD = re.compile(r"[0-9a-zA-Z@+-]")  # may not follow a top-level domain
_PATH_CHAR = rf"[{_LATIN}\u0400-\u04ff!*';:=+,.$/%#\[\]\-\u2013_~@|&]"
_PARENS = rf"\({_PATH_CHAR}+\)"  # wiki-style /Foo_(bar) stays in the link
_URL_TAIL = regex.compile(
    rf"""
    (?::[0-9]+)?
    (?P<path>/(?:(?:{_PATH_CHAR}|{_PARENS})*(?:[{_LATIN}\u0400-\u04ff=_\#/+\-]|{_PARENS}))?)?
    (?:\?[a-z0-9!?*'@();:&=+$/%\#\[\]\-_.,~|]*[a-z0-9\-_&=\#/])?
    """,
    regex.IGNORECASE | regex.VERBOSE,
)


_TLD_LABEL = regex.compile(rf"(?:{_DC}|-){{1,63}}")
_MAX_NAME = 253  # the longest DNS name: a longer run of labels is not one link


def _is_tld(label: str) -> bool:
    # Only names under a real top-level domain are links: node.js is text, file.py is a link.
    return label.lower() in _top_level_domains()


@cache
def _top_level_domains() -> frozenset[str]:
    """The ICANN top-level domains, as Unicode and as xn--, from the list publicsuffixlist ships
    (nothing is fetched). Only one-label rules matter here, and reading just those takes a few
    ms where building a whole PublicSuffixList takes 70 to 150 (tests check both agree)."""
    found: set[str] = set()
    icann = False
    with open(PSLFILE, encoding="utf-8") as rules:
        for line in rules:
            if line.startswith("// ===BEGIN ICANN"):
                icann = True
            elif line.startswith("// ===END ICANN"):
                break
            elif icann and line[:1] not in ("/", "\n", " ", "\t"):
                label = line.strip().lstrip("!*.")  # *.ck: ck is a top-level domain too
                if label and "." not in label:
                    found.add(label)
                    found.add(label.encode("idna").decode("ascii"))
    return frozenset(found)


def _tld_ends(text: str) -> dict[int, int]:
    """Dot position -> end of the top-level domain right after it, for each dot that has one.
    A TLD is followed by no ASCII letter, digit, @, + or - ("example.comです" holds one)."""
    ends = {}
    for dot in (m.start() for m in re.finditer(r"\.", text)):
        if label := _TLD_LABEL.match(text, dot + 1):
            for stop in range(label.end(), dot + 1, -1):
                if not _AFTER_TLD.match(text, stop) and _is_tld(text[dot + 1 : stop]):
                    ends[dot] = stop
                    break
    return ends


def _name_end(text: str, start: int, end: int, tlds: dict[int, int], dots: list[int], strict: bool) -> int:
    """End of the longest name in text[start:end] that ends in a top-level domain, or 0.
    strict (twitter-text's domain rule): labels start and end with neither - nor _, and the one
    before the TLD has no _ at all. Without it, any run of Latin labels will do."""
    for dot in reversed(dots[bisect_right(dots, start) : bisect_left(dots, min(end, start + _MAX_NAME))]):
        labels = text[start:dot].split(".")
        if not strict or (
            "_" not in labels[-1] and all(label[0] not in "-_" and label[-1] not in "-_" for label in labels)
        ):
            return tlds[dot]
    return 0


def _url_spans(text: str, bare: bool = True) -> Iterator[tuple[int, int]]:
    """(start, end) of each link in text as twitter-text v3 finds them; with bare=False only those
    that spell out http(s)://, as Mastodon does."""
    tlds = _tld_ends(text)
    dots = sorted(tlds)
    pos = 0
    while dots and (match := _CANDIDATE.search(text, pos)):
        start = match.start("scheme") if match["scheme"] else match.start("domain")
        domain_end = _name_end(text, match.start("domain"), match.end(), tlds, dots, strict=True)
        if not domain_end:
            # As a regex would, try again further on, but only where a name could end in a TLD.
            i = bisect_right(dots, match.start())
            if i == len(dots):
                return
            pos = max(match.start() + 1, dots[i] - _MAX_NAME - 1)
            continue
        tail = _URL_TAIL.match(text, domain_end)
        pos = tail.end()
        if match["scheme"]:
            yield start, tail.end()
        elif bare and text[start - 1 : start] not in ("-", "_", ".", "/"):
            names = list(_latin_names(text, start, domain_end, tlds, dots))
            # Every Latin name in the run is a link; the path goes to the last one. twitter-text
            # then skips as many characters as that name and the path hold, no more.
            for i, (name_start, name_end) in enumerate(names):
                path = tail.end() - domain_end if tail["path"] and i == len(names) - 1 else 0
                yield name_start, name_end + path


def _latin_names(
    text: str, start: int, end: int, tlds: dict[int, int], dots: list[int]
) -> Iterator[tuple[int, int]]:
    pos = start
    while name := _LATIN_NAME.search(text, pos, end):
        if stop := _name_end(text, name.start(), name.end(), tlds, dots, strict=False):
            yield name.start(), stop
            pos = stop
        else:
            pos = name.start() + 1


# --- Counting, one rule per network -----------------------------------------------------------

# twitter-text v3: a code point weighs 1 in these ranges (Latin, Greek, Cyrillic, Hebrew, Arabic,
# Devanagari..., general punctuation), 2 anywhere else (CJK, emoji).
_X_HEAVY = regex.compile(r"[^\u0000-\u10ff\u2000-\u200d\u2010-\u201f\u2032-\u2037]")


def _emoji_clusters(text: str) -> list[str]:
    return [c for c in _EMOJI_START.findall(text) if _EMOJI.search(c)]


def _x_plain(text: str) -> int:
    total = len(text) + len(_X_HEAVY.findall(text))
    for cluster in _emoji_clusters(text):
        # A whole emoji sequence (a family, a flag, a skin tone) weighs 2 in all.
        total += 2 - len(cluster) - len(_X_HEAVY.findall(cluster))
    return total


def _x_count(text: str) -> int:
    """twitter-text v3 weighted length: NFC first, every link 23, emoji 2, CJK and the like 2."""
    text = re.sub(r"\r\n?", "\n", unicodedata.normalize("NFC", text))
    total = pos = 0
    for start, end in _url_spans(text):
        total += _x_plain(text[pos:start]) + URL_WEIGHT
        pos = end
    return total + _x_plain(text[pos:])


def _mastodon_count(text: str) -> int:
    """Code points, except that each http(s) link counts 23 however long or short it is."""
    total = pos = 0
    for start, end in _url_spans(text, bare=False):
        total += (start - pos) + URL_WEIGHT
        pos = end
    return total + len(text) - pos


def _graphemes(text: str) -> int:
    return len(_GRAPHEME.findall(text))


def _threads_count(text: str) -> int:
    # Threads counts an emoji as its UTF-8 bytes (a family is 18); we count the rest as code points.
    return len(text) + sum(len(c.encode()) - len(c) for c in _emoji_clusters(text))


def _utf16(text: str) -> int:
    # Where a network documents no rule, count what a browser's maxlength counts: UTF-16 code
    # units, never fewer than code points or graphemes.
    return len(text.encode("utf-16-le")) // 2


def _mailto_length(text: str) -> int:
    # The body travels inside a mailto: URL, and that URL's length is what clients trip over.
    return len(quote(text, safe=""))


@dataclass(frozen=True)
class Network:
    name: str  # as in the configuration's share.networks
    label: str  # as readers see it in an issue's share line
    limit: int
    count: Callable[[str], int]
    template: str = DEFAULT_TEMPLATE
    # Telegram's share link carries the link in its own parameter and shows it above the text,
    # so its template leaves {link} out and the link still counts toward the limit.
    link_above: bool = False

    def posted(self, text: str, link: str) -> str:
        """What the network will actually hold once the share link has been followed."""
        return f"{link}\n{text}" if self.link_above else text


# Every network there is: the configuration checks share.networks against these names.
NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("x", "X", 280, _x_count),
        Network("mastodon", "Mastodon", 500, _mastodon_count),  # per server: pass limit= for others
        Network("bluesky", "Bluesky", 300, _graphemes),
        Network("threads", "Threads", 500, _threads_count),
        Network("linkedin", "LinkedIn", 3000, _utf16),
        # A post title; the link goes in url=.
        Network("reddit", "Reddit", 300, _utf16, template="{title}"),
        Network(
            "telegram",
            "Telegram",
            4096,
            _utf16,
            template="{title}\n\n{summary}\n\n{hashtags}",
            link_above=True,
        ),
        # No hard limit for these three. Facebook's sharer takes only the link (the text is for the
        # reader to paste) and a post may hold 63,206 characters; WhatsApp documents none, its apps
        # stop at 65,536; mail has none, but mailto: URLs much past 2,000 characters get cut.
        Network("facebook", "Facebook", 63206, _utf16),
        Network("whatsapp", "WhatsApp", 65536, _utf16, template="{title}\n\n{summary}\n\n{link}"),
        # The title is the mail's subject.
        Network("email", "Email", 1800, _mailto_length, template="{summary}\n\n{link}"),
    )
}


def _network(name: str) -> Network:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}") from None


class LinkTooLong(ValueError):
    """The link alone is over the network's limit: no text for that network can hold it."""

    def __init__(self, network: str, limit: int, used: int, link: str) -> None:
        super().__init__(f"{network}: the link alone does not fit in {limit}: {link}")
        self.network, self.limit, self.used, self.link = network, limit, used, link

    @property
    def reason(self) -> str:
        """For a person: what is wrong, without repeating the (long) link."""
        return (
            f"the link is too long for {self.network}: it counts {self.used} there,"
            f" over the limit of {self.limit}, so no {self.network} text can carry it"
        )


def count(network: str, text: str) -> int:
    """Length of text as the network measures it (for Telegram: without the link above it)."""
    return _network(network).count(text)


# --- Hashtags and templates ----------------------------------------------------------------------

_NOT_TAG = regex.compile(r"[^\p{L}\p{M}\p{N}]+")
_LETTER = regex.compile(r"\p{L}")


def hashtags_from(categories: Iterable[str]) -> list[str]:
    """'Build systems' -> '#BuildSystems'. Drops tags with no letter left in them (no network links
    '#2024'), and repeats; '#BuildSystems' itself passes through unchanged."""
    tags: list[str] = []
    seen: set[str] = set()
    for category in categories:
        words = _NOT_TAG.split(unicodedata.normalize("NFC", category))
        tag = "".join(w[:1].upper() + w[1:] for w in words)
        if _LETTER.search(tag) and tag.casefold() not in seen:
            seen.add(tag.casefold())
            tags.append("#" + tag)
    return tags


def check_template(template: str) -> None:
    """Raise ValueError unless template uses only the four plain fields."""
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"snippet template {template!r}: {exc}") from None
    for _literal, field, spec, conversion in parts:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            raise ValueError(
                f"snippet template {template!r}: {{{field}}} is not one of "
                + ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )


def _render(template: str, title: str, summary: str, link: str, tags: Sequence[str]) -> str:
    text = template.format(title=title, summary=summary, link=link, hashtags=" ".join(tags))
    # An empty field leaves blank lines or a trailing space behind; neither should cost anything.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- Cutting -------------------------------------------------------------------------------------

# Scripts written without spaces: a cut may fall between any two of their characters.
_NO_SPACE = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\u3000-\u303f\uff00-\uffef]")
_TRAILING = " \t,.;:-–—、。，"


def _cut_points(text: str) -> list[int]:
    """Where text may be cut, in order: word boundaries (or between CJK characters), never inside
    a grapheme cluster. Only the first word may be cut anywhere, for a run with no boundary at all."""
    inner = [m.end() for m in _GRAPHEME.finditer(text)][:-1]
    words = [
        p for p in inner if text[p].isspace() or _NO_SPACE.match(text[p - 1]) or _NO_SPACE.match(text[p])
    ]
    first_word = words[0] if words else len(text)
    # A cut must leave something besides spaces and punctuation before the ellipsis.
    first_char = len(text) - len(text.lstrip(_TRAILING))
    return [p for p in inner if first_char < p < first_word] + [p for p in words if p > first_char]


def _shorten(text: str, cut: int) -> str:
    """text up to cut, marked with an ellipsis; the whole text at len(text), nothing at 0."""
    if cut >= len(text) or cut == 0:
        return text[:cut]
    return text[:cut].rstrip(_TRAILING) + ELLIPSIS


def _longest(cuts: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The longest of the cuts (in increasing order) that fits, by binary search.

    A count is not always monotonic (a cut can turn a link back into plain text), but whatever
    this returns has been measured and fits.
    """
    best, lo, hi = None, 0, len(cuts) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return best


def snippet(
    network: str,
    title: str,
    summary: str,
    link: str,
    hashtags: Iterable[str] = (),
    template: str | None = None,
    limit: int | None = None,
) -> str:
    """Ready-to-post text for one article that fits the network's limit by its own count.

    hashtags are categories or tags (see hashtags_from). When the text is too long: the summary
    is cut first, down to about SUMMARY_FLOOR characters; then hashtags go from the end; then the
    rest of the summary; then the title. Cuts fall on word boundaries and end in an ellipsis; a
    summary left out whole leaves no mark. The link is never cut: if it cannot fit on its own,
    LinkTooLong (a ValueError).

    An untitled entry (a micro-post) is its summary: a template with {title} but no {summary}
    (Reddit's, a user's "{title} {link}") shows the summary there, cut like a summary.
    """
    net = _network(network)
    template = net.template if template is None else template
    check_template(template)
    limit = net.limit if limit is None else limit
    title, summary = (one_line(unicodedata.normalize("NFC", s)) for s in (title, summary))
    # one_line, not strip: a CR/LF or ESC in a link must not reach the post as a control character.
    link = one_line(link)
    tags = hashtags_from(hashtags)
    fields = {f for _literal, f, _spec, _conv in Formatter().parse(template) if f}
    summary_as_title = not title and "title" in fields and "summary" not in fields

    def text(title: str, summary: str, n_tags: int) -> str:
        if summary_as_title:
            title, summary = summary, ""
        return _render(template, title, summary, link, tags[:n_tags])

    def fits(candidate: str) -> bool:
        return net.count(net.posted(candidate, link)) <= limit

    def summary_fits(n_tags: int) -> Callable[[int], bool]:
        return lambda cut: fits(text(title, _shorten(summary, cut), n_tags))

    cuts = _cut_points(summary)
    floor = min(SUMMARY_FLOOR, len(summary))
    for n_tags in range(len(tags), -1, -1):
        # With hashtags still in, the summary keeps its opening words; without, it may go.
        options = [c for c in cuts if c > floor] if n_tags else [0, *cuts]
        best = _longest([*options, len(summary)], summary_fits(n_tags))
        if best is not None:
            return text(title, _shorten(summary, best), n_tags)

    cut = _longest([0, *_cut_points(title)], lambda cut: fits(text(_shorten(title, cut), "", 0)))
    if cut is None:
        raise LinkTooLong(network, limit, net.count(net.posted(text("", "", 0), link)), link)
    return text(_shorten(title, cut), "", 0)


def headline(title: str, summary: str, limit: int = SUBJECT_MAX) -> str:
    """The title, or for an untitled entry its summary cut to ``limit`` characters (a subject)."""
    if one_line(title):
        return one_line(title)
    return snippet("reddit", "", summary, "", template="{title}", limit=limit)


# --- Share-intent links --------------------------------------------------------------------------


def _intent(base: str, **params: str) -> str:
    # safe="" so that & = ? # + / and line breaks in the text cannot end a parameter early.
    return base + "?" + "&".join(f"{key}={quote(value, safe='')}" for key, value in params.items())


def _mastodon_host(instance: str) -> str:
    """'mastodon.social', 'https://mastodon.social/' or '@me@mastodon.social' -> the server's host."""
    value = instance.strip()
    parts = urlsplit(value if "//" in value else "//" + value)
    host = parts.hostname or ""
    if not regex.fullmatch(r"[\w-]+(\.[\w-]+)+", host):
        raise ValueError(f"not a Mastodon server: {instance!r}")
    return f"{host}:{parts.port}" if parts.port else host


def share_link(
    network: str,
    title: str,
    link: str,
    text: str | None = None,
    mastodon_instance: str | None = None,
    summary: str = "",
) -> str | None:
    """One network's share-intent URL; None for Mastodon without the readers' server.

    X, Threads, Bluesky, Mastodon and WhatsApp get the whole snippet as text=, since it already
    holds the link and hashtags (X and Threads would add url= and hashtags= a second time).
    LinkedIn and Facebook take only the link. Without text, the title and link make one; with
    no title, the summary stands in for it (and for the mail subject). LinkTooLong when the
    link cannot fit the network's text at all.
    """
    if network in ("linkedin", "facebook"):
        return _intent(
            "https://www.linkedin.com/sharing/share-offsite/"
            if network == "linkedin"
            else "https://www.facebook.com/sharer/sharer.php",
            **({"url": link} if network == "linkedin" else {"u": link}),
        )
    if network == "mastodon" and not mastodon_instance:
        return None
    body = text if text is not None else snippet(network, title, "" if one_line(title) else summary, link)
    if network == "x":
        return _intent("https://twitter.com/intent/tweet", text=body)
    if network == "bluesky":
        return _intent("https://bsky.app/intent/compose", text=body)
    if network == "threads":
        return _intent("https://www.threads.com/intent/post", text=body)
    if network == "reddit":
        return _intent("https://www.reddit.com/submit", url=link, title=body)
    if network == "telegram":
        return _intent("https://t.me/share/url", url=link, text=body)
    if network == "whatsapp":
        return _intent("https://api.whatsapp.com/send", text=body)
    if network == "email":
        return _intent("mailto:", subject=headline(title, summary), body=body)
    if network == "mastodon":
        assert mastodon_instance
        return _intent(f"https://{_mastodon_host(mastodon_instance)}/share", text=body)
    raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")


def share_links(
    title: str,
    link: str,
    text_by_network: Mapping[str, str],
    mastodon_instance: str | None = None,
    summary: str = "",
) -> dict[str, str]:
    """Share-intent URL per network (see share_link), for the texts snippet() made for each.

    A network missing from text_by_network gets the title and link. Mastodon is left out
    without mastodon_instance, and so is a network whose limit the link alone exceeds.
    """
    links = {}
    for network in NETWORKS:
        try:
            url = share_link(network, title, link, text_by_network.get(network), mastodon_instance, summary)
        except LinkTooLong:
            continue
        if url is not None:
            links[network] = url
    return links


# --- UTM -----------------------------------------------------------------------------------------


def add_utm(url: str, source: str, medium: str, campaign: str, content: str | None = None) -> str:
    """Append utm_* keys the URL does not have yet, leaving everything already there as it was.

    The query is kept byte for byte: re-encoding it (parse_qsl/urlencode) turns `flag` into
    `flag=` and `+` into `%20`, which breaks signed URLs. Keys already present (even empty) are not
    overwritten; empty or None values add nothing. Only http(s) URLs are touched.
    """
    if not re.match(r"https?://", url, re.IGNORECASE):
        return url
    rest, hash_mark, fragment = url.partition("#")
    base, _, query = rest.partition("?")
    present = {unquote_plus(pair.partition("=")[0]) for pair in query.split("&")}
    wanted = {"utm_source": source, "utm_medium": medium, "utm_campaign": campaign, "utm_content": content}
    added = [
        f"{key}={quote(value, safe='')}" for key, value in wanted.items() if value and key not in present
    ]
    if not added:
        return url
    joiner = "&" if query and not query.endswith("&") else ""
    return f"{base}?{query}{joiner}{'&'.join(added)}{hash_mark}{fragment}"
