"""The web side: a public WSGI app (unsubscribe, archive) and the local preview app.

``create_public_app`` is what ``newsletter serve`` runs and what any WSGI server can mount
(``waitress-serve --call newsletter.web:create_public_app``); ``create_preview_app`` is
``newsletter preview``, meant for 127.0.0.1 only.

Only a POST changes anything. The public app trusts nothing but the signed token in the URL;
the preview, which shows every address and can send mail, also refuses requests that name
another host (DNS rebinding) or come from another site (CSRF), and sends few test copies.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, jsonify, render_template, request

from . import digest, preview, render, social
from .config import Config, load_config
from .context import RunContext
from .errors import ConfigError, NewsletterError
from .redact import redact
from .sanitize import printable
from .storage import Storage
from .subscribers import address_checker, fingerprint
from .tokens import TokenError

TEMPLATES = Path(__file__).parent / "web_templates"
log = logging.getLogger(__name__)

# An RFC 8058 body is 26 bytes and the test-send form one address: a larger body is refused
# (413) before it is parsed, under any WSGI server. ``newsletter serve`` also caps what
# waitress buffers (by default 1 GB, chunked bodies included) before the app sees a byte; a
# little above the app's cap, so an ordinary 413 still comes from the app, with its headers.
MAX_BODY = 4096
WAITRESS_LIMITS: dict[str, Any] = {"max_request_body_size": 16 * MAX_BODY}

# Test copies go through the real sender: a page left open, or a script, must not turn the
# preview into a relay.
TEST_SENDS_PER_MINUTE = 5
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _State:
    """The configuration, reread when its files change (the preview's save-and-look loop)."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config = load_config(config_path)
        self._stamp = preview.fingerprint(self._config)
        self.error = ""  # the last reload's problem, shown on every preview page

    @property
    def config(self) -> Config:
        stamp = preview.fingerprint(self._config)
        if stamp != self._stamp:
            self._stamp = stamp
            # Jinja2 notices edits to templates it loaded, not a new file that now overrides one.
            render.environment.cache_clear()
            try:
                self._config = load_config(self.config_path)
                self.error = ""
            except NewsletterError as exc:
                self.error = str(exc)  # keep serving the last good configuration meanwhile
        return self._config

    @property
    def stamp(self) -> str:
        self.config  # noqa: B018 - rereads when needed
        return self._stamp

    def context(self) -> RunContext:
        """One request's store, senders and token signer (the configuration as it is now)."""
        return RunContext.open(self.config)


# -- headers every response carries -----------------------------------------------------------

# App pages: nothing but their own nonce'd <style> (and, in the preview, <script>), forms that
# post back here, and (preview) frames of its own emails and the reload poll.
_PAGE_CSP = "default-src 'none'; style-src {nonce}; form-action 'self'; base-uri 'none'"
_PREVIEW_CSP = (
    "default-src 'none'; style-src {nonce}; script-src {nonce};"
    " connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'"
)
# An email: what a mail client allows, inline styles and https images; nothing runs or posts.
_EMAIL_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https:; form-action 'none'; base-uri 'none'"
)


def _page(kind: str) -> None:
    """Mark the response: "email" (an email's HTML) or "archive" (public, cacheable)."""
    g.kind = kind


def _headers(app: Flask, page_csp: str, email_ancestors: str, referrer: str = "no-referrer") -> None:
    @app.before_request
    def nonce() -> None:
        g.nonce = secrets.token_urlsafe(16)

    @app.context_processor
    def csp_nonce() -> dict[str, Any]:
        return {"csp_nonce": g.get("nonce", "")}

    @app.after_request
    def secure(response: Response) -> Response:
        kind = g.get("kind", "page")
        framed = kind in ("email", "archive")
        ancestors = email_ancestors if framed else "'none'"
        nonce = g.get("nonce")
        policy = _EMAIL_CSP if framed else page_csp.format(nonce=f"'nonce-{nonce}'" if nonce else "'none'")
        response.headers["Content-Security-Policy"] = f"{policy}; frame-ancestors {ancestors}"
        response.headers["X-Frame-Options"] = "SAMEORIGIN" if ancestors == "'self'" else "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = referrer
        if kind != "archive":
            # Unsubscribe pages and every preview page show addresses; no cache may keep them.
            response.headers["Cache-Control"] = "no-store"
        return response


