"""Command line: parse, call the library, print. Exit 0 done, 1 deliveries failed, 2 bad config."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import ConfigError, NewsletterError
from .model import Batch, FetchStatus
from .redact import remember

if TYPE_CHECKING:
    from . import digest
    from .config import Config
    from .context import RunContext


class State:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            from .config import load_config  # imported late: --help stays instant

            self._config = load_config(self.config_path)
        return self._config

    def context(self) -> RunContext:
        """The command's store, senders and token signer; close it when done (``with``)."""
        from .context import RunContext

        return RunContext.open(self.config)


def _safe(value: object) -> str:
    """Text that came from a feed, a server, a list or the environment, fit for a terminal:
    no control character (ESC, BEL, CR, LF, C1 CSI...) and no secret gets through."""
    from .redact import redact

    return _plain(redact(str(value)))


def _plain(value: object) -> str:
    """Feed text meant to be copied as it is (share snippets): no control characters, and
    nothing blanked, since a link with ?key= in it is the article's, not a credential."""
    from .sanitize import printable  # imported here: --help stays instant

    return printable(str(value))


def _fail(exc: NewsletterError) -> None:
    # A configuration error lists one problem per line; every other error is one line.
    lines = str(exc).split("\n") if isinstance(exc, ConfigError) else [str(exc)]
    click.echo("error: " + "\n".join(_safe(line) for line in lines), err=True)
    if exc.hint:
        click.echo(f"hint: {_safe(exc.hint)}", err=True)
    sys.exit(exc.exit_code)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NewsletterError as exc:
            _fail(exc)


@click.group(cls=Group)
@click.option(
    "--config",
    "config_path",
    envvar="NEWSLETTER_CONFIG",
    type=click.Path(dir_okay=False),
    help="schedules.yaml to use (default ./schedules.yaml; env NEWSLETTER_CONFIG).",
)
@click.version_option(package_name="newsletter")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Turn feeds into email digests."""
    # The state database, the outbox and the archive hold addresses and the unsubscribe
    # secret: whatever this process creates (SQLite's -wal, -shm and lock files included) is
    # for this user only. Given back when the command ends, for callers in the same process.
    previous = os.umask(0o077)
    ctx.call_on_close(lambda: os.umask(previous))
    remember(os.environ.get("NEWSLETTER_SECRET"))
    ctx.obj = State(config_path)


def _digest() -> Any:
    from . import digest

    return digest


def _schedules(state: State, name: str | None) -> list[str]:
    if name is None:
        return list(state.config.schedules)
    state.config.schedule(name)  # raises with the known names
    return [name]


def _print_feeds(reports: list[digest.FeedReport]) -> None:
    for f in reports:
        if f.status == FetchStatus.ERROR:
            click.echo(f"  feed error   {_safe(f.error)}", err=True)
            continue
        click.echo(f"  {f.status:<12} {f.new:>3} new  {_safe(f.url)}")
        if f.warning:
            click.echo(f"  warning: {_safe(f.url)}: {_safe(f.warning)}", err=True)


@main.command()
@click.pass_obj
def check(state: State) -> None:
    """Validate schedules.yaml, subscriber lists and templates; print what is wrong."""
    config = state.config
    with state.context() as ctx:
        result = _digest().check(ctx)
    for line in result.lines:
        click.echo(_safe(line))
    for warning in result.warnings:
        click.echo(f"warning: {_safe(warning)}", err=True)
    click.echo(f"{config.path}: {len(config.schedules)} schedule(s) OK")


@main.command()
@click.argument("schedule", required=False)
@click.pass_obj
def fetch(state: State, schedule: str | None) -> None:
    """Poll the feeds (of SCHEDULE, or of all schedules) and store new entries."""
    names = _schedules(state, schedule)
    with state.context() as ctx:
        reports = _digest().fetch(ctx, names)
    _print_feeds(reports)
    new = sum(f.new for f in reports)
    errors = sum(f.status == FetchStatus.ERROR for f in reports)
    click.echo(f"{len(reports)} feed(s), {new} new entries, {errors} error(s)")


EX_TEMPFAIL = 75  # sysexits.h: "try again later", what a paused send is


@contextmanager
def _progress() -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A progress bar per issue on a terminal; nothing at all in logs."""
    bars: list[Any] = []
    started = [0.0]

    def on_issue(total: int) -> None:
        if bars:
            bars.pop().__exit__(None, None, None)
        if total and sys.stderr.isatty():
            started[0] = time.monotonic()
            bar = click.progressbar(
                length=total,
                label="sending",
                file=sys.stderr,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda rate: rate,
            )
            bars.append(bar.__enter__())

    def progress(n: int) -> None:
        if bars:
            bar = bars[0]
            took = time.monotonic() - started[0]
            rate = f"{(bar.pos + n) / took:.0f} msg/s" if took > 0 else None
            bar.update(n, rate)

    try:
        yield on_issue, progress
    finally:
        if bars:
            bars.pop().__exit__(None, None, None)


