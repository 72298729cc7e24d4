"""Fires and batches in the store (migration 0004), on both backends: what several daemons
sharing one database rely on to fire a due time once and to split an issue between them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from newsletter import claims
from newsletter.claims import Claims, reap
from newsletter.errors import StoreError
from newsletter.model import DeliveryStatus, Pending
from newsletter.store import Store
from test_store import add_list

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
HOST = claims.HOST  # this host's name and PID namespace, as a batch records it
LIST = "readers"


@pytest.fixture
def store(state_url: str) -> Iterator[Store]:
    with Store(state_url, busy_timeout=5) as opened:
        yield opened


def issue_for(store: Store, n: int) -> int:
    add_list(store, "readers", [f"r{i:03d}@example.com" for i in range(n)])
    made = store.create_issue("weekly", watermark=0, entry_ids=[], subject="", payload={}, list_name=LIST)
    return made.id


def held(store: Store, batch: str, issue_id: int) -> list[str]:
    return [p.recipient for p in store.pending(issue_id, "readers", limit=10_000, batch=batch)]


# -- firing once -----------------------------------------------------------------------------


def test_a_due_time_fires_for_one_caller_and_another_due_time_fires_again(store: Store) -> None:
    assert store.claim_fire("digest:weekly", T0, "a") is True
    assert store.claim_fire("digest:weekly", T0, "b") is False
    assert store.claim_fire("digest:weekly", T0 + timedelta(minutes=1), "b") is True
    assert store.claim_fire("digest:daily", T0, "b") is True  # another job's own due times


def test_many_threads_racing_for_the_same_due_times_fire_each_once(state_url: str) -> None:
    won: list[tuple[int, int]] = []
    lock = threading.Lock()

    def daemon(n: int) -> None:
        with Store(state_url, busy_timeout=30) as mine:
            for minute in range(15):
                if mine.claim_fire("digest:weekly", T0 + timedelta(minutes=minute), f"host{n}"):
                    with lock:
                        won.append((minute, n))

    threads = [threading.Thread(target=daemon, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(m for m, _ in won) == list(range(15))


def test_old_fires_are_forgotten_as_new_ones_come(store: Store) -> None:
    store.claim_fire("poll", T0, "a")
    store.claim_fire("poll", T0 + timedelta(days=3), "a")
    # Forgotten: the same old time could fire again (nobody asks for one that old).
    assert store.claim_fire("poll", T0, "b") is True


# -- batches -----------------------------------------------------------------------------------


def test_batches_split_the_pending_rows_with_no_row_in_two(store: Store) -> None:
    issue = issue_for(store, 25)
    sizes = [store.claim_batch(issue, f"b{n}", HOST, 1, size=10, lease=30) for n in range(4)]
    assert sizes == [10, 10, 5, 0]
    rows = [held(store, f"b{n}", issue) for n in range(3)]
    assert sum(len(r) for r in rows) == 25
    assert len({r for batch in rows for r in batch}) == 25
    assert [b.id for b in store.batches(issue)] == ["b0", "b1", "b2"]  # an empty claim leaves none
    assert store.delivery_counts(issue).held == 25


def test_a_mark_is_written_only_while_the_batch_holds_the_row(store: Store) -> None:
    issue = issue_for(store, 3)
    store.claim_batch(issue, "old", HOST, 1, size=3, lease=30)
    first, second, third = held(store, "old", issue)
    assert store.record_delivery(issue, first, DeliveryStatus.SENT, "", "old") is True
    store.release_batch("old")  # as a reaper does once the lease has run out
    store.claim_batch(issue, "new", HOST, 2, size=3, lease=30)
    assert held(store, "new", issue) == [second, third]  # the sent row is nobody's to claim
    assert store.record_delivery(issue, second, DeliveryStatus.SENT, "", "old") is False
    assert store.record_delivery(issue, second, DeliveryStatus.SENT, "", "new") is True
    counts = store.delivery_counts(issue)
    assert (counts.sent, counts.pending) == (2, 1)


def test_marks_written_together_are_each_fenced_by_their_own_batch(store: Store) -> None:
    issue = issue_for(store, 6)
    store.claim_batch(issue, "gone", HOST, 1, size=3, lease=30)
    store.claim_batch(issue, "ours", HOST, 2, size=3, lease=30)
    lost, ours = held(store, "gone", issue), held(store, "ours", issue)
    store.release_batch("gone")
    store.claim_batch(issue, "theirs", HOST, 3, size=3, lease=30)  # another process has them now
    group = [
        (ours[0], DeliveryStatus.SENT, "", "ours"),
        (lost[0], DeliveryStatus.SENT, "", "gone"),
        (ours[1], DeliveryStatus.PENDING, "451 later", "ours"),
        (lost[1], DeliveryStatus.FAILED, "550 no", "gone"),
        (ours[2], DeliveryStatus.FAILED, "550 no such user", "ours"),
    ]
    with store.transaction(serial=False):
        assert store.record_deliveries(issue, group) == [True, False, True, False, True]
    assert store.record_deliveries(issue, [(ours[0], DeliveryStatus.SENT, "", "ours")]) == [True]
    assert store.record_deliveries(issue, []) == []
    counts = store.delivery_counts(issue)
    assert (counts.sent, counts.failed, counts.pending) == (1, 1, 4)
    assert held(store, "theirs", issue) == lost  # untouched: still theirs to send
    again = [p for p in store.pending(issue, "readers", limit=10, batch="ours")]
    assert [(p.recipient, p.attempts) for p in again] == [(ours[1], 1)]


def test_a_lease_runs_out_by_the_database_clock_and_is_renewed_only_until_it_is_reaped(
    store: Store,
) -> None:
    issue = issue_for(store, 2)
    store.claim_batch(issue, "b", HOST, os.getpid(), size=2, lease=1)
    (batch,) = store.batches(issue)
    assert 0 < batch.lease_left <= 1 and batch.age >= 0
    assert store.renew_batch("b", 1) is True
    time.sleep(1.3)
    assert store.batches(issue)[0].lease_left < 0
    # Run out, but nobody took it: its holder was held up, and it is still the rows' only one.
    assert store.renew_batch("b", 1) is True
    assert store.reap_batch("b") == 0
    time.sleep(1.3)
    assert store.reap_batch("b") == 2
    assert store.renew_batch("b", 30) is False


def test_a_fresh_only_claim_leaves_the_rows_already_tried(store: Store) -> None:
    issue = issue_for(store, 4)
    store.claim_batch(issue, "b", HOST, 1, size=2, lease=30)
    for r in held(store, "b", issue):
        store.record_delivery(issue, r, DeliveryStatus.PENDING, "451 later", "b")
    store.release_batch("b")
    assert store.claim_batch(issue, "join", HOST, 1, size=10, lease=30, fresh_only=True) == 2
    assert store.claim_batch(issue, "retry", HOST, 1, size=10, lease=30) == 2


def test_status_shows_what_each_holder_last_said_it_sent(store: Store) -> None:
    issue = issue_for(store, 5)
    store.claim_batch(issue, "b", "elsewhere", 7, size=5, lease=30)
    assert store.renew_batch("b", 30, sent=3)
    (batch,) = store.batches()
    assert (batch.host, batch.pid, batch.size, batch.sent) == ("elsewhere", 7, 5, 3)


def test_a_reaper_does_not_take_a_batch_whose_renewal_came_in_first(store: Store) -> None:
    issue = issue_for(store, 4)
    store.claim_batch(issue, "b", "elsewhere", 7, size=4, lease=1)
    time.sleep(1.2)
    (seen,) = store.batches(issue)
    assert seen.lease_left <= 0  # what the reaper read
    # The holder had not renewed in time: nothing changes that. But had it (a new claim's
    # lease), the reaper's take, re-checked by the database's clock, finds nothing to take.
    assert store.reap_batch("b") == 4
    store.claim_batch(issue, "c", "elsewhere", 7, size=4, lease=30)
    assert store.reap_batch("c") == 0 and [b.id for b in store.batches(issue)] == ["c"]
    assert store.reap_batch("c", expired_only=False) == 4  # its holder known dead


def test_rows_whose_batch_vanished_are_freed_as_orphans(pg_database: str) -> None:
    # PostgreSQL only: a reaper there skips rows the holder is writing (SKIP LOCKED), and they
    # are left behind; on SQLite a reaper frees every row at once.
    with Store(pg_database) as store:
        issue = issue_for(store, 3)
        store.claim_batch(issue, "b", HOST, 1, size=3, lease=30)
        store.execute("DELETE FROM batches WHERE id = ?", ("b",))  # as if reaped mid-write
        store.claim_batch(issue, "live", HOST, 1, size=1, lease=30)  # claims nothing: all held
        assert store.delivery_counts(issue).held == 3
        assert store.free_orphans(issue) == 3
        assert store.delivery_counts(issue).held == 0 and store.delivery_counts(issue).fresh == 3


def test_orphans_a_frozen_holder_is_still_writing_are_skipped_not_waited_for(pg_database: str) -> None:
    # The holder froze inside the transaction that marks one of its rows: freeing that row
    # would wait until the server ends the transaction, holding the reaper's own sends up.
    with Store(pg_database) as holder, Store(pg_database, busy_timeout=2) as reaper:
        issue = issue_for(holder, 3)
        holder.claim_batch(issue, "b", HOST, 1, size=3, lease=30)
        first = held(holder, "b", issue)[0]
        holder.execute("DELETE FROM batches WHERE id = ?", ("b",))  # reaped by now
        with holder.transaction(serial=False):
            holder.execute("UPDATE deliveries SET attempts = attempts WHERE recipient = ?", (first,))
            assert reaper.free_orphans(issue) == 2
        assert reaper.free_orphans(issue) == 1  # once it is written, on the next pass
        assert reaper.delivery_counts(issue).fresh == 3


# -- reaping, and a run's claims (newsletter.claims) -------------------------------------------


def test_a_batch_of_a_dead_process_on_this_host_is_reaped_at_once(store: Store) -> None:
    issue = issue_for(store, 4)
    script = "import os; print(os.getpid())"
    gone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    store.claim_batch(issue, "dead", HOST, int(gone.stdout), size=2, lease=300)
    store.claim_batch(issue, "remote", "another-host", 1, size=2, lease=300)  # alive until it expires
    assert reap(store, issue) == 2
    assert [b.id for b in store.batches(issue)] == ["remote"]


def test_claims_share_an_issue_and_release_what_they_did_not_send(store: Store) -> None:
    issue = issue_for(store, 30)
    one = Claims(store, issue, "readers", size=8, lease=30)
    two = Claims(store, issue, "readers", size=8, lease=30)
    a, b = one.rows(), two.rows()
    seen = []
    for _ in range(8):
        seen += [next(a).recipient, next(b).recipient]
    for recipient in seen:
        who = one.batch_of(recipient) or two.batch_of(recipient)
        assert store.record_delivery(issue, recipient, DeliveryStatus.SENT, "", who)
    two.release()  # ended early: its second batch is not claimed yet, nothing of its is left
    rest = [p.recipient for p in a]  # the first finds everything else, its own batches and all
    assert sorted(seen + rest) == [f"r{i:03d}@example.com" for i in range(30)]
    one.release()
    assert store.batches(issue) == [] and store.delivery_counts(issue).held == 0


# Another process reaps what it finds expired and claims it; prints what it took.
OTHER_PROCESS = """
import sys
from newsletter.claims import Claims
from newsletter.store import Store
with Store(sys.argv[1]) as store:
    print(" ".join(p.recipient for p in Claims(store, int(sys.argv[2]), "readers", size=3, lease=30).rows()))