def _app(name: str) -> Flask:
    app = Flask(name, template_folder=str(TEMPLATES))
    app.jinja_env.autoescape = True
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_BODY
    return app


def _limit_bodies(app: Flask) -> None:
    """Registered after the other checks: a refused request is not read at all."""

    @app.before_request
    def streamed_body() -> None:
        # A body without Content-Length (chunked) is read only up to MAX_CONTENT_LENGTH, and
        # werkzeug would parse that truncated prefix as the whole form: look one byte past the
        # cap, which raises 413 when the body goes on.
        if request.content_length is None and request.method not in SAFE_METHODS:
            request.get_data(cache=True)
            request.stream.read(1)


def _list_titles(config: Config, list_name: str) -> str:
    titles = [s.title or n for n, s in config.schedules.items() if s.subscribers == list_name]
    return ", ".join(titles) or list_name


def _message(title: str, message: str, hint: str, status: int) -> tuple[str, int]:
    return render_template("message.html", title=title, message=message, hint=hint), status


def _public_routes(app: Flask, state: _State) -> None:
    @app.route("/unsubscribe/<token>", methods=["GET", "POST"])
    def unsubscribe(token: str) -> tuple[str, int]:
        # Parsed first, so a body over the cap is a 413 before anything else happens.
        one_click = request.method == "POST" and request.form.get("List-Unsubscribe") == "One-Click"
        config = state.config
        with state.context() as ctx:
            try:
                list_name, address = ctx.tokens.read(token, config.settings.unsubscribe_link_days)
            except TokenError as exc:
                # Forged, tampered or expired: refused, and nothing changes.
                return _message("Link not valid", str(exc), "Use the link in a more recent email.", 400)
            title = _list_titles(config, list_name)
            if request.method != "POST":
                # Mail scanners and link prefetchers GET and HEAD links: they only ever see
                # the question. The token is the credential, so the page's form needs no CSRF
                # token: a third party who can forge this POST already holds the link.
                return render_template("unsubscribe.html", address=address, title=title, token=token), 200
            ctx.store.suppress(list_name, address, "one-click" if one_click else "page")
        return _message("Unsubscribed", f"{address} will get no more email from {title}.", "", 200)

    def archived(config: Config, name: str) -> bool:
        schedule = config.schedules.get(name)
        return schedule is not None and schedule.archive

    @app.route("/archive/")
    def archive_index() -> str:
        _page("archive")
        config = state.config
        with state.context() as ctx:
            schedules = [
                (n, s.title or n, ctx.store.issues(n, limit=1000))
                for n, s in config.schedules.items()
                if archived(config, n)
            ]
        return render_template("archive.html", schedules=schedules)

    @app.route("/archive/<schedule>/<int:number>/")
    def archive_issue(schedule: str, number: int) -> Response:
        config = state.config
        if not archived(config, schedule):
            abort(404)  # a schedule that is not public does not exist, whatever its name
        with state.context() as ctx:
            try:
                issue = preview.sent_issue(ctx, schedule, number)
            except ConfigError:
                abort(404)
        _page("archive")
        return Response(issue.html, mimetype="text/html")


def create_public_app(config_path: str | None = None) -> Flask:
    """Unsubscribe pages and the archive; mount it behind any WSGI server."""
    state = _State(config_path)
    app = _app("newsletter.public")
    _headers(app, _PAGE_CSP, "'none'")
    _limit_bodies(app)

    @app.errorhandler(NewsletterError)
    def error(exc: NewsletterError) -> tuple[str, int]:
        # The details (paths, names) are for the operator's log, not for the internet.
        # The path is the visitor's, decoded: %0A or %1B in it must not forge or colour a line.
        log.error("%s", printable(redact(f"{request.method} {request.path}: {exc}")))
        return _message("Something is wrong", "This page cannot be shown right now.", "Try again later.", 500)

    _public_routes(app, state)
    return app


