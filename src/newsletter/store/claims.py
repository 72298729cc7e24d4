"""What several daemons on one database share: due times that fire once, and an issue's
deliveries claimed in batches under a lease (migration 0004), the same SQL on both backends.

Time here is the database's clock (``DB_NOW``), never a machine's own: two hosts whose clocks
disagree still agree on whose lease has run out. A claim skips rows another transaction is
claiming (``SKIP_LOCKED`` on PostgreSQL); expired leases are reaped apart from the claim, so
the claim's search only ever looks at rows nobody holds (the ``deliveries_free`` index).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..model import Batch, now
from .rows import iso, values_list


class SharedClaims:
    """Mixed into both stores; each says how its engine reads the clock and skips locks."""

    DB_NOW = ""  # SQL for the database's time now, in Unix seconds
    SKIP_LOCKED = ""  # appended to the claim's row search
    SKIP_LOCKED_OF_D = ""  # the same, for a search whose deliveries are ``d``

    if TYPE_CHECKING:

        def execute(self, sql: str, args: Iterable[Any] = ()) -> Any: ...

        def transaction(self, write: bool = True, serial: bool = True) -> AbstractContextManager[None]: ...

    def db_now(self) -> datetime:
        """The database's time now: what every lease in it is measured by."""
        row = self.execute(f"SELECT {self.DB_NOW} AS now").fetchone()
        return datetime.fromtimestamp(float(row["now"]), UTC)

    # -- due times -----------------------------------------------------------------------------

    def claim_fire(self, job: str, fire_at: datetime, host: str, keep: timedelta = timedelta(days=2)) -> bool:
        """True for the one caller, across every process on the database, that fires ``job``
        due at ``fire_at``; False for all the others. Fires older than ``keep`` are forgotten."""
        stamp = now()
        with self.transaction(serial=False):
            cur = self.execute(
                "INSERT INTO fires (job, fire_at, host, fired_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (job, fire_at) DO NOTHING",
                (job, iso(fire_at), host, iso(stamp)),
            )
            won = cur.rowcount == 1
            if won:
                self.execute("DELETE FROM fires WHERE job = ? AND fire_at < ?", (job, iso(fire_at - keep)))
        return won

    # -- batches ---------------------------------------------------------------------------------

    def claim_batch(
        self,
        issue_id: int,
        batch: str,
        host: str,
        pid: int,
        *,
        size: int,
        lease: float,
        after: str = "",
        fresh_only: bool = False,
    ) -> int:
        """Claim up to ``size`` pending deliveries of the issue that nobody holds, in
        recipient order after ``after`` (with ``fresh_only``, only those never tried), for
        ``lease`` seconds, as ``batch``. Returns how many; 0 leaves no batch behind."""
        fresh = " AND attempts = 0" if fresh_only else ""
        with self.transaction(serial=False):
            self.execute(
                f"INSERT INTO batches (id, issue_id, host, pid, claimed_at, lease_until, size)"
                f" VALUES (?, ?, ?, ?, {self.DB_NOW}, {self.DB_NOW} + ?, 0)",
                (batch, issue_id, host, pid, lease),
            )
            claimed = self.execute(
                "UPDATE deliveries SET claimed_by = ? WHERE issue_id = ? AND recipient IN"
                " (SELECT recipient FROM deliveries WHERE issue_id = ? AND status = 'pending'"
                f" AND claimed_by IS NULL AND recipient > ?{fresh} ORDER BY recipient LIMIT ?"
                f"{self.SKIP_LOCKED})",
                (batch, issue_id, issue_id, after, size),
            ).rowcount
            if claimed:
                self.execute("UPDATE batches SET size = ? WHERE id = ?", (claimed, batch))
            else:
                self.execute("DELETE FROM batches WHERE id = ?", (batch,))
        return int(claimed)

    def renew_batch(self, batch: str, lease: float, sent: int = 0) -> bool:
        """Extend the lease by ``lease`` seconds from now, and note how many of its rows the
        holder has sent (for status); False when the batch was reaped: the rows may be
        another's already, and the batch must not send on. A lease that ran out and that
        nobody took up is renewed: a reaper's take, re-checked by the database's clock, and
        this renewal are one row's writes, so exactly one of the two wins."""
        cur = self.execute(
            f"UPDATE batches SET lease_until = {self.DB_NOW} + ?, sent = ? WHERE id = ?",
            (lease, sent, batch),
        )
        return bool(cur.rowcount)

    def release_batch(self, batch: str) -> int:
        """The holder is done with the batch: its rows still pending are anyone's again; how
        many."""
        with self.transaction(serial=False):
            self.execute("DELETE FROM batches WHERE id = ?", (batch,))
            return self._free(batch)

    def reap_batch(self, batch: str, expired_only: bool = True) -> int:
        """Take a batch from its holder: with ``expired_only``, only if its lease has run
        out by the database's clock now (a renewal that just came in wins); without, because
        its holder is known dead. How many rows it frees (0: not taken)."""
        expired = f" AND lease_until <= {self.DB_NOW}" if expired_only else ""
        with self.transaction(serial=False):
            if not self.execute(f"DELETE FROM batches WHERE id = ?{expired}", (batch,)).rowcount:
                return 0
            return self._free(batch)

    def free_orphans(self, issue_id: int) -> int:
        """Free the pending rows whose batch is gone: rows its holder was still writing when
        it was reaped (skipped then, not waited for). None on SQLite, which skips nothing."""
        if not self.SKIP_LOCKED:
            return 0
        with self.transaction(serial=False):
            # Rows still locked (a holder frozen inside the transaction that marks them) are
            # skipped as _free skips them, not waited for: waiting would hold this process up
            # until the server ends that transaction, and its own leases would run out.
            orphans = self.execute(
                "SELECT d.recipient, d.claimed_by FROM deliveries d WHERE d.claimed_by IS NOT NULL"
                " AND d.status = 'pending' AND d.issue_id = ? AND NOT EXISTS"
                f" (SELECT 1 FROM batches b WHERE b.id = d.claimed_by) {self.SKIP_LOCKED_OF_D}",
                (issue_id,),
            ).fetchall()
            if not orphans:
                return 0
            # By the gone batch's id, which never comes back: a row claimed again meanwhile
            # (by a batch this statement's snapshot cannot see) is left to its new holder.
            values, args = values_list([(row["recipient"], row["claimed_by"]) for row in orphans])
            return int(
                self.execute(
                    f"UPDATE deliveries SET claimed_by = NULL FROM (VALUES {values}) AS v WHERE"
                    " deliveries.issue_id = ? AND deliveries.recipient = v.column1"
                    " AND deliveries.claimed_by = v.column2 AND deliveries.status = 'pending'",
                    (*args, issue_id),
                ).rowcount
            )

    def _free(self, batch: str) -> int:
        # Rows another transaction is writing right now (the holder marking them) are skipped,
        # never waited for, so a reaper and a holder cannot deadlock; free_orphans gets them.
        return int(
            self.execute(
                "UPDATE deliveries SET claimed_by = NULL WHERE claimed_by = ? AND status = 'pending'"
                " AND recipient IN (SELECT recipient FROM deliveries WHERE claimed_by = ?"
                f" AND status = 'pending'{self.SKIP_LOCKED})",
                (batch, batch),
            ).rowcount
        )

    def batches(self, issue_id: int | None = None) -> list[Batch]:
        """The batches held now (of one issue, or of all), oldest claim first."""
        where = "" if issue_id is None else " WHERE issue_id = ?"
        rows = self.execute(
            "SELECT id, issue_id, host, pid, size, sent,"
            f" {self.DB_NOW} - claimed_at AS age, lease_until - {self.DB_NOW} AS lease_left"
            f" FROM batches{where} ORDER BY claimed_at, id",
            () if issue_id is None else (issue_id,),
        ).fetchall()
        return [
            Batch(
                str(r["id"]),
                int(r["issue_id"]),
                str(r["host"]),
                int(r["pid"]),
                int(r["size"]),
                int(r["sent"]),
                float(r["age"]),
                float(r["lease_left"]),
            )
            for r in rows
        ]
