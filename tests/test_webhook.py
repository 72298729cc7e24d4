"""The webhook sender against real HTTP receivers on 127.0.0.1 that check what each platform documents.

Each receiver runs its checks in the server thread; a failed check answers 400 and is kept in
``receiver.errors``, which every test asserts is empty, so a wrong request cannot pass unseen.
No timing asserts: where waits matter, the receiver's arrival times give a lower bound.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import FeedServer, Project, Route, free_port
from newsletter.errors import DeliveryError, PermanentFailure, TargetGone, TemporaryFailure
from newsletter.senders import Post, SenderSpec, forget_plugins, sender_types
from newsletter.senders.bluesky import bluesky_facets
from newsletter.senders.discord import defuse_mentions
from newsletter.senders.http import HttpSender, with_query
from newsletter.senders.webhook import WebhookOptions, WebhookSender

pytestmark = pytest.mark.timeout(60)

SECRET_KEY = b"\x01\x02 a key the receiver and the sender share \xfe\xff"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()


# --- a receiver ------------------------------------------------------------------------------


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], bytes]
Respond = Callable[[Hit, int], Reply]  # the hit and how many came before it


def ok(payload: Any = None, status: int = 200, **headers: str) -> Reply:
    body = b"" if payload is None else json.dumps(payload).encode()
    return status, {"Content-Type": "application/json", **headers}, body


class Receiver:
    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.hits: list[Hit] = []
        self.errors: list[str] = []
        self.answered = 0
        self.release = threading.Event()  # lets a receiver that "never answers" finish at teardown
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                hit = Hit(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    time.monotonic(),
                )
                with receiver.lock:
                    n = len(receiver.hits)
                    receiver.hits.append(hit)
                try:
                    status, headers, body = receiver.respond(hit, n)
                except AssertionError as exc:
                    with receiver.lock:
                        receiver.errors.append(f"{hit.path}: {exc}")
                    status, headers, body = 400, {}, f"receiver check failed: {exc}".encode()
                if receiver.release.is_set():
                    return  # the client gave up long ago
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with receiver.lock:
                    receiver.answered += 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def wait_for_hits(self, n: int, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while len(self.hits) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], Receiver]]:
    started: list[Receiver] = []

    def start(respond: Respond) -> Receiver:
        started.append(Receiver(respond))
        return started[-1]

    yield start
    for r in started:
        r.close()


def sender(tmp_path: Path, **options: Any) -> HttpSender:
    # As schedules.yaml's type: webhook builds it: format: X is served by X's own sender.
    built = SenderSpec("hook", WebhookSender, WebhookOptions.model_validate(options), tmp_path).build()
    assert isinstance(built, HttpSender)
    return built


def watch_waits(s: HttpSender, *, real: bool = True) -> list[float]:
    """Record every wait the sender asks for (and, with real, actually wait)."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if real:
            time.sleep(seconds)

    s.sleep = sleep
    return waits


def article(n: int = 1, **changes: Any) -> Post:
    link = f"https://blog.test/posts/{n}?utm_source=hook&utm_medium=social"
    fields: dict[str, Any] = {
        "id": f"weekly:article:https://blog.test/posts/{n}",
        "kind": "article",
        "schedule": "weekly",
        "title": f"Post {n}",
        "link": link,
        "summary": f"Body of post {n}.",
        "text": f"Post {n}\n\nBody of post {n}.\n\n{link} #Python",
        "hashtags": ("#Python",),
        "published": "2026-01-01T01:00:00+00:00",
        **changes,
    }
    return Post(**fields)


# --- json: Standard Webhooks ---------------------------------------------------------------------


def verify_standard_webhook(hit: Hit, key: bytes = SECRET_KEY) -> dict[str, Any]:
    """What a Standard Webhooks receiver does before it trusts a delivery."""
    msg_id = hit.headers["webhook-id"]
    ts = hit.headers["webhook-timestamp"]
    assert re.fullmatch(r"\d+", ts), ts
    assert abs(int(ts) - time.time()) < 300, "timestamp outside the 5-minute replay window"
    signed = f"{msg_id}.{ts}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = [sig.split(",", 1) for sig in hit.headers["webhook-signature"].split(" ")]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in versions), "bad signature"
    assert hit.headers["content-type"].startswith("application/json")
    payload: dict[str, Any] = hit.json()
    return payload


