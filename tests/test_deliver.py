"""The one delivery loop: what each sender exception does to the item and to the run."""

from __future__ import annotations

import threading

from newsletter.deliver import Attempt, Outcome, Run, Unsendable, deliver
from newsletter.errors import DeliveryError, PermanentFailure, TargetGone, TargetUnavailable, TemporaryFailure

Recorded = list[tuple[str, Outcome, str, str]]


def run_with(
    raises: dict[str, Exception], attempts: int = 0, stop: threading.Event | None = None
) -> tuple[Run, Recorded]:
    recorded: Recorded = []

    def send(item: str) -> str:
        if item in raises:
            raise raises[item]
        return f"at/{item}"

    def prepare(item: str) -> Attempt | None:
        if item == "skip":
            return None
        if item == "bad":
            raise Unsendable("bad", "cannot build it")
        return Attempt(lambda: send(item), attempts, item)

    def record(item: str, outcome: Outcome, error: str, where: str) -> None:
        recorded.append((item, outcome, error, where))

    run = deliver(["a", "skip", "bad", "b", "c"], prepare, record, max_attempts=3, stop=stop, said=str.upper)
    return run, recorded


def test_each_failure_maps_to_one_status_and_only_some_stop_the_run() -> None:
    run, recorded = run_with({"a": TemporaryFailure("451 later"), "b": PermanentFailure("550 no")})
    assert recorded == [
        ("a", Outcome.PENDING, "451 LATER", ""),
        ("bad", Outcome.FAILED, "cannot build it", ""),
        ("b", Outcome.FAILED, "550 NO", ""),
        ("c", Outcome.SENT, "", "at/c"),
    ]
    assert (run.sent, run.aborted, run.gone, run.unavailable) == (1, "", "", "")
    assert run.errors == [("a", "451 LATER"), ("bad", "cannot build it"), ("b", "550 NO")]


def test_a_deferral_on_the_last_attempt_fails_for_good() -> None:
    _, recorded = run_with({"a": TemporaryFailure("451")}, attempts=2)
    assert recorded[0] == ("a", Outcome.FAILED, "451", "")


def test_unavailable_gone_and_a_sender_that_cannot_go_on_end_the_run() -> None:
    run, recorded = run_with({"a": TargetUnavailable("timed out")})
    assert recorded == [("a", Outcome.PENDING, "TIMED OUT", "")]
    assert run.unavailable == "TIMED OUT"  # the caller learns why the rest is still pending
    run, recorded = run_with({"b": TargetGone("410 gone")})
    assert recorded[-1] == ("b", Outcome.PENDING, "410 GONE", "") and run.gone == "410 GONE"
    run, recorded = run_with({"b": DeliveryError("refused", hint="check the password")})
    assert [r[0] for r in recorded] == ["a", "bad"]  # b and c stay pending, unrecorded
    assert run.aborted == "REFUSED (CHECK THE PASSWORD)"


def test_a_stop_ends_the_loop_before_the_next_item() -> None:
    stop = threading.Event()
    stop.set()
    run, recorded = run_with({}, stop=stop)
    assert recorded == [] and run.sent == 0
