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
