"""``newsletter run``: the schedules in schedules.yaml, run by APScheduler until told to stop.

Jobs: one poller that fetches each feed when it is due, one digest job per schedule with a
``when:`` (which pulls its own feeds first, for ``fetch.digest_timeout`` seconds at most, so
a slow feed is used as stored and never delays a send), a retry job per schedule for
deliveries a server deferred, and a join job per schedule that helps send an issue another
daemon started. Jobs run in threads at once: each opens its own ``RunContext`` (a store, its
own sender instances) and shares nothing live with the others; the Config they read is inert.

Any number of daemons may share one database (PostgreSQL, on several hosts): each due time,
poll and post round fires once across all of them (``Storage.claim_fire``), and every one of
them sends its share of an issue in leased batches (``claims``). ``newsletter worker`` runs
only the retry and join jobs: a process that delivers and does nothing else.
SIGTERM/SIGINT stop between two messages and exit 0; SIGHUP rereads the configuration and
keeps the old one when the new one is bad.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from . import digest, social
from .config import Config, load_config
from .context import RunContext
from .errors import BusyError, NewsletterError
from .feeds import fetch_all
from .model import FetchStatus
from .redact import redact
from .sanitize import printable
from .schedule import fire_times, format_duration, missed_run

log = logging.getLogger("newsletter")
POLL_TICK = timedelta(seconds=30)  # how often the poller looks for feeds that are due
HOST = socket.gethostname()  # who fired a due time, for the fires table
LOCK_WAIT = 300.0  # a digest job waits this long for a hand-started send of the same schedule


class _Formatter(logging.Formatter):
    """One line per event: ``key=value`` pairs for people, or JSON for log collectors."""

    FIELDS = ("event", "schedule", "issue", "sent", "pending", "failed", "skipped", "feeds", "new", "errors")

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        # Titles, server replies and errors come from feeds and servers: a CR/LF in one would
        # forge a log line, an ESC would drive the terminal, a token in a URL would leak.
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
        fields = {k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)}
        if self.as_json:
            # json.dumps escapes every control character; only the secrets need blanking.
            values = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
            return json.dumps(
                {
                    "time": stamp,
                    "level": record.levelname.lower(),
                    "message": redact(record.getMessage()),
                    **values,
                }
            )
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:<7} {pairs} {record.getMessage()}"
        return printable(redact(line)).rstrip()


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(log_format == "json"))
    # APScheduler speaks for itself ("skipped: maximum number of running instances reached"):
    # through the same handler, so --log-format json stays one JSON object per line.
    for logger, level in ((log, logging.INFO), (logging.getLogger("apscheduler"), logging.WARNING)):
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class Daemon:
    def __init__(self, config_path: str | None, watch: bool = False, worker: bool = False) -> None:
        self.config_path = config_path
        self.watch = watch
        self.worker = worker  # deliver only: no polling, building or posting
        self._lock = threading.Lock()
        self._sending: dict[str, threading.Lock] = {}  # schedule -> held while it is sent
        self.config: Config = load_config(config_path)
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.scheduler = BackgroundScheduler(timezone=UTC)

    # -- jobs ----------------------------------------------------------------------------------

    def poll_feeds(self, tick: timedelta | None = None) -> None:
        config = self.config
        if tick is not None and not self._claim("poll", slot(datetime.now(UTC), tick)):
            return  # another daemon polls in this round
        with RunContext.open(config, stop=self.stop) as ctx:
            store = ctx.store
            now = ctx.clock()
            due = []
            known = {f.url: f for f in store.feeds()}
            for url in dict.fromkeys(config.feed_url(f) for s in config.schedules.values() for f in s.feeds):
                row = known.get(url)
                # A feed's own <ttl> is the publisher asking us to wait at least that long.
                wait = max(config.feed_interval(url), timedelta(minutes=(row.ttl if row else None) or 0))
                if (
                    row is None
                    or not row.last_checked
                    or now - datetime.fromisoformat(row.last_checked) >= wait
                ):
                    due.append(store.feed_state(url))
            if not due:
                return
            fs = config.settings.fetch
            new = errors = 0
            for report in (digest.record_feed(store, result, fs) for result in fetch_all(due, fs)):
                new += report.new
                if report.status == FetchStatus.ERROR:
                    errors += 1
                    log.warning(report.error, extra={"event": "feed-error"})
            log.info("polled feeds", extra={"event": "poll", "feeds": len(due), "new": new, "errors": errors})

    def fire(self, name: str, due: datetime | None = None) -> None:
        """The digest job (``due``: a catch-up's due time): the one daemon that wins this due
        time builds and sends; the others help send it (the issue may not be built yet: their
        join jobs look again)."""
        if self.stop.is_set():
            return
        trigger = self.config.trigger(name)
        if due is None and trigger is not None:
            due = latest_fire(trigger, datetime.now(UTC))
        # This daemon's own send of the schedule first: a daemon busy with a long join must
        # not claim the due time and then sit on it while the others wait for its issue.
        with self._sending_lock(name):
            if self.stop.is_set():
                return  # stopped while a join or retry of the schedule was finishing
            if due is not None and not self._claim(f"digest:{name}", due):
                log.info(
                    f"the digest due at {due:%Y-%m-%d %H:%M:%S} UTC was fired by another daemon",
                    extra={"event": "fired-elsewhere", "schedule": name},
                )
                self._send(name, build=False, join=True)
                return
            self._send(name, build=True, join=False)

    def _claim(self, job: str, due: datetime) -> bool:
        with self.config.open_store() as store:
            return store.claim_fire(job, due, HOST)

    def _sending_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._sending.setdefault(name, threading.Lock())

    def send(self, name: str, *, build: bool = True, join: bool = False) -> None:
        """A retry or join run (or, with ``build``, a digest without a due time)."""
        if self.stop.is_set():
            return
        # One send of a schedule at a time in this daemon, so it keeps to the sender's
        # `connections:`: a digest waits for a join or retry in progress, those two skip.
        sending = self._sending_lock(name)
        if not sending.acquire(blocking=build):
            return
        try:
            self._send(name, build=build, join=join)
        finally:
            sending.release()

    def _send(self, name: str, *, build: bool, join: bool) -> None:
        config = self.config
        try:
            with RunContext.open(config, stop=self.stop) as ctx:
                # A digest pulls its own feeds first (the poller's clock may be 15 minutes off),
                # but only for a few seconds: a slow feed is used as stored, never waited for.
                report = digest.send_digest(
                    ctx,
                    name,
                    fetch_feeds=build,
                    fetch_timeout=config.settings.fetch.digest_timeout,
                    build=build,
                    join=join,
                    wait=LOCK_WAIT,
                )
        except BusyError as exc:
            log.warning(str(exc), extra={"event": "busy", "schedule": name})
            return
        if join and not any(i.sent_here or i.refused or i.lost for i in report.issues) and not report.aborted:
            return  # nothing was free to help with: every few seconds, not worth a line
        for feed in report.feeds:
            if feed.status == FetchStatus.ERROR:
                log.warning(
                    f"{feed.error}; the digest uses the entries already stored",
                    extra={"event": "feed-error", "schedule": name},
                )
        for warning in report.warnings:
            log.warning(warning, extra={"event": "warning", "schedule": name})
        for item in report.issues:
            if item.refused or item.lost:
                log.warning(
                    f"the lease of {item.lost} batch(es) ran out while this daemon was held up;"
                    f" {item.refused} outcome(s) that came in after were not written: another"
                    " process holds those deliveries now and sends them",
                    extra={"event": "lease-lost", "schedule": name, "issue": item.number},
                )
            log.info(
                item.subject,
                extra={
                    "event": "digest" if build else "join" if join else "retry",
                    "schedule": name,
                    "issue": item.number,
                    "sent": item.sent,
                    "pending": item.pending,
                    "failed": item.failed,
                    "skipped": item.skipped,
                },
            )
            for recipient, reply in item.errors:
                log.warning(f"{recipient}: {reply}", extra={"event": "delivery-error", "schedule": name})
        if build and not report.issues and not report.aborted:
            log.info("nothing new", extra={"event": "digest", "schedule": name})
        if report.aborted:
            log.error(report.aborted, extra={"event": "aborted", "schedule": name})
        elif report.paused:
            # The retry job picks it up again once the window opens or the quota allows.
            finish = f"; expected to finish {report.finish:%Y-%m-%d %H:%M %Z}" if report.finish else ""
            log.info(report.paused + finish, extra={"event": "paused", "schedule": name})

    def post(self, name: str, every: timedelta | None = None) -> None:
        if self.stop.is_set():
            return
        if every is not None and not self._claim(f"post:{name}", slot(datetime.now(UTC), every)):
            return  # another daemon posts in this round
        try:
            with RunContext.open(self.config, stop=self.stop) as ctx:
                reports = social.post_new(ctx, name, wait=LOCK_WAIT)
        except BusyError as exc:
            log.warning(str(exc), extra={"event": "busy", "schedule": name})
            return
        for r in reports:
            if r.posted_now or r.errors or r.disabled:
                log.info(
                    f"target {r.target}: posted {r.posted_now}",
                    extra={
                        "event": "post",
                        "schedule": name,
                        "sent": r.posted_now,
                        "pending": r.pending,
                        "failed": r.failed,
                    },
                )
            for title, reason in r.errors:
                log.warning(f"{r.target}: {title}: {reason}", extra={"event": "post-error", "schedule": name})
            if r.disabled:
                log.error(f"{r.target}: {r.disabled}", extra={"event": "target-disabled", "schedule": name})

    def _job(self, job: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        def run() -> None:
            try:
                func(*args, **kwargs)
            except NewsletterError as exc:
                log.error(f"job {job}: {exc.with_hint()}", extra={"event": "job-error"})
            except Exception as exc:  # a job that fails must not take the daemon with it
                # One line, no traceback: the cause is what an operator can act on, and a
                # traceback's lines would not be one event any more.
                log.error(f"job {job} failed: {_cause(exc)}", extra={"event": "job-error"})

        return run

    # -- scheduling ----------------------------------------------------------------------------

    def schedule_jobs(self) -> None:
        config = self.config
        self.scheduler.remove_all_jobs()
        shortest = min(
            [config.settings.fetch.interval]
            + [config.feed_interval(config.feed_url(f)) for s in config.schedules.values() for f in s.feeds]
        )
        tick = min(POLL_TICK, shortest)
        join = config.settings.batches.join_every
        if not self.worker:
            self.scheduler.add_job(
                self._job("poll", self.poll_feeds, tick),
                IntervalTrigger(seconds=tick.total_seconds(), timezone=UTC),
                id="poll",
                max_instances=1,
                coalesce=True,
                next_run_time=datetime.now(UTC),
            )
        store = config.open_store()
        try:
            for name, schedule in config.schedules.items():
                trigger = config.trigger(name)
                grace, retry = schedule.misfire_grace, schedule.retry_every
                # Two instances: the second returns at once while the first sends (see send),
                # where one would have APScheduler log "skipped" every few seconds.
                self.scheduler.add_job(
                    self._job(f"retry:{name}", self.send, name, build=False),
                    IntervalTrigger(seconds=retry.total_seconds()),
                    id=f"retry:{name}",
                    max_instances=2,
                    coalesce=True,
                )
                self.scheduler.add_job(
                    self._job(f"join:{name}", self.send, name, build=False, join=True),
                    IntervalTrigger(seconds=join.total_seconds()),
                    id=f"join:{name}",
                    max_instances=2,
                    coalesce=True,
                )
                if self.worker:
                    continue
                if any(t.each == "article" for t in schedule.post):
                    self.scheduler.add_job(
                        self._job(f"post:{name}", self.post, name, schedule.post_every),
                        IntervalTrigger(seconds=schedule.post_every.total_seconds()),
                        id=f"post:{name}",
                        max_instances=1,
                        coalesce=True,
                        next_run_time=datetime.now(UTC) + timedelta(seconds=2),
                    )
                if trigger is None:
                    continue
                self.scheduler.add_job(
                    self._job(f"digest:{name}", self.fire, name),
                    trigger,
                    id=f"digest:{name}",
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=int(grace.total_seconds()),
                )
                catch_up, skipped = missed_run(trigger, store.last_run(name), datetime.now(UTC), grace)
                if catch_up:
                    log.info(
                        f"catching up the digest due at {catch_up:%Y-%m-%d %H:%M} UTC",
                        extra={"event": "catch-up", "schedule": name},
                    )
                    # Through the fires table too: a fleet restarted across a due time
                    # catches it up once, not once per daemon.
                    self.scheduler.add_job(
                        self._job(f"catch-up:{name}", self.fire, name, catch_up), id=f"catch-up:{name}"
                    )
                elif skipped:
                    log.warning(
                        f"skipped the digest due at {skipped:%Y-%m-%d %H:%M} UTC: missed by more than"
                        f" misfire_grace ({format_duration(grace)})",
                        extra={"event": "missed", "schedule": name},
                    )
                job = self.scheduler.get_job(f"digest:{name}")
                next_run = getattr(job, "next_run_time", None) or trigger.get_next_fire_time(
                    None, datetime.now(UTC)
                )
                log.info(
                    f"next digest at {next_run:%Y-%m-%d %H:%M %Z}",
                    extra={"event": "scheduled", "schedule": name},
                )
        finally:
            store.close()

    def _reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except NewsletterError as exc:
            log.error(f"kept the old configuration: {exc}", extra={"event": "reload-failed"})
            return
        old, self.config = self.config, config
        try:
            self.schedule_jobs()
        except Exception as exc:  # the database locked, say: run on with what worked before
            log.error(f"kept the old configuration: {_cause(exc)}", extra={"event": "reload-failed"})
            self.config = old
            self.schedule_jobs()
            return
        log.info("configuration reloaded", extra={"event": "reload"})

    def _mtime(self) -> float:
        try:
            return self.config.path.stat().st_mtime
        except OSError:
            return 0.0

    def run(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.scheduler.start(paused=True)
        self.schedule_jobs()
        self.scheduler.resume()
        kind = "as a worker (delivering only) " if self.worker else ""
        log.info(f"started {kind}with {self.config.path}", extra={"event": "start"})
        mtime = self._mtime()
        while not self.stop.wait(0.2):
            if self.watch and self._mtime() != mtime:
                mtime = self._mtime()
                self.reload.set()
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
        log.info("stopping: finishing the message in flight", extra={"event": "stop"})
        self.scheduler.shutdown(wait=True)
        log.info("stopped", extra={"event": "stop"})


def latest_fire(trigger: BaseTrigger, now: datetime) -> datetime | None:
    """The due time a trigger's job is running for: its latest fire time at or before now
    (looked for in widening windows, so an every-second schedule costs 60 steps, not 86,400)."""
    for back in (60, 3600, 86400, 40 * 86400):
        times = fire_times(trigger, now - timedelta(seconds=back), now, limit=100_000)
        if times:
            return times[-1]
    return None


def slot(now: datetime, every: timedelta) -> datetime:
    """The start of the round of length ``every`` that ``now`` falls in, counted from the
    epoch: the same round for every daemon, whenever each started."""
    seconds = every.total_seconds()
    return datetime.fromtimestamp(now.timestamp() // seconds * seconds, UTC)


def _cause(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"
