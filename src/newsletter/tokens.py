"""Signed unsubscribe tokens: they name the list and the address and cannot be forged."""

from __future__ import annotations

import hashlib
import json

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode

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
        # dumps() builds a new signer per call; one per run keeps the per-subscriber cost down.
        self._signer = self._serializer.make_signer()

    def make(self, list_name: str, email: str) -> str:
        # The serializer's own dump_payload tries zlib on every call (13 us) and never wins on
        # a payload this short; an uncompressed payload is one its loads() reads all the same.
        data = json.dumps([list_name, email.lower()], separators=(",", ":")).encode()
        return self._signer.sign(base64_encode(data)).decode("ascii")

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