def test_json_delivery_is_signed_the_standard_webhooks_way(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        verify_standard_webhook(hit)
        return ok({"received": True})

    receiver = serve(respond)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    item = article(1)
    issue = article(
        2,
        id="weekly:issue:7",
        kind="issue",
        title="Test Weekly #7",
        issue_number=7,
        articles=(("Post 1", "https://blog.test/posts/1"), ("Post 2", "https://blog.test/posts/2")),
    )
    with sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET") as s:
        assert s.post(item) == ""
        assert s.post(issue) == ""

    assert receiver.errors == []
    first, second = (h.json() for h in receiver.hits)
    assert receiver.hits[0].headers["webhook-id"] == item.id
    assert first["type"] == "article.published"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", first["timestamp"])
    assert first["data"] == {
        "id": item.id,
        "kind": "article",
        "schedule": "weekly",
        "title": "Post 1",
        "link": item.link,
        "summary": "Body of post 1.",
        "text": item.text,
        "hashtags": ["#Python"],
        "published": "2026-01-01T01:00:00+00:00",
        "image_url": "",
        "issue_number": None,
        "articles": [],
    }
    assert receiver.hits[1].headers["webhook-id"] == "weekly:issue:7"
    assert second["type"] == "issue.published"
    assert second["data"]["issue_number"] == 7
    assert second["data"]["articles"] == [
        {"title": "Post 1", "link": "https://blog.test/posts/1"},
        {"title": "Post 2", "link": "https://blog.test/posts/2"},
    ]


def test_an_id_that_cannot_be_a_header_gets_a_stable_stand_in(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = serve(lambda hit, n: (verify_standard_webhook(hit), ok())[1])
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    item = article(id="weekly:article:https://blog.test/café 1")
    with sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET") as s:
        s.post(item)
        s.post(item)
    assert receiver.errors == []
    ids = [h.headers["webhook-id"] for h in receiver.hits]
    assert ids[0] == ids[1] == "sha256_" + hashlib.sha256(item.id.encode()).hexdigest()
    assert receiver.hits[0].json()["data"]["id"] == item.id


def test_a_wrong_secret_is_refused_and_stops_the_target(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        try:
            verify_standard_webhook(hit)
        except AssertionError:
            return 401, {}, b"invalid signature"
        return ok()

    receiver = serve(respond)
    monkeypatch.setenv(
        "HOOK_SECRET", "whsec_" + base64.b64encode(b"some other key, 32 bytes long!!").decode()
    )
    with (
        pytest.raises(DeliveryError) as err,
        sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET") as s,
    ):
        s.post(article())
    assert "401" in str(err.value) and "HOOK_SECRET" in err.value.hint
    assert len(receiver.hits) == 1  # bad credentials are not retried


def test_503_with_retry_after_is_retried_with_the_same_webhook_id(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        verify_standard_webhook(hit)
        return (503, {"Retry-After": "1"}, b"busy") if n == 0 else ok()

    receiver = serve(respond)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    with sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET") as s:
        waits = watch_waits(s)
        s.post(article())

    assert receiver.errors == []
    first, second = receiver.hits
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == article().id
    assert first.body == second.body  # the same event; only timestamp and signature may change
    assert waits == [1.0]
    assert second.at - first.at >= 1.0  # a lower bound: cannot flake


def test_retry_after_as_an_http_date_and_beyond_max_wait(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        if n == 0:
            when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
            return 429, {"Retry-After": when}, b"slow down"
        if n == 2:
            return 503, {"Retry-After": "3600"}, b"maintenance"
        return ok()

    receiver = serve(respond)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    with sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET", max_wait=5) as s:
        waits = watch_waits(s)
        s.post(article(1))
        assert len(waits) == 1 and 0.5 < waits[0] <= 2.0
        # An hour is more than max_wait: no pointless early retry, the item stays pending.
        with pytest.raises(TemporaryFailure, match="Retry-After 3600 s"):
            s.post(article(2))
    assert len(receiver.hits) == 3
    assert receiver.hits[1].at - receiver.hits[0].at >= 0.5


# --- outcomes by status ----------------------------------------------------------------------------


def test_410_gone_disables_the_target(serve: Callable[[Respond], Receiver], tmp_path: Path) -> None:
    receiver = serve(lambda hit, n: (410, {}, b"channel_is_archived"))
    with pytest.raises(TargetGone, match="disabled until its configuration changes"):
        sender(tmp_path, url=receiver.url("/services/T1/B1/SECRET"), format="slack").post(article())
    assert len(receiver.hits) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_failures_and_not_followed(
    serve: Callable[[Respond], Receiver], tmp_path: Path, status: int
) -> None:
    receiver = serve(lambda hit, n: (status, {"Location": "/moved"}, b""))
    with pytest.raises(PermanentFailure) as err:
        sender(tmp_path, url=receiver.url("/hook"), format="discord").post(article())
    assert not isinstance(err.value, TargetGone)
    assert f"{status} redirect to /moved" in str(err.value)
    assert [h.path for h in receiver.hits] == ["/hook?wait=true"]  # nothing went to /moved


def test_400_is_a_permanent_failure_with_the_reply(
    serve: Callable[[Respond], Receiver], tmp_path: Path
) -> None:
    receiver = serve(lambda hit, n: ok({"message": "Cannot send an empty message", "code": 50006}, 400))
    with pytest.raises(PermanentFailure) as err:
        sender(tmp_path, url=receiver.url("/api/webhooks/1/SECRETTOKEN"), format="discord").post(article())
    assert "400" in str(err.value) and "Cannot send an empty message" in str(err.value)
    assert "SECRETTOKEN" not in str(err.value)  # the webhook URL is a secret
    assert len(receiver.hits) == 1


def test_500_stays_pending_without_retrying_now(serve: Callable[[Respond], Receiver], tmp_path: Path) -> None:
    receiver = serve(lambda hit, n: (500, {}, b"oops"))
    with pytest.raises(TemporaryFailure, match="500 oops"):
        sender(tmp_path, url=receiver.url(), format="slack").post(article())
    assert len(receiver.hits) == 1


def test_always_503_ends_in_temporary_failure_after_the_retries(
    serve: Callable[[Respond], Receiver], tmp_path: Path
) -> None:
    receiver = serve(lambda hit, n: (503, {}, b"down for maintenance"))
    s = sender(tmp_path, url=receiver.url(), format="slack", retries=3, max_wait=0.05)
    waits = watch_waits(s)
    with pytest.raises(TemporaryFailure, match="after 3 attempts") as err:
        s.post(article())
    assert "503 down for maintenance" in str(err.value)
    assert len(receiver.hits) == 3
    assert waits == [0.05, 0.05]  # backoff 1 s, 2 s, each capped by max_wait


def test_a_receiver_that_never_answers_ends_in_temporary_failure(
    serve: Callable[[Respond], Receiver], tmp_path: Path
) -> None:
    def hang(hit: Hit, n: int) -> Reply:
        receiver.release.wait(30)
        return ok()

    receiver = serve(hang)
    s = sender(tmp_path, url=receiver.url(), format="slack", timeout=0.5, retries=2, max_wait=0.1)
    waits = watch_waits(s)
    with pytest.raises(TemporaryFailure, match=r"no full answer within 0\.5 s"):
        s.post(article())
    # The sender gave up while the receiver was still holding both requests.
    assert receiver.answered == 0
    receiver.wait_for_hits(2)
    assert len(receiver.hits) == 2
    assert waits == [0.1]


def test_connection_refused_ends_in_temporary_failure(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/services/T1/B1/SECRET"
    s = sender(tmp_path, url=url, format="slack", retries=2, max_wait=0)
    with pytest.raises(TemporaryFailure, match="cannot connect") as err:
        s.post(article())
    assert "SECRET" not in str(err.value)


def test_429_then_success(serve: Callable[[Respond], Receiver], tmp_path: Path) -> None:
    receiver = serve(lambda hit, n: (429, {"Retry-After": "0"}, b"") if n == 0 else (200, {}, b"ok"))
    s = sender(tmp_path, url=receiver.url(), format="slack")
    waits = watch_waits(s)
    assert s.post(article()) == ""
    assert len(receiver.hits) == 2 and waits == [0.0]


# --- mastodon --------------------------------------------------------------------------------------


def test_mastodon_status_with_bearer_token_and_idempotency_key_header(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        assert hit.path == "/api/v1/statuses"
        assert hit.headers["authorization"] == "Bearer tok-123"
        key = hit.headers.get("idempotency-key", "")
        assert key and len(key) <= 64
        body = hit.json()
        assert body["status"] in (article(1).text, article(2).text)
        assert body["visibility"] == "unlisted"
        assert "idempotency_key" not in body and "Idempotency-Key" not in body
        if n == 0:
            return 503, {"Retry-After": "0"}, b"busy"
        return ok({"id": f"10{n}", "url": f"https://mastodon.test/@news/10{n}"})

    receiver = serve(respond)
    monkeypatch.setenv("MASTODON_TOKEN", "tok-123")
    options = {"url": receiver.url("/"), "format": "mastodon", "token_env": "MASTODON_TOKEN"}
    with sender(tmp_path, **options, visibility="unlisted") as s:
        assert s.network == "mastodon"
        assert s.post(article(1)) == "https://mastodon.test/@news/101"
        assert s.post(article(2)) == "https://mastodon.test/@news/102"

    assert receiver.errors == []
    keys = [h.headers["idempotency-key"] for h in receiver.hits]
    assert keys[0] == keys[1] != keys[2]  # stable across the retry, new for a new item


def test_mastodon_bad_token_stops_the_target(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = serve(lambda hit, n: ok({"error": "The access token is invalid"}, 401))
    monkeypatch.setenv("MASTODON_TOKEN", "expired")
    s = sender(tmp_path, url=receiver.url(""), format="mastodon", token_env="MASTODON_TOKEN")
    with pytest.raises(DeliveryError, match="401") as err:
        s.post(article())
    assert "write:statuses" in err.value.hint


# --- bluesky ---------------------------------------------------------------------------------------

DID = "did:plc:testaccount123"
CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class FakePds:
    """createSession and createRecord as the atproto lexicons define them."""

    def __init__(self) -> None:
        self.sessions = 0
        self.expired: set[str] = set()
        self.records: list[dict[str, Any]] = []

    def __call__(self, hit: Hit, n: int) -> Reply:
        if hit.path == "/xrpc/com.atproto.server.createSession":
            body = hit.json()
            if (body.get("identifier"), body.get("password")) != ("news.example.net", "app-pass-1234"):
                return ok(
                    {"error": "AuthenticationRequired", "message": "Invalid identifier or password"}, 401
                )
            self.sessions += 1
            return ok(
                {
                    "did": DID,
                    "handle": "news.example.net",
                    "accessJwt": f"access-{self.sessions}",
                    "refreshJwt": f"refresh-{self.sessions}",
                }
            )
        assert hit.path == "/xrpc/com.atproto.repo.createRecord", hit.path
        token = hit.headers.get("authorization", "").removeprefix("Bearer ")
        assert token.startswith("access-"), hit.headers.get("authorization")
        if token in self.expired:
            return ok({"error": "ExpiredToken", "message": "Token has expired"}, 400)
        body = hit.json()
        assert body["repo"] == DID
        assert body["collection"] == "app.bsky.feed.post"
        record = body["record"]
        assert record["$type"] == "app.bsky.feed.post"
        assert CREATED_AT.fullmatch(record["createdAt"]), record["createdAt"]
        self.records.append(record)
        rkey = f"3kpost{len(self.records)}"
        return ok({"uri": f"at://{DID}/app.bsky.feed.post/{rkey}", "cid": "bafyrei" + rkey})


def test_bluesky_post_with_a_link_facet_in_utf8_byte_offsets(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pds = FakePds()
    receiver = serve(pds)
    monkeypatch.setenv("BSKY_PASSWORD", "app-pass-1234")
    link = "https://blog.test/posts/1?utm_source=bluesky#日本"
    text = f"新しい記事 🎉👨‍👩‍👧 «Café» {link} #Python"
    options = {
        "url": receiver.url("/"),
        "format": "bluesky",
        "identifier": "news.example.net",
        "password_env": "BSKY_PASSWORD",
    }
    with sender(tmp_path, **options) as s:
        assert s.network == "bluesky"
        landed = s.post(article(1, link=link, text=text))
        assert landed == f"https://bsky.app/profile/{DID}/post/3kpost1"
        s.post(article(2))

    assert receiver.errors == []
    assert pds.sessions == 1  # one session for the whole batch
    record = pds.records[0]
    assert record["text"] == text
    raw = text.encode("utf-8")
    links = [f for f in record["facets"] if f["features"][0]["$type"] == "app.bsky.richtext.facet#link"]
    assert len(links) == 1 and links[0]["features"][0]["uri"] == link
    index = links[0]["index"]
    assert raw[index["byteStart"] : index["byteEnd"]].decode() == link
    assert index["byteStart"] != text.index(link)  # byte offsets, not character offsets
    tags = [f for f in record["facets"] if f["features"][0]["$type"] == "app.bsky.richtext.facet#tag"]
    assert [t["features"][0]["tag"] for t in tags] == ["Python"]
    assert raw[tags[0]["index"]["byteStart"] : tags[0]["index"]["byteEnd"]] == b"#Python"
    assert record["embed"]["external"]["uri"] == link


def test_bluesky_logs_in_again_when_the_token_expires(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pds = FakePds()
    receiver = serve(pds)
    monkeypatch.setenv("BSKY_PASSWORD", "app-pass-1234")
    s = sender(
        tmp_path,
        url=receiver.url(""),
        format="bluesky",
        identifier="news.example.net",
        password_env="BSKY_PASSWORD",
    )
    with s:
        s.post(article(1))
        pds.expired.add("access-1")
        s.post(article(2))
    assert receiver.errors == []
    assert pds.sessions == 2 and len(pds.records) == 2


def test_bluesky_wrong_password_stops_the_target(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = serve(FakePds())
    monkeypatch.setenv("BSKY_PASSWORD", "wrong")
    s = sender(
        tmp_path,
        url=receiver.url(""),
        format="bluesky",
        identifier="news.example.net",
        password_env="BSKY_PASSWORD",
    )
    with pytest.raises(DeliveryError, match="refused the login") as err:
        s.post(article())
    assert "app password" in err.value.hint
    assert [h.path for h in receiver.hits] == ["/xrpc/com.atproto.server.createSession"]


def test_bluesky_facets_do_not_overlap() -> None:
    text = "Read https://blog.test/#Python now #Python"
    facets = bluesky_facets(text, "https://blog.test/#Python", ("#Python",))
    spans = [(f["index"]["byteStart"], f["index"]["byteEnd"]) for f in facets]
    assert spans == [(5, 30), (35, 42)]


# --- discord ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "seen"),
    [
        ("/api/webhooks/1/tok", "/api/webhooks/1/tok?wait=true"),
        ("/api/webhooks/1/tok?thread_id=99", "/api/webhooks/1/tok?thread_id=99&wait=true"),
        ("/api/webhooks/1/tok?wait=false&thread_id=99", "/api/webhooks/1/tok?thread_id=99&wait=true"),
    ],
)
def test_discord_waits_for_the_saved_message_and_pings_nobody(
    serve: Callable[[Respond], Receiver], tmp_path: Path, path: str, seen: str
) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        assert hit.path == seen
        body = hit.json()
        assert body["allowed_mentions"] == {"parse": []}
        assert "@everyone" not in body["content"] and "@here" not in body["content"]
        return ok({"id": "555", "channel_id": "444", "guild_id": "333", "content": body["content"]})

    receiver = serve(respond)
    item = article(text="@everyone new post, @here too: https://blog.test/posts/1")
    with sender(tmp_path, url=receiver.url(path), format="discord") as s:
        assert s.post(item) == "https://discord.com/channels/333/444/555"
    assert receiver.errors == []
    assert receiver.hits[0].json()["content"].replace("\u200b", "") == item.text  # looks the same


def test_with_query_keeps_the_rest_of_the_url() -> None:
    assert (
        with_query("https://d.test/w/1/t?a=b+c&flag", "wait", "true")
        == "https://d.test/w/1/t?a=b+c&flag&wait=true"
    )
    assert defuse_mentions("mail me@here.example or @hereafter") == "mail me@here.example or @hereafter"


# --- slack -----------------------------------------------------------------------------------------


def test_slack_payload_shape_and_escaping(serve: Callable[[Respond], Receiver], tmp_path: Path) -> None:
    def respond(hit: Hit, n: int) -> Reply:
        body = hit.json()
        assert set(body) == {"text", "blocks"}
        assert isinstance(body["text"], str) and body["text"]
        for block in body["blocks"]:
            assert block["type"] in ("section", "context")
            if block["type"] == "section":
                assert block["text"]["type"] == "mrkdwn" and len(block["text"]["text"]) <= 3000
        return 200, {"Content-Type": "text/plain"}, b"ok"

    receiver = serve(respond)
    item = article(
        title="Fish & <Chips>",
        link="https://blog.test/p?a=1&b=2",
        summary="1 < 2 & 3 > 2",
        text="Fish & <Chips> https://blog.test/p?a=1&b=2",
    )
    s = sender(tmp_path, url=receiver.url("/services/T1/B1/x"), format="slack")
    waits = watch_waits(s, real=False)
    with s:
        assert s.post(item) == ""
        s.post(article(2))
    assert receiver.errors == []
    body = receiver.hits[0].json()
    assert body["text"] == "Fish &amp; &lt;Chips&gt; https://blog.test/p?a=1&amp;b=2"
    section = body["blocks"][0]["text"]["text"]
    assert section == "*<https://blog.test/p?a=1&amp;b=2|Fish &amp; &lt;Chips&gt;>*\n1 &lt; 2 &amp; 3 &gt; 2"
    assert body["blocks"][-1] == {"type": "context", "elements": [{"type": "plain_text", "text": "#Python"}]}
    # About one message a second: the second post waited for its turn.
    assert len(waits) == 1 and 0 < waits[0] <= 1.0


# --- options and registration ----------------------------------------------------------------------


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        WebhookOptions.model_validate({"url": "https://h.test/", "secret_env": "S", "secret": "whsec_x"})
    with pytest.raises(ValidationError, match="needs secret_env"):
        WebhookOptions.model_validate({"url": "https://h.test/"})
    with pytest.raises(ValidationError, match="needs token_env"):
        WebhookOptions.model_validate({"url": "https://m.test", "format": "mastodon"})
    with pytest.raises(ValidationError, match="only used with format json"):
        WebhookOptions.model_validate({"url": "https://h.test/", "format": "slack", "secret_env": "S"})
    with pytest.raises(ValidationError, match="http"):
        WebhookOptions.model_validate({"url": "ftp://h.test/", "format": "slack"})
    with pytest.raises(ValidationError):
        WebhookOptions.model_validate({"url": "https://h.test/", "format": "teams"})
    bsky = WebhookOptions.model_validate({"format": "bluesky", "identifier": "a.test", "password_env": "P"})
    assert bsky.url == "https://bsky.social"


def test_a_missing_secret_variable_is_a_delivery_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[[Respond], Receiver]
) -> None:
    receiver = serve(lambda hit, n: ok())
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    with pytest.raises(DeliveryError, match="HOOK_SECRET is not set") as err:
        sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET").post(article())
    assert "export HOOK_SECRET=" in err.value.hint
    monkeypatch.setenv("HOOK_SECRET", "whsec_not base64!")
    with pytest.raises(DeliveryError, match="not a whsec_"):
        sender(tmp_path, url=receiver.url(), secret_env="HOOK_SECRET").post(article())
    assert receiver.hits == []  # nothing unsigned went out


def test_registered_as_a_posting_sender() -> None:
    forget_plugins()
    assert sender_types()["webhook"] is WebhookSender
    assert WebhookSender.mails is False and WebhookSender.posts is True


# --- what is posted: links filtered like the email's, no control characters ---------------------

BAD_LINKS = {
    "link": "javascript:alert(document.cookie)",
    "image_url": "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
    "crlf": "https://blog.test/posts/2\r\nX-Injected: yes",
}


def posted_strings(value: Any) -> list[str]:
    """Every string in a decoded JSON body, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *posted_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in posted_strings(v)]
    return []


def assert_clean(body: bytes) -> list[str]:
    strings = posted_strings(json.loads(body))
    for s in strings:
        assert "javascript:" not in s and "data:" not in s, s
        assert "X-Injected" not in s and "\r" not in s, s
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", s), repr(s)
    return strings


@pytest.mark.parametrize("fmt", ["json", "slack", "discord", "mastodon", "bluesky"])
def test_no_unsafe_url_is_posted_in_any_format(
    serve: Callable[[Respond], Receiver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    pds = FakePds()

    def respond(hit: Hit, n: int) -> Reply:
        if fmt == "json":
            verify_standard_webhook(hit)
        if fmt == "bluesky":
            return pds(hit, n)
        if fmt == "discord":
            return ok({"id": "1", "channel_id": "2", "guild_id": "3"})
        return ok({"id": "1", "url": "https://mastodon.test/@news/1"}) if fmt == "mastodon" else ok()

    receiver = serve(respond)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.setenv("MASTODON_TOKEN", "tok-123")
    monkeypatch.setenv("BSKY_PASSWORD", "app-pass-1234")
    options: dict[str, Any] = {
        "json": {"url": receiver.url(), "secret_env": "HOOK_SECRET"},
        "slack": {"url": receiver.url("/services/T1/B1/x")},
        "discord": {"url": receiver.url("/api/webhooks/1/tok")},
        "mastodon": {"url": receiver.url(""), "token_env": "MASTODON_TOKEN"},
        "bluesky": {
            "url": receiver.url(""),
            "identifier": "news.example.net",
            "password_env": "BSKY_PASSWORD",
        },
    }[fmt]
    bad = BAD_LINKS["link"]
    # As a plugin or an older caller might build it: the bad link in the text too.
    unsafe = article(
        1,
        link=bad,
        text=f"Post 1\n\nBody of post 1.\n\n{bad} #Python",
        image_url=BAD_LINKS["image_url"],
        articles=(("Post 1", bad), ("Post 2", BAD_LINKS["crlf"]), ("Post 3", "https://blog.test/posts/3")),
    )
    with sender(tmp_path, format=fmt, **options) as s:
        s.post(unsafe)
        s.post(article(4, link=BAD_LINKS["crlf"], text=f"Post 4 {BAD_LINKS['crlf']}"))

    assert receiver.errors == []
    posts = [h for h in receiver.hits if not h.path.endswith("createSession")]
    assert len(posts) == 2  # posted, without the link, rather than dropped
    first = assert_clean(posts[0].body)
    assert_clean(posts[1].body)
    assert any("Post 1" in s for s in first)
    if fmt in ("json", "slack"):  # the formats that list an issue's articles keep the good link
        assert any("https://blog.test/posts/3" in s for s in first)
    if fmt == "json":
        data = posts[0].json()["data"]
        assert data["link"] == "" and data["image_url"] == ""
        assert data["articles"][2] == {"title": "Post 3", "link": "https://blog.test/posts/3"}
    if fmt == "bluesky":
        assert "embed" not in pds.records[0] and "facets" in pds.records[0]  # the #Python tag only
        assert all(f["features"][0]["$type"].endswith("#tag") for f in pds.records[0]["facets"])


def json_feed(items: list[dict[str, Any]]) -> Route:
    doc = {"version": "https://jsonfeed.org/version/1.1", "title": "J", "items": items}
    return Route(json.dumps(doc).encode(), content_type="application/feed+json")


def hook_project(project: Project, feed: str, sender_yaml: str, each: str = "article") -> None:
    """A schedule of one feed that posts to one webhook target, ``hook``."""
    project.setup([feed])
    text = project.config.read_text().replace(
        "schedules:\n", "  hook:\n    type: webhook\n" + sender_yaml + "schedules:\n"
    )
    project.config.write_text(text + f"    post:\n      - to: hook\n        each: {each}\n")


def test_posts_from_a_feed_carry_only_safe_links_and_no_control_characters(
    serve: Callable[[Respond], Receiver],
    project: Project,
    feed_server: FeedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = serve(lambda hit, n: (verify_standard_webhook(hit), ok())[1])
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    feed_server.routes["/feed.json"] = json_feed(
        [
            {
                "id": "1",
                "url": BAD_LINKS["link"],
                "title": "Evil\x1b[31m title\x07\r\nInjected: yes",
                "content_text": "Sum\x1b[2Jmary with \x9b1m and \x00 in it",
                "image": BAD_LINKS["image_url"],
                "date_published": "2026-01-01T01:00:00Z",
            },
            {"id": "2", "url": BAD_LINKS["crlf"], "title": "Two", "date_published": "2026-01-01T02:00:00Z"},
            {
                "id": "3",
                "url": "https://blog.test/posts/3",
                "title": "Three",
                "date_published": "2026-01-01T03:00:00Z",
            },
        ]
    )
    hook_project(
        project,
        feed_server.url("/feed.json"),
        f"    format: json\n    url: {receiver.url()}\n    secret_env: HOOK_SECRET\n    retries: 1\n",
    )
    text = project.config.read_text()
    project.config.write_text(text + "      - to: hook\n        each: issue\n")
    posted = project.run("post", "weekly")
    assert posted.exit_code == 0, posted.output
    assert project.run("send-digest", "weekly").exit_code == 0

    assert receiver.errors == []
    payloads = [h.json() for h in receiver.hits]
    for h in receiver.hits:
        assert_clean(h.body)
    articles = {p["data"]["title"]: p["data"] for p in payloads if p["type"] == "article.published"}
    assert set(articles) == {"Evil [31m title Injected: yes", "Two", "Three"}
    evil = articles["Evil [31m title Injected: yes"]
    assert evil["link"] == "" and evil["image_url"] == ""
    assert evil["text"].startswith("Evil [31m title Injected: yes") and "\nInjected" not in evil["text"]
    assert articles["Two"]["link"] == "" and articles["Three"]["link"].startswith("https://blog.test/posts/3")
    [issue] = [p["data"] for p in payloads if p["type"] == "issue.published"]
    assert [a["link"][:25] for a in issue["articles"]] == ["https://blog.test/posts/3", "", ""]
    assert issue["link"].startswith("https://blog.test/posts/3")


# --- through `newsletter post`: an item that cannot be posted, errors that hold secrets ----------

LONG_LINK = "https://blog.example.org/posts/" + "a-very-long-slug-" * 23 + "end"  # over 300 graphemes


def test_a_link_too_long_for_bluesky_fails_that_post_once_and_the_others_go_out(
    serve: Callable[[Respond], Receiver],
    project: Project,
    feed_server: FeedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    from conftest import item, rss

    pds = FakePds()
    receiver = serve(pds)
    monkeypatch.setenv("BSKY_PASSWORD", "app-pass-1234")
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2, link=LONG_LINK), item(3)]))
    hook_project(
        project,
        feed_server.url("/feed.xml"),
        f"    format: bluesky\n    url: {receiver.url('')}\n    identifier: news.example.net\n"
        "    password_env: BSKY_PASSWORD\n    retries: 1\n",
    )
    first = project.run("post", "weekly")
    assert first.exit_code == 1, first.output  # one item failed, and says why
    assert "posted 2 now; in all sent 2, pending 0, failed 1" in first.output
    assert "Post 2: not posted: the link is too long for bluesky" in first.output
    assert receiver.errors == []
    assert [r["text"].split("\n")[0] for r in pds.records] == ["Post 1", "Post 3"]
    with sqlite3.connect(project.root / "state.db") as db:
        [(status, error)] = db.execute(
            "SELECT status, last_error FROM posts WHERE status != 'sent'"
        ).fetchall()
    assert status == "failed" and "too long for bluesky" in error

    # Given up for good: the next run neither retries it nor reports it again.
    again = project.run("post", "weekly")
    assert again.exit_code == 0, again.output
    assert "posted 0 now; in all sent 2, pending 0, failed 1" in again.output
    assert len(pds.records) == 2


@pytest.mark.parametrize("fmt", ["json", "mastodon"])
def test_a_failing_target_never_shows_or_stores_its_secrets(
    serve: Callable[[Respond], Receiver],
    project: Project,
    feed_server: FeedServer,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    import sqlite3

    from conftest import item, rss

    def respond(hit: Hit, n: int) -> Reply:
        # A careless receiver that quotes the request back, credentials and all.
        echo = f"rejected POST {hit.path} auth={hit.headers.get('authorization', '')}"
        if fmt == "json":
            auth = base64.b64decode(hit.headers["authorization"].removeprefix("Basic ")).decode()
            return 400, {"Content-Type": "text/plain"}, f"{echo} user={auth}".encode()
        return 500, {"Content-Type": "text/plain"}, echo.encode()

    receiver = serve(respond)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    monkeypatch.setenv("MASTODON_TOKEN", "mastodon-token-789")
    port = receiver.httpd.server_address[1]
    if fmt == "json":
        url = f"http://hookuser:userinfo-pass-123@127.0.0.1:{port}/hook/path-token-456?token=query-token-789"
        options = f"    format: json\n    url: {url}\n    secret_env: HOOK_SECRET\n"
        secrets = ["userinfo-pass-123", "path-token-456", "query-token-789"]
    else:
        options = f"    format: mastodon\n    url: http://127.0.0.1:{port}\n    token_env: MASTODON_TOKEN\n"
        secrets = ["mastodon-token-789"]
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    hook_project(project, feed_server.url("/feed.xml"), options + "    retries: 1\n")
    result = project.run("post", "weekly")
    assert result.exit_code == 1
    assert len(receiver.hits) == 1 and ("400" if fmt == "json" else "500") in result.output
    assert "rejected POST" in result.output  # the reply is still quoted, minus the secrets
    with sqlite3.connect(project.root / "state.db") as db:
        [(error,)] = db.execute("SELECT last_error FROM posts").fetchall()
    assert "rejected POST" in error
    for secret in secrets:
        assert secret not in result.output, secret
        assert secret not in error, secret


def test_a_target_that_does_not_answer_holds_one_item_not_the_whole_run(
    serve: Callable[[Respond], Receiver], project: Project, feed_server: FeedServer
) -> None:
    import sqlite3

    from conftest import item, rss

    def hang(hit: Hit, n: int) -> Reply:
        receiver.release.wait(30)
        return ok()

    receiver = serve(hang)
    feed_server.routes["/feed.xml"] = Route(rss([item(n) for n in range(1, 6)]))
    hook_project(
        project,
        feed_server.url("/feed.xml"),
        f"    format: slack\n    url: {receiver.url('/services/T/B/X')}\n"
        "    timeout: 0.5\n    retries: 2\n    max_wait: 0.1\n",
    )
    result = project.run("post", "weekly")
    assert result.exit_code == 1, result.output
    # One item waited out its two attempts; the four behind it were not each waited out too.
    assert len(receiver.hits) == 2
    assert "no full answer within 0.5 s" in result.output
    with sqlite3.connect(project.root / "state.db") as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM posts")]
    assert statuses == ["pending"] * 5  # nothing failed, nothing lost: the next run goes on
