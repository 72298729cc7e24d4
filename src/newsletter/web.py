"""The web side: a public WSGI app (unsubscribe, archive) and the local preview app.

``create_public_app`` is what ``newsletter serve`` runs and what any WSGI server can mount
(``waitress-serve --call newsletter.web:create_public_app``); ``create_preview_app`` is
``newsletter preview``, meant for 127.0.0.1 only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, render_template, request

from . import digest, preview, render, social
from .config import Config, load_config
from .errors import NewsletterError
from .store import Store
from .subscribers import sync
from .tokens import TokenError, UnsubscribeTokens

TEMPLATES = Path(__file__).parent / "web_templates"


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

    def store(self) -> Store:
        return Store(self.config.database_url)


def _app(name: str) -> Flask:
    app = Flask(name, template_folder=str(TEMPLATES))
    app.jinja_env.autoescape = True

    @app.errorhandler(NewsletterError)
    def error(exc: NewsletterError) -> tuple[str, int]:
        return render_template(
            "message.html", title="Something is wrong", message=str(exc), hint=exc.hint
        ), 500

    return app


def _tokens(state: _State, store: Store) -> UnsubscribeTokens:
    return UnsubscribeTokens(os.environ.get("NEWSLETTER_SECRET") or store.secret("unsubscribe"))


def _list_titles(config: Config, list_name: str) -> str:
    titles = [s.title or n for n, s in config.schedules.items() if s.subscribers == list_name]
    return ", ".join(titles) or list_name


def _public_routes(app: Flask, state: _State) -> None:
    @app.route("/unsubscribe/<token>", methods=["GET", "POST"])
    def unsubscribe(token: str) -> tuple[str, int]:
        config = state.config
        with state.store() as store:
            try:
                list_name, address = _tokens(state, store).read(token, config.settings.unsubscribe_link_days)
            except TokenError as exc:
                # Forged, tampered or expired: refused, and nothing changes.
                return render_template(
                    "message.html",
                    title="Link not valid",
                    message=str(exc),
                    hint="Use the link in a more recent email.",
                ), 400
            title = _list_titles(config, list_name)
            if request.method == "GET":
                # Mail scanners follow links: a GET only asks, it never unsubscribes.
                return render_template("unsubscribe.html", address=address, title=title, token=token), 200
            one_click = request.form.get("List-Unsubscribe") == "One-Click"
            store.suppress(list_name, address, "one-click" if one_click else "page")
        return render_template(
            "message.html",
            title="Unsubscribed",
            message=f"{address} will get no more email from {title}.",
            hint="",
        ), 200

    @app.route("/archive/")
    def archive_index() -> str:
        config = state.config
        with state.store() as store:
            schedules = [(n, s.title or n, store.issues(n, limit=1000)) for n, s in config.schedules.items()]
        return render_template("archive.html", schedules=schedules)

    @app.route("/archive/<schedule>/<int:number>/")
    def archive_issue(schedule: str, number: int) -> Response:
        config = state.config
        config.schedule(schedule)
        with state.store() as store:
            try:
                issue = preview.sent_issue(config, store, schedule, number)
            except NewsletterError:
                abort(404)
        return Response(issue.html, mimetype="text/html")


def create_public_app(config_path: str | None = None) -> Flask:
    """Unsubscribe pages and the archive; mount it behind any WSGI server."""
    state = _State(config_path)
    app = _app("newsletter.public")
    _public_routes(app, state)
    return app


VIEWS: dict[str, Callable[[str], str]] = {
    "normal": lambda html: html,
    "dark": preview.dark_view,
    "stripped": preview.stripped_view,
}


def create_preview_app(config_path: str | None = None) -> Flask:
    state = _State(config_path)
    app = _app("newsletter.preview")
    _public_routes(app, state)

    @app.context_processor
    def stamp() -> dict[str, Any]:
        return {"stamp": state.stamp, "config_error": state.error}

    @app.route("/_stamp")
    def current_stamp() -> Response:
        return jsonify(stamp=state.stamp)

    @app.route("/")
    def index() -> str:
        config = state.config
        with state.store() as store:
            rows = [digest.schedule_status(config, store, n) for n in config.schedules]
        return render_template("index.html", rows=rows, config=config)

    def _next(name: str) -> preview.Preview:
        config = state.config
        config.schedule(name)
        with state.store() as store:
            found = preview.next_issue(config, store, name, request.args.get("subscriber") or None)
        if found is None:
            abort(404, "no entries stored for this schedule yet: run newsletter fetch")
        return found

    @app.route("/schedules/<name>/")
    def schedule_page(name: str) -> str:
        issue = _next(name)
        config = state.config
        with state.store() as store:
            past = store.issues(name, limit=20)
            snippets = social.entry_snippets(config, name, store.entries([a["id"] for a in issue.articles]))
            schedule = config.schedule(name)
            sync(store, schedule.subscribers, config.subscribers_path(schedule))
            subscribers = [sub for sub, _ in islice(store.subscribers(schedule.subscribers, page=200), 200)]
        return render_template(
            "schedule.html",
            name=name,
            issue=issue,
            past=past,
            subscribers=subscribers,
            snippets=snippets,
        )

    @app.route("/schedules/<name>/email.html")
    def email_html(name: str) -> Response:
        view = VIEWS.get(request.args.get("view", "normal"), VIEWS["normal"])
        return Response(view(_next(name).html), mimetype="text/html")

    @app.route("/schedules/<name>/issues/<int:number>/")
    def past_issue(name: str, number: int) -> str:
        config = state.config
        with state.store() as store:
            try:
                issue = preview.sent_issue(config, store, name, number)
            except NewsletterError:
                abort(404)
        return render_template("issue.html", name=name, issue=issue)

    @app.route("/schedules/<name>/test", methods=["POST"])
    def test_send(name: str) -> tuple[str, int]:
        address = (request.form.get("address") or "").strip()
        if "@" not in address:
            return render_template(
                "message.html", title="No address", message="Give an address to send to.", hint=""
            ), 400
        config = state.config
        with state.store() as store:
            report = digest.send_digest(config, store, name, to=address, force=True, fetch_feeds=False)
        if report.aborted or not report.issues or report.issues[0].failed:
            reason = report.aborted or (report.issues[0].errors[0][1] if report.issues else "nothing to send")
            return render_template(
                "message.html", title="Not sent", message=f"{address}: {reason}", hint=""
            ), 502
        return render_template(
            "message.html",
            title="Sent",
            message=f"A test copy of #{report.issues[0].number} went to {address}.",
            hint="It is not recorded in the ledger.",
        ), 200

    return app