WAIT = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Wait this long for another process running this schedule (default: exit at once).",
)


@main.command("send-digest")
@click.argument("schedule")
@click.option(
    "--dry-run", is_flag=True, help="Write every message to the outbox; send nothing, change no state."
)
@click.option(
    "--to", "to", metavar="ADDRESS", help="Send the next issue to ADDRESS only, outside the ledger."
)
@click.option("--force", is_flag=True, help="Build an issue of the latest entries even when nothing is new.")
@WAIT
@click.pass_obj
def send_digest(state: State, schedule: str, dry_run: bool, to: str | None, force: bool, wait: float) -> None:
    """Fetch, build the next issue of SCHEDULE and deliver it."""
    if dry_run and to:
        raise click.UsageError("--dry-run and --to do not go together")
    config = state.config
    config.schedule(schedule)
    with state.context() as ctx, _progress() as (on_issue, progress):
        report = _digest().send_digest(
            ctx,
            schedule,
            dry_run=dry_run,
            to=to,
            force=force,
            wait=wait,
            progress=progress,
            on_issue=on_issue,
        )
    _print_feeds(report.feeds)
    for warning in report.warnings:
        click.echo(f"warning: {_safe(warning)}", err=True)
    if not report.issues and not report.aborted:
        click.echo(f"{schedule}: nothing new" + ("" if force else " (use --force to send the latest anyway)"))
    for item in report.issues:
        verb = "rendered" if dry_run else "sent"
        click.echo(
            f'{schedule} #{item.number} "{_safe(item.subject)}": {item.articles} article(s),'
            f" {item.html_bytes / 1024:.0f} KB HTML; {verb} {item.sent}, pending {item.pending},"
            f" failed {item.failed}"
            + (f", skipped {item.skipped}" if item.skipped else "")
            + _unfinished(item, bool(to or dry_run))
        )
        for recipient, reply in item.errors:
            click.echo(f"  {_safe(recipient)}: {_safe(reply)}", err=True)
    if report.outbox:
        click.echo(f"dry run: messages written to {report.outbox}; no state changed")
    if report.aborted:
        click.echo(f"error: {_safe(report.aborted)}", err=True)
    if report.paused and not report.aborted:
        # Not a failure: the rest goes when the window opens or the quota allows.
        click.echo(f"paused: {_safe(report.paused)}; run again then (the daemon does it by itself)")
        if report.finish:
            click.echo(f"expected to finish {report.finish:%Y-%m-%d %H:%M %Z}")
        sys.exit(EX_TEMPFAIL)
    sys.exit(0 if report.ok else 1)


def _unfinished(item: digest.IssueReport, outside_ledger: bool) -> str:
    if item.complete or outside_ledger:
        return ""
    if item.pending and item.pending == item.elsewhere:
        return " (the rest is being sent by another process)"
    if item.elsewhere:
        return f" ({item.elsewhere} being sent by another process; run again to retry the rest)"
    return " (unfinished: run again to retry)"