"""


def other_process(state_url: str, issue: int) -> list[str]:
    command = [sys.executable, "-c", OTHER_PROCESS, state_url, str(issue)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_run_paused_past_its_lease_may_not_send_and_its_marks_are_refused(
    store: Store, state_url: str
) -> None:
    issue = issue_for(store, 3)
    now = [0.0]
    paused = Claims(store, issue, "readers", size=3, lease=2, clock=lambda: now[0])
    first = next(paused.rows()).recipient
    assert paused.usable(first)
    now[0] = 10.0  # SIGSTOP for longer than the lease: its own clock ran on
    assert not paused.usable(first)
    time.sleep(2.2)  # and by the database's clock the lease has run out
    taken = other_process(state_url, issue)
    assert first in taken
    paused.renew()
    assert first in {r for r in taken if not paused.usable(r)}
    assert store.record_delivery(issue, first, DeliveryStatus.SENT, "", paused.batch_of(first)) is False
    paused.release()


def test_a_claim_that_committed_and_then_failed_is_taken_back_by_the_next_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection cut after the server committed the claim: the client saw an error, the
    # batch is there. The run that made it has ended; the next one must not take it for live.
    issue = issue_for(store, 3)
    real = store.claim_batch

    def cut(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        raise StoreError("server closed the connection unexpectedly")

    run = Claims(store, issue, "readers", size=3, lease=30)
    with monkeypatch.context() as patched:
        patched.setattr(store, "claim_batch", cut)
        with pytest.raises(StoreError):
            next(run.rows())
    run.release()
    assert store.delivery_counts(issue).held == 3
    again = Claims(store, issue, "readers", size=3, lease=30)
    assert len(list(again.rows())) == 3
    again.release()


def test_a_run_held_up_past_its_lease_does_not_take_its_own_batch_back(store: Store) -> None:
    # A commit that waited on a lock, a stall: the lease ran out by the database's clock while
    # the run was still sending. Reaping its own batch would free the rows whose messages its
    # connections have on the wire, and it would claim and send them again.
    issue = issue_for(store, 6)
    run = Claims(store, issue, "readers", size=3, lease=1)
    rows = run.rows()
    first = next(rows).recipient
    time.sleep(1.3)
    assert store.batches(issue)[0].lease_left < 0
    assert reap(store, issue) == 0
    # Its late outcome is still its own to write; nobody took the batch up, so its renewal
    # gives it back the rest, which it had held off sending while the lease was in doubt.
    assert store.record_delivery(issue, first, DeliveryStatus.SENT, "", run.batch_of(first)) is True
    assert not run.usable(first)
    run.renew()
    rest = [p.recipient for p in rows]
    assert first not in rest and len(rest) == 5
    assert all(run.usable(r) for r in rest)
    run.release()


def test_a_batch_this_process_no_longer_uses_is_reaped_by_its_next_run(store: Store) -> None:
    issue = issue_for(store, 2)
    run = Claims(store, issue, "readers", size=2, lease=300)
    next(run.rows())
    with claims._live_lock:
        claims._live.clear()  # the run ended and its release could not be written
    assert reap(store, issue) == 2


def test_a_batch_is_given_back_at_the_tick_after_every_row_has_an_outcome(store: Store) -> None:
    issue = issue_for(store, 5)
    run = Claims(store, issue, LIST, size=2, lease=30)

    def outcome(row: Pending, status: DeliveryStatus) -> None:  # what the delivery loop does
        assert store.record_delivery(issue, row.recipient, status, "", run.batch_of(row.recipient))
        run.answered(row.recipient, status == DeliveryStatus.SENT)

    rows = run.rows()
    a, b = next(rows), next(rows)
    outcome(a, DeliveryStatus.SENT)
    outcome(b, DeliveryStatus.PENDING)  # a 4xx: pending again, for a later retry run
    c = next(rows)  # the first batch is all out and answered; the second is claimed
    assert len(store.batches(issue)) == 2
    run.tick()  # between two transactions: the first is given back
    assert [x.size for x in store.batches(issue)] == [2]
    counts = store.delivery_counts(issue)
    assert (counts.held, counts.fresh) == (2, 1)  # c and d held; e never tried; b tried once
    outcome(c, DeliveryStatus.SENT)
    run.release()
    assert store.batches(issue) == [] and store.delivery_counts(issue).held == 0
    assert not run.usable(b.recipient)  # an answered row is no longer this run's to send
