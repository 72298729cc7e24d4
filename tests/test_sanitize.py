"""Feed HTML on its way into an email: tracking pixels out, links that work in a mail client."""

from __future__ import annotations

import re

import pytest

from newsletter.sanitize import clean_html, one_line, printable

PIXEL = "https://track.example/open.gif?u=42"

# Each of these shows nothing to the reader and tells the sender the email was opened.
TRACKERS = {
    "display-none": f'<img src="{PIXEL}" style="display:none">',
    "display-none-spaced-caps": f'<img src="{PIXEL}" style="Display : NONE !important">',
    "visibility-hidden": f'<img src="{PIXEL}" style="visibility:hidden" width="300">',
    "visibility-collapse": f'<img src="{PIXEL}" style="border:0; visibility: collapse">',
    "opacity-0": f'<img src="{PIXEL}" style="opacity:0">',
    "opacity-0.0-after-others": f'<img src="{PIXEL}" style="border:0;opacity: 0.0;">',
    "opacity-0-percent": f'<img src="{PIXEL}" style="opacity:0%">',
    "style-width-1px": f'<img src="{PIXEL}" style="width:1px">',
    "style-height-0": f'<img src="{PIXEL}" style="height: 0" width="600">',
    "style-max-height-0": f'<img src="{PIXEL}" style="max-height:0px">',
    "style-single-quoted-with-quotes": f"<img src='{PIXEL}' style='font-family:\"a\";display:none'>",
    "hidden-attribute": f'<img src="{PIXEL}" hidden>',
    "display-none-behind-a-comment": f'<img src="{PIXEL}" style="display:/**/none">',
    "width-2": f'<img src="{PIXEL}" width="2" height="50">',
    "height-0": f'<img src="{PIXEL}" width="400" height="0">',
    "width-1px": f'<img src="{PIXEL}" width="1px">',
    "width-1-spaced": f'<img src="{PIXEL}" width=" 1 ">',
    "height-half-px": f'<img src="{PIXEL}" height="0.5px">',
    "1x1": f'<img src="{PIXEL}" width="1" height="1">',
    "uppercase": f'<IMG SRC="{PIXEL}" WIDTH="1" HEIGHT="1">',
    "protocol-relative": '<img src="//track.example/open.gif" style="display:none">',
    "style-hidden-behind-alt": f'<img alt=" width=" style="display:none" src="{PIXEL}">',
    "no-src": '<img alt="x" width="300">',
}


@pytest.mark.parametrize("tag", TRACKERS.values(), ids=TRACKERS.keys())
def test_tracking_images_are_dropped(tag: str) -> None:
    cleaned = clean_html(f"<p>Before {tag} after.</p>")
    assert "<img" not in cleaned.lower()
    assert "track.example" not in cleaned
    assert cleaned == "<p>Before  after.</p>"


# (feed HTML, the <img> that must come out)
IMAGES = {
    "plain": (
        '<img src="https://a.example/chart.png" alt="Chart">',
        '<img src="https://a.example/chart.png" alt="Chart">',
    ),
    "three-px-is-content": (
        '<img src="https://a.example/rule.png" width="3" height="3">',
        '<img src="https://a.example/rule.png" width="3" height="3">',
    ),
    "percent-width": (
        '<img src="https://a.example/w.png" width="100%" style="width:1%">',
        '<img src="https://a.example/w.png" width="100%">',
    ),
    "visible-style-is-dropped-image-kept": (
        '<img src="https://a.example/p.png" alt="Photo" style="border:0;opacity:1;display:block">',
        '<img src="https://a.example/p.png" alt="Photo">',
    ),
    "too-wide-loses-its-size": (
        '<img src="https://a.example/big.png" width="1200" height="800">',
        '<img src="https://a.example/big.png">',
    ),
    "protocol-relative-becomes-https": (
        '<img src="//cdn.example/p.png" alt="P" width="300">',
        '<img src="https://cdn.example/p.png" alt="P" width="300">',
    ),
    "alt-with-quotes-and-ampersands": (
        '<img alt=\'Q&A "live"\' src="https://a.example/q.png?x=1&y=2">',
        '<img alt="Q&amp;A &quot;live&quot;" src="https://a.example/q.png?x=1&amp;y=2">',
    ),
}


@pytest.mark.parametrize(("fragment", "expected"), IMAGES.values(), ids=IMAGES.keys())
def test_content_images_are_kept_without_style(fragment: str, expected: str) -> None:
    cleaned = clean_html(f"<p>{fragment}</p>")
    assert cleaned == f"<p>{expected}</p>"
    assert "style=" not in cleaned and "hidden" not in cleaned


LINKS = {
    "protocol-relative-link": ('<a href="//blog.example/post">x</a>', "https://blog.example/post"),
    "https-kept": ('<a href="https://blog.example/post">x</a>', "https://blog.example/post"),
    "http-kept": ('<a href="http://blog.example/post">x</a>', "http://blog.example/post"),
    "quote-cite": ('<blockquote cite="//blog.example/src">q</blockquote>', "https://blog.example/src"),
}


@pytest.mark.parametrize(("fragment", "url"), LINKS.values(), ids=LINKS.keys())
def test_links_resolve_in_a_mail_client(fragment: str, url: str) -> None:
    cleaned = clean_html(fragment)
    assert re.findall(r'(?:href|cite)="([^"]*)"', cleaned) == [url]


def test_javascript_links_lose_their_href() -> None:
    cleaned = clean_html('<a href="javascript:alert(1)">x</a><a href="//">y</a>')
    assert "javascript" not in cleaned and "https:///" not in cleaned


CONTROL = "\x00\x07\x1b\r\n\t\x0b\x0c\x7f\x85\x9b"


def test_printable_and_one_line_leave_no_control_character() -> None:
    text = f"a{CONTROL}b\u2028c\u2029d"
    assert not any(c in printable(text) for c in CONTROL)
    assert one_line(text) == "a b c d"


# Embeddings, overrides and isolates reorder what the reader sees ("Trojan Source").
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_bidi_overrides_cannot_reorder_a_title() -> None:
    title = "Invoice \u202egpj.exe\u202c paid"
    assert not any(c in one_line(title) for c in BIDI)
    assert not any(c in printable(f"x{BIDI}y") for c in BIDI)
    # The marks right-to-left text really uses stay.
    assert one_line("\u05e9\u05dc\u05d5\u05dd\u200f!") == "\u05e9\u05dc\u05d5\u05dd\u200f!"