@main.command()
@click.argument("schedule", required=False)
@click.pass_obj
def status(state: State, schedule: str | None) -> None:
    """Last issues, deliveries sent / pending / failed, and feed health."""
    names = _schedules(state, schedule)
    with state.context() as ctx:
        for name in names:
            s = _digest().schedule_status(ctx, name)
            click.echo(f"{name}: {s.subscribers} subscriber(s), {s.waiting} new entries waiting")
            when = f"{s.next_run:%Y-%m-%d %H:%M %Z}" if s.next_run else "by hand (no when:)"
            click.echo(f"  next run: {when}; deliveries waiting for a retry: {s.retries}")
            if s.paused:
                click.echo(f"  paused: {_safe(s.paused)}")
            if s.retries:
                rate = f"{s.rate:.1f} msg/s over the last minute" if s.rate else "not sending now"
                finish = f"; expected to finish {s.finish:%Y-%m-%d %H:%M %Z}" if s.finish else ""
                click.echo(f"  sending: {rate}{finish}")
                more = ", ..." if s.retries > len(s.still_pending) else ""
                click.echo(f"  still pending: {_safe(', '.join(s.still_pending))}{more}")
            for line in _senders(s.batches):
                click.echo(f"    {line}")
            if not s.issues:
                click.echo("  no issues yet")
            for issue, counts in s.issues:
                click.echo(
                    f"  #{issue.number} {issue.created_at:%Y-%m-%d %H:%M} UTC {issue.status:<8}"
                    f" sent {counts.sent}, pending {counts.pending}, failed {counts.failed}"
                    f"  {_safe(issue.subject)}"
                )
            for f in s.feeds:
                health = f.last_status or "never fetched"
                if f.last_status == FetchStatus.ERROR:
                    health = f"error ({f.consecutive_errors} in a row): {_safe(f.last_error)}"
                click.echo(
                    f"  feed {_safe(f.url)}: {health}; last checked {f.last_checked or '-'},"
                    f" {f.error_count} error(s) in all"
                )


# A lease with less than this left is "about to expire": its holder has stopped renewing.
LEASE_WARNING = 10.0


def _senders(batches: list[Batch]) -> list[str]:
    """One line per process holding batches: how many rows, its rate, its nearest expiry."""
    from .claims import shown_host

    by: dict[tuple[str, int], list[Batch]] = {}
    for b in batches:
        by.setdefault((shown_host(b.host), b.pid), []).append(b)
    lines = []
    for (host, pid), held in by.items():
        rows, sent = sum(b.size for b in held), sum(b.sent for b in held)
        rate = sum(b.sent / b.age for b in held if b.age > 0)
        left = min(b.lease_left for b in held)
        lease = f"lease expired {-left:.0f} s ago" if left <= 0 else f"lease ends in {left:.0f} s"
        if 0 < left < LEASE_WARNING:
            lease += " (about to expire)"
        lines.append(
            f"{_safe(host)} (pid {pid}): {len(held)} batch(es), {rows} row(s), {sent} sent,"
            f" {rate:.1f} msg/s; {lease}"
        )
    return lines


LOG_FORMAT = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="One line per event, as text or JSON.",
)
RELOAD = click.option(
    "--reload", "watch", is_flag=True, help="Reread schedules.yaml whenever it changes (as on SIGHUP)."
)


@main.command()
@LOG_FORMAT
@RELOAD
@click.pass_obj
def run(state: State, log_format: str, watch: bool) -> None:
    """Run the schedules until SIGTERM or SIGINT; SIGHUP rereads the configuration."""
    from .daemon import Daemon, setup_logging

    setup_logging(log_format)
    Daemon(state.config_path, watch=watch).run()


