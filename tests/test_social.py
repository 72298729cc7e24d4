"""Share links in the digest, `newsletter share`, and posting each article once to a webhook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import Daemon, FeedServer, Project, Route, item, rss, sent_messages
from newsletter import share

SECRET = "whsec_" + base64.b64encode(b"a very secret key for tests").decode()
SHARE = """\
    share:
      networks: [x, mastodon, bluesky, linkedin, reddit, email]
      mastodon_instance: mastodon.example.org
    utm:
      source: weekly-mail
"""


class Receiver:
    """A webhook receiver that checks Standard Webhooks signatures, as a careful one does."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                wid, ts = self.headers["webhook-id"], self.headers["webhook-timestamp"]
                key = base64.b64decode(SECRET.removeprefix("whsec_"))
                expected = base64.b64encode(
                    hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
                )
                signatures = [s.partition(",")[2] for s in self.headers["webhook-signature"].split()]
                valid = expected.decode() in signatures
                if receiver.delay:
                    time.sleep(receiver.delay)
                receiver.seen.append({"id": wid, "valid": valid, "payload": json.loads(body)})
                self.send_response(receiver.status if valid else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def titles(self) -> list[str]:
        return [s["payload"]["data"]["title"] for s in self.seen]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    r = Receiver()
    yield r
    r.httpd.shutdown()
    r.httpd.server_close()


def with_hook(project: Project, receiver: Receiver, each: str = "article") -> None:
    text = project.config.read_text()
    text = text.replace(
        "schedules:\n",
        f"  hook:\n    type: webhook\n    format: json\n    url: {receiver.url}\n"
        "    secret_env: HOOK_SECRET\n    timeout: 5\n    retries: 2\n    max_wait: 1\nschedules:\n",
    )
    project.config.write_text(text + f"    post:\n      - to: hook\n        each: {each}\n")


def test_share_links_are_in_both_parts_and_open_the_right_compose_page(
    project: Project, feed_server: FeedServer
) -> None:
    title = "Café 日本 & friends: a long-ish title"
    feed_server.routes["/feed.xml"] = Route(
        rss([item(1, title=title, link="https://blog.example.org/p?id=7&amp;ref=feed#top")])
    )
    project.setup([feed_server.url("/feed.xml")], extra_schedule=SHARE)
    assert project.run("send-digest", "weekly").exit_code == 0
    msg = sent_messages(project.root / "outbox")["ann@example.com"]
    html = msg.get_body(("html",)).get_content()
    text = msg.get_body(("plain",)).get_content()
    assert "Share:" in html

    # The email's own link keeps its query and fragment and gains the UTM tags.
    assert (
        "https://blog.example.org/p?id=7&amp;ref=feed&amp;utm_source=weekly-mail&amp;utm_medium=email" in html
    )
    lines = dict(line.split(": ", 1) for line in text.splitlines() if line.startswith("Share on "))
    assert set(lines) == {
        f"Share on {n}" for n in ("X", "Mastodon", "Bluesky", "LinkedIn", "Reddit", "Email")
    }
    for label, url in lines.items():
        assert url.strip() in html.replace("&amp;", "&"), label

    def tagged(network: str) -> str:
        return f"https://blog.example.org/p?id=7&ref=feed&utm_source={network}&utm_medium=social&utm_campaign=weekly#top"

    x = urlsplit(lines["Share on X"].strip())
    assert (x.netloc, x.path) == ("twitter.com", "/intent/tweet")
    assert parse_qs(x.query)["text"] == [f"{title} {tagged('x')}"]
    assert share.count("x", parse_qs(x.query)["text"][0]) <= 280
    masto = urlsplit(lines["Share on Mastodon"].strip())
    assert (masto.netloc, masto.path) == ("mastodon.example.org", "/share")
    assert parse_qs(masto.query)["text"] == [f"{title} {tagged('mastodon')}"]
    bsky = urlsplit(lines["Share on Bluesky"].strip())
    assert bsky.netloc == "bsky.app" and parse_qs(bsky.query)["text"] == [f"{title} {tagged('bluesky')}"]
    linkedin = urlsplit(lines["Share on LinkedIn"].strip())
    assert parse_qs(linkedin.query)["url"] == [tagged("linkedin")]
    reddit = parse_qs(urlsplit(lines["Share on Reddit"].strip()).query)
    assert reddit["url"] == [tagged("reddit")] and reddit["title"] == [title]
    mail = parse_qs(urlsplit(lines["Share on Email"].strip()).query)
    assert mail["subject"] == [title] and tagged("email") in mail["body"][0]


def test_share_command_prints_snippets_within_each_limit(project: Project, feed_server: FeedServer) -> None:
    long_title = "A very long title about counting characters " * 4
    summary = "<p>" + "Emoji 👩‍👩‍👧 and 漢字 everywhere, " * 60 + "</p>"
    feed_server.routes["/feed.xml"] = Route(
        rss([item(1, title=long_title, description=summary)]).replace(
            b"</item>", b"<category>Build systems</category></item>"
        )
    )
    project.setup([feed_server.url("/feed.xml")], extra_schedule=SHARE)
    assert project.run("fetch").exit_code == 0
    result = project.run("share", "weekly", "--json")
    assert result.exit_code == 0, result.output
    [doc] = json.loads(result.output)
    assert doc["link"] == "https://blog.test/posts/1"
    for network, s in doc["snippets"].items():
        assert s["count"] == share.count(network, s["text"]) <= s["limit"], network
        if network not in ("reddit", "telegram"):
            assert "https://blog.test/posts/1?utm_source=" + network in s["text"], network
    assert "#BuildSystems" in doc["snippets"]["mastodon"]["text"]
    assert doc["snippets"]["x"]["text"].count("…") >= 1
    assert set(doc["share_links"]) == {"X", "Mastodon", "Bluesky", "LinkedIn", "Reddit", "Email"}
    plain = project.run("share", "weekly")
    assert "[x " in plain.output and "/280]" in plain.output


def test_each_article_is_posted_once_across_runs(
    project: Project, feed_server: FeedServer, receiver: Receiver
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup([feed_server.url("/feed.xml")])
    with_hook(project, receiver)
    first = project.run("post", "weekly")
    assert first.exit_code == 0, first.output
    assert sorted(receiver.titles()) == ["Post 1", "Post 2"]
    assert all(s["valid"] for s in receiver.seen)
    assert receiver.seen[0]["payload"]["type"] == "article.published"

    again = project.run("post", "weekly")
    assert again.exit_code == 0 and "posted 0 now" in again.output
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2), item(3)]))
    third = project.run("post", "weekly")
    assert "posted 1 now; in all sent 3" in third.output
    assert sorted(receiver.titles()) == ["Post 1", "Post 2", "Post 3"]


