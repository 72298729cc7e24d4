"""Signed unsubscribe tokens: they name the list and the address and cannot be forged."""

from __future__ import annotations

from itsdangerous import BadSignature, URLSafeSerializer

SALT = "newsletter.unsubscribe"


class UnsubscribeTokens:
    def __init__(self, secret: str) -> None:
        self._serializer = URLSafeSerializer(secret, salt=SALT)
        # dumps() builds a new signer per call; one per run keeps the per-subscriber cost down.
        self._signer = self._serializer.make_signer()

    def make(self, list_name: str, email: str) -> str:
        payload = self._serializer.dump_payload([list_name, email.lower()])
        return self._signer.sign(payload).decode("ascii")

    def read(self, token: str) -> tuple[str, str] | None:
        """(list, address), or None for a forged or damaged token."""
        try:
            value = self._serializer.loads(token)
        except BadSignature:
            return None
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return value[0], value[1]
        return None