VIEWS: dict[str, Callable[[str], str]] = {
    "normal": lambda html: html,
    "dark": preview.dark_view,
    "stripped": preview.stripped_view,
}


class _RateLimit:
    """At most ``limit`` events in any ``window`` seconds, for this process."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when an event may happen now (and it is counted), else seconds to wait."""
        with self._lock:
            clock = time.monotonic()
            while self._times and clock - self._times[0] >= self.window:
                self._times.popleft()
            if len(self._times) >= self.limit:
                return self.window - (clock - self._times[0])
            self._times.append(clock)
            return 0.0


def _guard_preview(app: Flask, host: str | None) -> None:
    """Loopback names only, and no state change from another site."""
    allowed = set(LOOPBACK)
    if host:
        allowed.add(host.strip("[]").lower())

    @app.before_request
    def guard() -> Response | None:
        # A DNS-rebinding page reaches 127.0.0.1 under its own name: refuse any other Host,
        # or it could read the list and its unsubscribe tokens.
        name = urlsplit(f"//{request.host}").hostname if request.host else None
        if name is None or name not in allowed:
            # Plain text: nothing of the configuration reaches a page under another name.
            return Response(
                "Unknown host: the preview answers only to its own address.\n", 400, mimetype="text/plain"
            )
        if request.method in SAFE_METHODS:
            return None
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        own = f"{request.scheme}://{request.host}".lower()
        if (site is not None and site not in ("same-origin", "none")) or (
            origin is not None and origin.lower() != own
        ):
            return Response("Refused: a request from another site.\n", 403, mimetype="text/plain")
        return None


def create_preview_app(config_path: str | None = None, host: str | None = None) -> Flask:
    """The local preview; ``host`` is the address it listens on (loopback names always work)."""
    state = _State(config_path)
    app = _app("newsletter.preview")
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" even on a
    # same-origin POST, and the Origin check below could not tell the page's own form from a
    # forgery. Other sites still get no Referer, as with no-referrer (Django's default too).
    _headers(app, _PREVIEW_CSP, "'self'", referrer="same-origin")
    _guard_preview(app, host)
    _limit_bodies(app)
    # Per process: the form's token is in every page, and a page from another site cannot read it.
    csrf = secrets.token_urlsafe(32)

    @app.errorhandler(NewsletterError)
    def error(exc: NewsletterError) -> tuple[str, int]:
        return _message("Something is wrong", str(exc), exc.hint, 500)

    @app.context_processor
    def stamp() -> dict[str, Any]:
        return {"stamp": state.stamp, "config_error": state.error, "preview": True, "csrf_token": csrf}

    _public_routes(app, state)
    _preview_pages(app, state)
    _test_send_route(app, state, csrf, _RateLimit(TEST_SENDS_PER_MINUTE))
    return app


def _known(state: _State, name: str) -> Config:
    """The configuration, if it has a schedule ``name``; a 404 that names nothing otherwise."""
    config = state.config
    if name not in config.schedules:
        abort(404)
    return config


