"""Feed HTML is untrusted: clean it before any template sees it, and derive plain text from it."""

from __future__ import annotations

import html
import re

import nh3

# Layout and media tags that make no sense inside an email, or that clients mangle.
_DROP = {"area", "map", "nav", "details", "summary", "header", "footer", "article", "aside"}
TAGS = set(nh3.ALLOWED_TAGS) - _DROP
ATTRIBUTES = {
    "a": {"href", "title"},
    # style and hidden only get past nh3 so that _fix_image can see an image is hidden; it
    # removes both from every image it keeps.
    "img": {"src", "alt", "width", "height", "title", "style", "hidden"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
    "ol": {"start"},
    "blockquote": {"cite"},
}
URL_SCHEMES = {"http", "https", "mailto"}
MAX_IMAGE_WIDTH = 560  # the 600 px column less its padding
TRACKER_PX = 2  # an image this small in either direction shows nothing: it counts an open

_IMG = re.compile(r"<img\b[^>]*>", re.I)
_ATTR = re.compile(r'\s+([^\s"=/>]+)(?:="([^"]*)")?')
_LENGTH = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(px)?", re.I)
# A mail client has no page to resolve //host/path against; some make it file://host/path.
_SCHEMELESS = re.compile(r'(\s(?:href|src|cite)=")//(?=[^/"])', re.I)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_BLOCK = re.compile(r"<(/?)(p|div|br|li|h[1-6]|tr|td|th|blockquote|pre|ul|ol|table)\b", re.I)


def _tiny(length: str) -> bool:
    """``1``, ``2px``, ``0.5px``: at most TRACKER_PX pixels (percentages and ems are not)."""
    m = _LENGTH.fullmatch(length.strip())
    return m is not None and float(m.group(1)) <= TRACKER_PX


def _hidden_by(style: str) -> bool:
    declarations: dict[str, str] = {}
    # CSS comments may sit anywhere a space may ("display:/**/none").
    for declaration in _CSS_COMMENT.sub(" ", html.unescape(style)).split(";"):
        key, _, value = declaration.partition(":")
        declarations[key.strip().lower()] = value.lower().replace("!important", "").strip()
    opacity = declarations.get("opacity", "1").rstrip("%")
    try:
        faint = float(opacity) < 0.1
    except ValueError:
        faint = False
    return (
        faint
        or declarations.get("display") == "none"
        or declarations.get("visibility") in ("hidden", "collapse")
        or any(_tiny(declarations.get(k, "")) for k in ("width", "height", "max-width", "max-height"))
    )


def _fix_image(match: re.Match[str]) -> str:
    # Attribute by attribute from the left, so text inside one value (alt=" width=") is never
    # read as another attribute.
    found = [(k.lower(), v) for k, v in _ATTR.findall(match.group(0)[4:])]
    attrs = dict(found)
    if not attrs.get("src"):
        return ""
    # A pixel-sized or invisible image carries no content: it is a tracking pixel.
    if _tiny(attrs.get("width", "")) or _tiny(attrs.get("height", "")):
        return ""
    if "hidden" in attrs or _hidden_by(attrs.get("style", "")):
        return ""
    drop = {"style", "hidden"}
    width = attrs.get("width", "").strip().removesuffix("px")
    if width.isdigit() and int(width) > MAX_IMAGE_WIDTH:
        # Outlook honours width attributes over CSS: a wide one would burst the column.
        drop |= {"width", "height"}
    return "<img" + "".join(f' {k}="{v}"' for k, v in found if k not in drop) + ">"


def clean_html(fragment: str) -> str:
    """Strip everything that could run, submit, frame or track; keep the prose and links."""
    cleaned = nh3.clean(
        fragment,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer",
        strip_comments=True,
    )
    cleaned = _SCHEMELESS.sub(r"\1https://", cleaned)
    # nh3 serialises attributes with double quotes, so this pattern sees every img it left.
    return _IMG.sub(_fix_image, cleaned).strip()


def html_to_text(fragment: str) -> str:
    """Readable one-paragraph text of a feed fragment (scripts and styles dropped, not shown)."""
    spaced = _BLOCK.sub(r" <\1\2", fragment)
    text = html.unescape(nh3.clean(spaced, tags=set()))
    return " ".join(text.split())


def web_link(url: str) -> str:
    """An http(s) URL as it is, anything else (javascript:, data:, file:) as ""."""
    url = url.strip()
    return url if re.match(r"https?://[^\s/]", url, re.I) and not re.search(r"[\s\x00-\x1f]", url) else ""


# C0 controls, DEL and C1 controls: ESC starts terminal escape sequences, BEL rings, NUL
# truncates C strings. Feed text has no business carrying any of them.
# Also the bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069): they make text
# read differently from what it is ("Trojan Source"), in a Subject, a terminal or a log line.
# The marks RTL writing really uses (U+200E/U+200F) stay.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: str) -> str:
    """``value`` with every control character (CR and LF included, and the bidi overrides)
    turned into a space.

    Use it on untrusted text bound for a terminal or a log line: nothing in it can move the
    cursor, recolour the screen or start a new line that looks like one of ours.
    """
    # isprintable() is false for every control, format and line-separator character: the
    # common clean value (a title, a name, per message) skips the regex.
    return value if value.isprintable() else _CONTROL.sub(" ", value)


def one_line(value: str) -> str:
    """For anything that may end up in a header: no line breaks and no control characters."""
    return " ".join(printable(value).split())


def excerpt(text: str, limit: int) -> str:
    """Cut on a word boundary and mark the cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(" ,.;:-")
    return cut + "…"