@main.command()
@LOG_FORMAT
@RELOAD
@click.pass_obj
def worker(state: State, log_format: str, watch: bool) -> None:
    """Only deliver: help send the issues that daemons on the same database build."""
    from .daemon import Daemon, setup_logging

    setup_logging(log_format)
    Daemon(state.config_path, watch=watch, worker=True).run()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8800, show_default=True, help="Port to listen on.")
@click.option("--open", "open_browser", is_flag=True, help="Open the preview in a browser.")
@click.pass_obj
def preview(state: State, host: str, port: int, open_browser: bool) -> None:
    """Look at every email before it goes out, in a browser; reloads as you edit templates."""
    from werkzeug.serving import run_simple

    from .web import create_preview_app

    app = create_preview_app(state.config_path, host=host)
    url = f"http://{host}:{port}/"
    click.echo(f"preview at {url} (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    run_simple(host, port, app, threaded=True, use_reloader=False)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port to listen on.")
@click.option("--threads", default=4, show_default=True, help="Worker threads.")
@click.pass_obj
def serve(state: State, host: str, port: int, threads: int) -> None:
    """The public part, unsubscribe pages and the archive, on waitress (a production WSGI server)."""
    import waitress

    from .web import WAITRESS_LIMITS, create_public_app

    app = create_public_app(state.config_path)
    click.echo(f"serving unsubscribe and archive pages at http://{host}:{port}/")
    waitress.serve(app, host=host, port=port, threads=threads, **WAITRESS_LIMITS)


@main.group()
def subscribers() -> None:
    """Show and export subscriber lists as they really are (unsubscribes applied)."""


def _list_path(state: State, name: str) -> Path:
    path = state.config.base_dir / "subscribers" / f"{name}.csv"
    if not path.is_file():
        raise click.UsageError(f"no subscriber list {path}")
    return path


@subscribers.command("list")
@click.argument("name")
@click.pass_obj
def subscribers_list(state: State, name: str) -> None:
    """Every address in subscribers/NAME.csv and whether it still gets email."""
    from .subscribers import sync

    path = _list_path(state, name)
    with state.context() as ctx:
        store = ctx.store
        for problem in sync(store, name, path).problems:
            click.echo(f"warning: {_safe(problem)}", err=True)
        for sub, suppressed in store.subscribers(name):
            mark = "unsubscribed" if suppressed else "active"
            click.echo(f"{mark:<13} {_safe(sub.email)}" + (f"  ({_safe(sub.name)})" if sub.name else ""))
        total, active = store.subscriber_counts(name)
    click.echo(f"{active} active, {total - active} unsubscribed", err=True)


@subscribers.command("suppressed")
@click.argument("name")
@click.pass_obj
def subscribers_suppressed(state: State, name: str) -> None:
    """Addresses that unsubscribed from NAME, when and how."""
    _list_path(state, name)
    with state.context() as ctx:
        suppressed = ctx.store.suppressed(name)
    for s in suppressed:
        click.echo(f"{s.created_at:%Y-%m-%d %H:%M} UTC  {_safe(s.source):<9} {_safe(s.address)}")


@subscribers.command("export")
@click.argument("name")
@click.option(
    "--out", type=click.File("w", encoding="utf-8"), default="-", help="File to write (default stdout)."
)
@click.pass_obj
def subscribers_export(state: State, name: str, out: Any) -> None:
    """Write NAME as CSV without the addresses that unsubscribed (cells safe for spreadsheets)."""
    from .subscribers import export, sync

    path = _list_path(state, name)
    with state.context() as ctx:
        problems = sync(ctx.store, name, path).problems
        export(ctx.store, name, out)
    for problem in problems:
        click.echo(f"warning: {_safe(problem)}", err=True)