def test_a_failed_post_stays_pending_and_keeps_its_webhook_id(
    project: Project, feed_server: FeedServer, receiver: Receiver
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")])
    with_hook(project, receiver)
    receiver.status = 503
    failed = project.run("post", "weekly")
    assert failed.exit_code == 1 and "pending 1" in failed.output
    receiver.status = 200
    assert project.run("post", "weekly").exit_code == 0
    ids = {s["id"] for s in receiver.seen}
    assert len(ids) == 1 and len(receiver.seen) == 3  # two tries in the first run, one in the second
    assert "posted 0 now; in all sent 1" in project.run("post", "weekly").output


def test_410_disables_the_target_until_its_configuration_changes(
    project: Project, feed_server: FeedServer, receiver: Receiver
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup([feed_server.url("/feed.xml")])
    with_hook(project, receiver)
    receiver.status = 410
    gone = project.run("post", "weekly")
    assert gone.exit_code == 1 and "disabled" in gone.output
    assert len(receiver.seen) == 1  # the second article was not even tried
    again = project.run("post", "weekly")
    assert again.exit_code == 1 and "disabled" in again.output and len(receiver.seen) == 1
    receiver.status = 200
    project.config.write_text(project.config.read_text().replace("timeout: 5", "timeout: 6"))
    back = project.run("post", "weekly")
    assert back.exit_code == 0, back.output
    assert sorted(receiver.titles()) == ["Post 1", "Post 1", "Post 2"]


def test_kill_mid_run_then_rerun_posts_every_article_once(
    project: Project, feed_server: FeedServer, receiver: Receiver
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(n) for n in range(1, 31)]))
    project.setup([feed_server.url("/feed.xml")])
    with_hook(project, receiver)
    receiver.delay = 0.05
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "--config", str(project.config), "post", "weekly"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    deadline = time.monotonic() + 60
    while len(receiver.seen) < 10:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(receiver.seen) < 30
    receiver.delay = 0
    rerun = project.run_process("post", "weekly", "--no-fetch")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    titles = receiver.titles()
    assert set(titles) == {f"Post {n}" for n in range(1, 31)}
    assert len(titles) - 30 <= 1
    # A repeat carries the same webhook-id, so the receiver can tell it is one.
    assert len({s["id"] for s in receiver.seen}) == 30


