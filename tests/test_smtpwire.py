"""The pieces of the pipelined SMTP conversation: content on the wire, replies as read, what a
reply means. The conversation itself is tested against real servers in test_pipeline.py."""

from __future__ import annotations

import pytest

from newsletter.errors import PermanentFailure, TemporaryFailure
from newsletter.senders.smtpwire import ReplyReader, refusal, throttling, wire


@pytest.mark.parametrize(
    ("data", "dot_safe", "expected"),
    [
        (b"a\r\nb\r\n", True, b"a\r\nb\r\n"),
        (b"a\r\nb", False, b"a\r\nb\r\n"),  # the last line gets its CRLF
        (b"a\nb\n", False, b"a\r\nb\r\n"),  # bare LF: every line end becomes CRLF
        (b"a\rb", False, b"a\r\nb\r\n"),  # bare CR too
        (b".a\r\n", False, b"..a\r\n"),  # a leading dot is doubled
        (b"a\r\n.\r\nb\r\n", False, b"a\r\n..\r\nb\r\n"),  # a lone dot cannot end the data
        (b"a\n.\nb", False, b"a\r\n..\r\nb\r\n"),  # nor after bare line ends
        (b"a\r\n..b\r\n", False, b"a\r\n...b\r\n"),
        (b"a\r\nb", True, b"a\r\nb\r\n"),  # dot_safe but unterminated: scanned after all
    ],
)
def test_content_goes_on_the_wire_with_crlf_and_dot_stuffing(
    data: bytes, dot_safe: bool, expected: bytes
) -> None:
    assert wire(data, dot_safe) == expected


REPLIES = b"250 ok\r\n250-first\r\n250-second\r\n250 third\r\n354 go ahead\r\nxyz broken\r\n221 bye\r\n"
PARSED = [(250, b"ok"), (250, b"first\nsecond\nthird"), (354, b"go ahead"), (-1, b"broken"), (221, b"bye")]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, len(REPLIES)])
def test_replies_read_the_same_however_the_bytes_are_cut(size: int) -> None:
    reader, got = ReplyReader(), []
    for start in range(0, len(REPLIES), size):
        reader.feed(REPLIES[start : start + size])
        got += reader.take()
    assert got == PARSED


def test_a_reply_is_only_taken_once_its_last_line_is_complete() -> None:
    reader = ReplyReader()
    reader.feed(b"250-one\r\n250 tw")
    assert reader.take() == []
    reader.feed(b"o\r\n")
    assert reader.take() == [(250, b"one\ntwo")]


@pytest.mark.parametrize("data", [b"250 " + b"x" * 9000 + b"\r\n", b"250 " + b"x" * 9000])
def test_a_line_longer_than_any_server_writes_is_an_error(data: bytes) -> None:
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(ValueError, match="Line too long"):
        reader.take()


@pytest.mark.parametrize(
    ("code", "text", "slows_down"),
    [
        (454, b"4.7.0 Throttling failure: Maximum sending rate exceeded", True),  # Amazon SES
        (421, b"4.7.28 Our system has detected an unusual rate of unsolicited mail", True),  # Gmail
        (451, b"4.7.1 Rate limit exceeded, try again later", True),
        (452, b"4.5.3 Too many recipients", True),
        (452, b"4.2.2 Mailbox full", False),  # that reader's
        (421, b"4.7.0 Too many messages on this connection, closing", False),  # reconnect, same pace
        (450, b"4.2.0 Greylisted, slow down", False),  # 450 is about the mailbox
        (550, b"5.1.1 User unknown", False),
    ],
)
def test_which_replies_mean_slow_down(code: int, text: bytes, slows_down: bool) -> None:
    assert throttling(code, text) is slows_down


@pytest.mark.parametrize(
    ("code", "kind"),
    [(450, TemporaryFailure), (452, TemporaryFailure), (550, PermanentFailure), (554, PermanentFailure)],
)
def test_a_refusal_is_temporary_for_4xx_and_permanent_for_5xx(code: int, kind: type[Exception]) -> None:
    error = refusal(code, b"5.1.1 one\nline two")
    assert isinstance(error, kind)
    assert str(error) == f"{code} 5.1.1 one line two"  # one line for the ledger
