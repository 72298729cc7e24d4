"""How many messages each sender handed over, per UTC hour: what a daily quota counts.

A provider's daily quota is a rolling 24 hours (SES, Google's relay), and it must survive a
restart: a run stopped at 9,000 of 10,000 and started again must not send 10,000 more. One
row per sender, hour and process (``writer``, the host as locks name it and the pid) keeps
that small whatever the volume, and each send forgets the hours past the last 26. Per
process, not shared: a row every process updated in each of its commits let one frozen
between that update and its commit hold up every other one's commits (migration 5).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..locks import HOST

_HOUR = "%Y-%m-%dT%H"  # UTC; sorts as it runs, in SQL as in Python


def hour_of(when: datetime) -> str:
    """The bucket ``when`` falls in: ``'2026-12-01T13'``."""
    if when.tzinfo is None:
        raise ValueError(f"a time with its timezone is needed, not {when.isoformat()}")
    return when.astimezone(UTC).strftime(_HOUR)


class SenderUsage:
    """The store's ``sender_usage`` methods (migrations 3 and 5), the same SQL on both backends."""

    if TYPE_CHECKING:

        def execute(self, sql: str, args: Iterable[Any] = ()) -> Any: ...

    def count_sent(self, sender: str, when: datetime, n: int = 1) -> None:
        """Add ``n`` messages to the hour of ``when``. Inside ``transaction()`` it commits, or
        rolls back, with the rest of it (the ledger row of the same message)."""
        self.execute(
            "INSERT INTO sender_usage (sender, hour, writer, sent) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (sender, hour, writer) DO UPDATE SET sent = sender_usage.sent + excluded.sent",
            (sender, hour_of(when), f"{HOST}:{os.getpid()}", n),
        )

    def sent_since(self, sender: str, since: datetime) -> list[tuple[datetime, int]]:
        """The hour buckets from the one ``since`` falls in on, oldest first, each as (start of
        the hour in UTC, messages). The first may hold messages from before ``since``."""
        rows = self.execute(
            "SELECT hour, SUM(sent) AS sent FROM sender_usage WHERE sender = ? AND hour >= ?"
            " GROUP BY hour ORDER BY hour",
            (sender, hour_of(since)),
        ).fetchall()
        return [(datetime.strptime(r["hour"], _HOUR).replace(tzinfo=UTC), int(r["sent"])) for r in rows]

    def forget_usage(self, before: datetime) -> int:
        """Drop the buckets of every sender that end before the hour of ``before``; how many."""
        return self.execute("DELETE FROM sender_usage WHERE hour < ?", (hour_of(before),)).rowcount
