"""Unsubscribe tokens: readable by any itsdangerous serializer with the secret, and by no one without."""

from __future__ import annotations

import pytest
from itsdangerous import URLSafeTimedSerializer

from newsletter.tokens import SALT, TokenError, UnsubscribeTokens


def test_a_token_names_the_list_and_the_lower_cased_address() -> None:
    tokens = UnsubscribeTokens("s3cret")
    token = tokens.make("weekly", "Ann@Example.com")
    assert tokens.read(token) == ("weekly", "ann@example.com")
    # Links already in inboxes were signed by a stock serializer; the key is the same.
    assert URLSafeTimedSerializer("s3cret", salt=SALT).loads(token) == ["weekly", "ann@example.com"]
    old = URLSafeTimedSerializer("s3cret", salt=SALT).dumps(["weekly", "bob@example.org"])
    assert tokens.read(old) == ("weekly", "bob@example.org")


def test_a_token_signed_with_another_secret_or_altered_is_refused() -> None:
    token = UnsubscribeTokens("s3cret").make("weekly", "ann@example.com")
    with pytest.raises(TokenError, match="not valid"):
        UnsubscribeTokens("other").read(token)
    with pytest.raises(TokenError, match="not valid"):
        UnsubscribeTokens("s3cret").read(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))


def test_an_old_token_expires() -> None:
    tokens = UnsubscribeTokens("s3cret")
    token = tokens.make("weekly", "ann@example.com")
    assert tokens.read(token, max_age_days=1) == ("weekly", "ann@example.com")
    with pytest.raises(TokenError, match="expired"):
        tokens.read(token, max_age_days=-1)


@pytest.mark.parametrize(
    ("list_name", "address"),
    [
        ("weekly", "ann@example.com"),
        ("weekly", "Ann.Smith+news@Example.COM"),
        ("Café list", "zoë@exämple.org"),  # non-ASCII: raw UTF-8 in the JSON, as the serializer writes it
        ('odd "quoted" \\ list', "o'brien@example.net"),
    ],
)
def test_a_token_is_what_a_stock_serializer_makes_of_the_same_payload(
    list_name: str, address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setattr(time, "time", lambda: 1_764_000_000.75)
    stock = URLSafeTimedSerializer("s3cret", salt=SALT).dumps([list_name, address.lower()])
    made = UnsubscribeTokens("s3cret").make(list_name, address)
    assert made == stock
    assert UnsubscribeTokens("s3cret").read(made) == (list_name, address.lower())


def test_tokens_made_a_second_apart_carry_their_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    tokens = UnsubscribeTokens("s3cret")
    monkeypatch.setattr(time, "time", lambda: 1_764_000_000.0)
    first = tokens.make("weekly", "ann@example.com")
    monkeypatch.setattr(time, "time", lambda: 1_764_000_001.0)
    second = tokens.make("weekly", "ann@example.com")
    assert first != second
    _, signed_at = URLSafeTimedSerializer("s3cret", salt=SALT).loads(second, return_timestamp=True)
    assert signed_at.timestamp() == 1_764_000_001


def test_a_token_the_serializer_would_have_compressed_still_reads_back() -> None:
    # zlib wins on an address that repeats itself; the serializer's loads() reads either form.
    address = "newsletter+newsletter@newsletter.newsletter.com"
    assert URLSafeTimedSerializer("s3cret", salt=SALT).dumps(["weekly", address]).startswith(".")
    token = UnsubscribeTokens("s3cret").make("weekly", address)
    assert not token.startswith(".")  # a leading dot is how the serializer marks zlib
    assert URLSafeTimedSerializer("s3cret", salt=SALT).loads(token) == ["weekly", address]