@main.command()
@click.argument("schedule")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the static pages.")
@click.pass_obj
def archive(state: State, schedule: str, out: str) -> None:
    """Publish SCHEDULE's past issues as static HTML (index.html and one page per issue)."""
    from .preview import export_archive

    with state.context() as ctx:
        written = export_archive(ctx, schedule, Path(out))
    click.echo(f"{len(written)} page(s) written to {out}")


@main.command()
@click.argument("schedule")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option("--limit", default=5, show_default=True, help="How many of the newest articles.")
@click.pass_obj
def share(state: State, schedule: str, as_json: bool, limit: int) -> None:
    """Ready-to-post text for the newest articles, per network, with their share links."""
    import json

    from .social import newest_snippets

    state.config.schedule(schedule)
    with state.context() as ctx:
        items = newest_snippets(ctx, schedule, limit)
    if as_json:
        doc = [
            {
                "title": i.title,
                "link": i.link,
                "snippets": {
                    n: {"text": t, "count": c, "limit": lim} for n, (t, c, lim) in i.snippets.items()
                },
                "share_links": dict(i.share_links),
                "unfit": i.unfit,
            }
            for i in items
        ]
        # JSON escapes C0 controls itself; DEL, C1 (0x9b is CSI) and the bidi overrides it leaves
        # raw, and a terminal would act on them. Escaped (\u009b) the document means the same.
        text = json.dumps(doc, ensure_ascii=False, indent=2)
        raw = re.compile(r"[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
        click.echo(raw.sub(lambda m: f"\\u{ord(m.group()):04x}", text))
        return
    if not items:
        click.echo(f"{schedule}: no articles stored yet (run newsletter fetch)")
    for i in items:
        click.echo(f"# {_plain(i.title)}\n  {_plain(i.link)}")
        for network, (text, used, cap) in i.snippets.items():
            click.echo(f"\n  [{network} {used}/{cap}]")
            # A snippet's own line breaks are kept (posts have them); a feed's CR or ESC is not.
            click.echo("\n".join("    " + _plain(line) for line in text.split("\n")))
        for network, reason in i.unfit.items():
            click.echo(f"\n  [{network}] none: {_safe(reason)}")
        click.echo("")


@main.command()
@click.argument("schedule")
@click.option("--no-fetch", is_flag=True, help="Post what is stored; do not poll the feeds first.")
@WAIT
@click.pass_obj
def post(state: State, schedule: str, no_fetch: bool, wait: float) -> None:
    """Announce SCHEDULE's new articles to its post: targets (webhooks), once each."""
    from .social import post_new

    config = state.config
    if not config.schedule(schedule).post:
        raise click.UsageError(f"schedule {schedule!r} has no post: targets")
    with state.context() as ctx:
        if not no_fetch:
            _print_feeds(_digest().fetch(ctx, [schedule]))
        reports = post_new(ctx, schedule, wait=wait)
    bad = False
    for r in reports:
        click.echo(
            f"{_safe(r.target)}: posted {r.posted_now} now; in all sent {r.posted}, pending {r.pending},"
            f" failed {r.failed}"
        )
        for title, reason in r.errors:
            click.echo(f"  {_safe(title)}: {_safe(reason)}", err=True)
        if r.disabled:
            click.echo(f"error: {_safe(r.target)}: {_safe(r.disabled)}", err=True)
        bad = bad or bool(r.errors or r.disabled)
    sys.exit(1 if bad else 0)


@main.group()
def db() -> None:
    """The state database's schema."""


@db.command("migrate")
@click.pass_obj
def db_migrate(state: State) -> None:
    """Apply the schema migrations the state database lacks (PostgreSQL needs this after an
    upgrade; SQLite applies them by itself). Safe to run from several machines at once."""
    from .store import migrate_database

    config = state.config
    done = migrate_database(config.database_url, config.settings.busy_timeout.total_seconds())
    for name in done.applied:
        click.echo(f"applied {name}")
    click.echo(f"{_safe(done.where)}: schema {done.version}" + ("" if done.applied else ", nothing to apply"))