def _preview_pages(app: Flask, state: _State) -> None:
    """What is there to look at: every schedule, its next issue as a reader gets it, past issues."""

    @app.route("/_stamp")
    def current_stamp() -> Response:
        return jsonify(stamp=state.stamp)

    @app.route("/")
    def index() -> str:
        config = state.config
        with RunContext.open(config) as ctx:
            rows = [digest.schedule_status(ctx, n) for n in config.schedules]
        return render_template("index.html", rows=rows, config=config)

    def next_issue(name: str) -> preview.Preview:
        with RunContext.open(_known(state, name)) as ctx:
            found = preview.next_issue(ctx, name, request.args.get("subscriber") or None)
        if found is None:
            abort(404, "no entries stored for this schedule yet: run newsletter fetch")
        return found

    def sent_issue(name: str, number: int) -> preview.Preview:
        with RunContext.open(_known(state, name)) as ctx:
            try:
                return preview.sent_issue(ctx, name, number)
            except ConfigError:
                abort(404)

    @app.route("/schedules/<name>/")
    def schedule_page(name: str) -> str:
        issue = next_issue(name)
        config = state.config
        schedule = config.schedule(name)
        with RunContext.open(config) as ctx:
            store = ctx.store
            past = store.issues(name, limit=20)
            snippets = social.entry_snippets(config, name, store.entries([a["id"] for a in issue.articles]))
            # The list as last read by a send or `check`: a page view reads no CSV, so a broken
            # or half-saved file never breaks the preview, and a large one is hashed, not parsed.
            subscribers = [sub for sub, _ in islice(store.subscribers(schedule.subscribers, page=200), 200)]
            list_note = _list_note(store, schedule.subscribers, config.subscribers_path(schedule))
        return render_template(
            "schedule.html",
            name=name,
            issue=issue,
            past=past,
            subscribers=subscribers,
            snippets=snippets,
            list_note=list_note,
        )

    @app.route("/schedules/<name>/email.html")
    def email_html(name: str) -> Response:
        view = VIEWS.get(request.args.get("view", "normal"), VIEWS["normal"])
        html = view(next_issue(name).html)
        _page("email")
        return Response(html, mimetype="text/html")

    @app.route("/schedules/<name>/issues/<int:number>/")
    def past_issue(name: str, number: int) -> str:
        issue = sent_issue(name, number)
        public = state.config.schedule(name).archive
        return render_template("issue.html", name=name, issue=issue, public=public)

    @app.route("/schedules/<name>/issues/<int:number>/email.html")
    def past_email(name: str, number: int) -> Response:
        html = sent_issue(name, number).html
        _page("email")
        return Response(html, mimetype="text/html")


def _test_send_route(app: Flask, state: _State, csrf: str, test_sends: _RateLimit) -> None:
    """A test copy through the real sender: the one state change the preview makes."""

    @app.route("/schedules/<name>/test", methods=["POST"])
    def test_send(name: str) -> Response | tuple[str, int]:
        given = request.form.get("csrf", "")
        if not hmac.compare_digest(given.encode(), csrf.encode()):
            return _message(
                "Refused", "This form is out of date or came from another site.", "Reload the page.", 403
            )
        config = _known(state, name)
        raw = " ".join((request.form.get("address") or "").split())
        try:
            address = address_checker()(raw)  # the check every subscriber list gets
        except ValueError as exc:
            return _message("Not an address", f"{raw!r}: {exc}", "Give one address to send to.", 400)
        wait = test_sends.take()
        if wait:
            seconds = math.ceil(wait)
            body, status = _message(
                "Too many test sends",
                f"At most {TEST_SENDS_PER_MINUTE} test copies a minute.",
                f"Try again in {seconds} seconds.",
                429,
            )
            return Response(body, status, {"Retry-After": str(seconds)})
        with RunContext.open(config) as ctx:
            report = digest.send_digest(ctx, name, to=address, force=True, fetch_feeds=False)
        if report.aborted or not report.issues or report.issues[0].failed:
            reason = report.aborted or (report.issues[0].errors[0][1] if report.issues else "nothing to send")
            return _message("Not sent", f"{address}: {reason}", "", 502)
        return _message(
            "Sent",
            f"A test copy of #{report.issues[0].number} went to {address}.",
            "It is not recorded in the ledger.",
            200,
        )


def _list_note(store: Storage, list_name: str, path: Path) -> str:
    """Why the list shown may not be the file as it is now (empty when it is)."""
    source = store.subscriber_source(list_name)
    if source is None:
        return f"{path.name} has not been read yet: `newsletter check` reads it."
    try:
        current = fingerprint(path)
    except ConfigError as exc:
        return f"{exc}; showing the list as last read."
    if current != source.fingerprint:
        return f"{path.name} changed since it was last read: `newsletter check` or the next send reads it."
    return ""
