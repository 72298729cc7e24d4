"""redact: secrets taken from the environment and URL credentials never reach a message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from newsletter.redact import forget_all, redact, remember


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    forget_all()
    yield
    forget_all()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # credentials in the authority
        ("GET https://ann:hunter22@feeds.test/rss failed", "GET https://***@feeds.test/rss failed"),
        ("smtp://news:pw@mail.test:587", "smtp://***@mail.test:587"),
        ("http://token@127.0.0.1:8080/feed", "http://***@127.0.0.1:8080/feed"),
        ("https://u:p@ss@host.test/x", "https://***@host.test/x"),  # a raw @ in the password
        # an @ after the authority is not userinfo
        ("https://feeds.test/rss?author=a@b.test", "https://feeds.test/rss?author=a@b.test"),
        ("https://feeds.test/people/@ann", "https://feeds.test/people/@ann"),
        # query values that authenticate
        ("https://x.test/f?token=abc123&page=2", "https://x.test/f?token=***&page=2"),
        ("https://x.test/f?page=2&access_token=abc#top", "https://x.test/f?page=2&access_token=***#top"),
        (
            "https://x.test/f?api_key=k1&X-Amz-Signature=s1",
            "https://x.test/f?api_key=***&X-Amz-Signature=***",
        ),
        ("https://x.test/f?client_secret=s&sig=t", "https://x.test/f?client_secret=***&sig=***"),
        ("https://x.test/f?utm_source=newsletter&id=7", "https://x.test/f?utm_source=newsletter&id=7"),
        # webhook URLs whose path is the credential
        (
            "POST https://hooks.slack.com/services/T000/B000/XXXXSECRET: 404",
            "POST https://hooks.slack.com/services/*** 404",
        ),
        (
            "https://discord.com/api/webhooks/123/tok-en_x?wait=true",
            "https://discord.com/api/webhooks/***?wait=true",
        ),
        (
            "https://ptb.discordapp.com/api/v10/webhooks/1/t",
            "https://ptb.discordapp.com/api/v10/webhooks/***",
        ),
        (
            "https://acme.webhook.office.com/webhookb2/a@b/IncomingWebhook/c/d",
            "https://acme.webhook.office.com/webhookb2/***",
        ),
        ("https://api.telegram.org/bot123:AAH-x/sendMessage", "https://api.telegram.org/bot***"),
        # an ordinary hook path is not a credential: the error must still say which target
        ("https://example.org/hooks/newsletter: 500", "https://example.org/hooks/newsletter: 500"),
        # an Authorization header quoted back by a server
        ("401: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "401: Bearer ***"),
        ("sent Basic bmV3czpzM2NyZXQ=", "sent Basic ***"),
        ("basic auth refused", "basic auth refused"),
        # nothing secret: unchanged
        ("HTTP 404 Not Found", "HTTP 404 Not Found"),
        ("ann@example.com: 550 no such user", "ann@example.com: 550 no such user"),
    ],
)
def test_url_credentials_are_blanked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("secrets", "text", "expected"),
    [
        (["hunter2-xyz"], "535 bad password hunter2-xyz for news", "535 bad password *** for news"),
        # every occurrence, and the percent-encoded form a URL carries
        (["p@ss w/rd!"], "p@ss w/rd! and ?q=p%40ss%20w%2Frd%21", "*** and ?q=***"),
        # the longest first, so a secret that contains another is blanked whole
        (["abcdef", "abcdefghij"], "x abcdefghij y", "x *** y"),
        # short values (a port, "on") would blank ordinary text and protect nothing
        (["587", "on"], "port 587 is on", "port 587 is on"),
        ([None, ""], "nothing to hide", "nothing to hide"),
    ],
)
def test_remembered_secrets_are_blanked(secrets: list[str | None], text: str, expected: str) -> None:
    for secret in secrets:
        remember(secret)
    assert redact(text) == expected
