"""Signed unsubscribe tokens: they name the list and the address and cannot be forged."""

from __future__ import annotations

import hashlib
import hmac
import time
from json.encoder import encode_basestring  # type: ignore[attr-defined]

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode, int_to_bytes

SALT = "newsletter.unsubscribe"


class TokenError(Exception):
    """A token that was forged, damaged or is too old; ``str()`` says which, for the page."""


class _Signer(TimestampSigner):
    """Derives the signing key once, not once per token: an HMAC less for every subscriber.
    ``derive_key`` is the hook itsdangerous documents for overriding key derivation."""

    # The same SHA-1 as itsdangerous's default, which wraps it in a Python function, and
    # hmac then falls back to its pure-Python HMAC (two hash objects a token) for it.
    default_digest_method = staticmethod(hashlib.sha1)

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        if secret_key is not None:
            return super().derive_key(secret_key)
        if not hasattr(self, "_key"):
            self._key = super().derive_key()
        return self._key


class UnsubscribeTokens:
    def __init__(self, secret: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT, signer=_Signer)
        self._key = self._serializer.make_signer().derive_key()
        self._heads: dict[str, bytes] = {}
        self._stamp: tuple[int, bytes] = (0, b"")

    def make(self, list_name: str, email: str) -> str:
        """What ``URLSafeTimedSerializer(secret, salt=SALT).dumps([list, address])`` gives,
        less its per-call work: this runs for every subscriber of an issue.

        The payload is the serializer's compact UTF-8 JSON, never compressed: ``dumps`` tries
        zlib on every call (13 us) and uses it when that is shorter, which an address with a
        repeated word can be; its ``loads`` reads both. Otherwise the bytes are the same: the
        signature is its HMAC-SHA1 under its derived key, derived once.
        """
        head = self._heads.get(list_name)
        if head is None:
            head = self._heads[list_name] = f"[{encode_basestring(list_name)},".encode()
        second = int(time.time())
        if self._stamp[0] != second:
            self._stamp = (second, b"." + base64_encode(int_to_bytes(second)))
        data = head + encode_basestring(email.lower()).encode() + b"]"
        value = base64_encode(data) + self._stamp[1]
        return (value + b"." + base64_encode(hmac.digest(self._key, value, "sha1"))).decode("ascii")

    def read(self, token: str, max_age_days: float | None = None) -> tuple[str, str]:
        """(list, address) of a genuine token; TokenError otherwise."""
        max_age = None if max_age_days is None else int(max_age_days * 86400)
        try:
            value = self._serializer.loads(token, max_age=max_age)
        except SignatureExpired:
            raise TokenError("this unsubscribe link has expired") from None
        except BadSignature:
            raise TokenError("this unsubscribe link is not valid") from None
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return value[0], value[1]
        raise TokenError("this unsubscribe link is not valid")