def test_an_issue_target_gets_each_issue_once(
    project: Project, feed_server: FeedServer, receiver: Receiver
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    project.setup([feed_server.url("/feed.xml")])
    with_hook(project, receiver, each="issue")
    assert project.run("send-digest", "weekly").exit_code == 0
    assert project.run("send-digest", "weekly").exit_code == 0
    [seen] = receiver.seen
    assert seen["payload"]["type"] == "issue.published"
    data = seen["payload"]["data"]
    assert data["issue_number"] == 1 and [a["title"] for a in data["articles"]] == ["Post 2", "Post 1"]


def test_the_daemon_posts_new_articles_on_its_own(
    project: Project, feed_server: FeedServer, receiver: Receiver, daemons: list[Daemon]
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")], fetch_extra="  interval: 1s\n")
    with_hook(project, receiver)
    project.config.write_text(project.config.read_text() + "    post_every: 1s\n")
    daemon = Daemon(project)
    daemons.append(daemon)
    daemon.wait_for(lambda: receiver.titles() == ["Post 1"], why="the first post")
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    daemon.wait_for(lambda: len(receiver.seen) == 2, why="the post of the new article")
    assert daemon.terminate() == 0
    assert receiver.titles() == ["Post 1", "Post 2"]
    assert "event=post schedule=weekly" in daemon.log


# --- a link too long for one network, untitled entries --------------------------------------------

# 416 characters; with its UTM tags more than Bluesky's 300 graphemes, while X and Mastodon count
# any link as 23 and LinkedIn, Reddit and mail take it as it is.
LONG_LINK = "https://blog.example.org/posts/" + "a-very-long-slug-" * 23 + "end"


def test_a_link_too_long_for_bluesky_costs_that_article_its_bluesky_link_only(
    project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2, link=LONG_LINK), item(3)]))
    project.setup([feed_server.url("/feed.xml")], extra_schedule=SHARE)
    assert project.run("fetch").exit_code == 0

    check = project.run("check")
    assert check.exit_code == 0, check.output
    assert "1 schedule(s) OK" in check.output

    sent = project.run("send-digest", "weekly")
    assert sent.exit_code == 0, sent.output
    html = sent_messages(project.root / "outbox")["ann@example.com"].get_body(("html",)).get_content()
    assert "Post 2" in html and LONG_LINK in html  # the article itself is in the digest, linked
    shares = [u.replace("&amp;", "&") for u in re.findall(r'href="([^"]+)"', html)]
    bluesky = [u for u in shares if u.startswith("https://bsky.app/intent/compose")]
    x = [u for u in shares if u.startswith("https://twitter.com/intent/tweet")]
    assert len(bluesky) == 2 and len(x) == 3  # every article but the long one keeps Bluesky
    assert not any("a-very-long-slug" in parse_qs(urlsplit(u).query)["text"][0] for u in bluesky)
    assert any("a-very-long-slug" in parse_qs(urlsplit(u).query)["text"][0] for u in x)

    plain = project.run("share", "weekly")
    assert plain.exit_code == 0, plain.output
    assert "[bluesky] none: the link is too long for bluesky" in plain.output
    assert plain.output.count("[x ") == 3 and plain.output.count("[bluesky ") == 2
    doc = json.loads(project.run("share", "weekly", "--json").output)
    [long] = [d for d in doc if d["link"] == LONG_LINK]
    assert "bluesky" not in long["snippets"] and "too long" in long["unfit"]["bluesky"]
    assert LONG_LINK + "?utm_source=x" in long["snippets"]["x"]["text"]
    assert long["snippets"]["x"]["text"].startswith("Post 2") and "X" in long["share_links"]
    assert "Bluesky" not in long["share_links"]
    assert all("bluesky" in d["snippets"] for d in doc if d["link"] != LONG_LINK)


MICRO = "Shipped the new build cache today: cold builds are twice as fast, warm ones barely notice. " * 3


def test_an_untitled_micro_post_is_shared_by_its_text(project: Project, feed_server: FeedServer) -> None:
    micro = item(1, description=f"<p>{MICRO}</p>")
    del micro["title"]
    feed_server.routes["/feed.xml"] = Route(rss([micro]))
    project.setup([feed_server.url("/feed.xml")], extra_schedule=SHARE)
    assert project.run("send-digest", "weekly").exit_code == 0
    text = sent_messages(project.root / "outbox")["ann@example.com"].get_body(("plain",)).get_content()
    lines = {
        k: v.strip() for k, v in (ln.split(": ", 1) for ln in text.splitlines() if ln.startswith("Share on "))
    }
    reddit = parse_qs(urlsplit(lines["Share on Reddit"]).query)
    assert reddit["title"][0].startswith("Shipped the new build cache today")
    assert share.count("reddit", reddit["title"][0]) <= 300
    mail = parse_qs(urlsplit(lines["Share on Email"]).query)
    assert mail["subject"][0].startswith("Shipped the new build cache")
    tweet = parse_qs(urlsplit(lines["Share on X"]).query)["text"][0]
    assert tweet.startswith("Shipped the new build cache") and share.count("x", tweet) <= 280

    [doc] = json.loads(project.run("share", "weekly", "--json").output)
    for network, s in doc["snippets"].items():
        assert s["text"].startswith("Shipped the new build cache"), network
        assert s["count"] <= s["limit"], network
