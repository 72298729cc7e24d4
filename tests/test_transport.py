"""One deadline per request, and the redirect policy of feeds, against real servers on 127.0.0.1.

The trickling server below is a raw TCP server: http.server cannot send a status line or a
header a byte at a time. Timing asserts are bounds on a deadline (did it give up, roughly when
it should), not benchmarks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import FeedServer, Route, item, rss
from newsletter.config import FetchSettings
from newsletter.errors import TemporaryFailure
from newsletter.feeds import fetch_feed
from newsletter.model import FeedState
from newsletter.senders import Post
from newsletter.senders.webhook import WebhookOptions, WebhookSender

pytestmark = pytest.mark.timeout(20)

DEADLINE = 1.5
# How late after the deadline giving up may be: the watchdog fires at the deadline, and the
# read it interrupts returns at once.
SLACK = 1.0
TRICKLE = 0.3  # seconds between two bytes


# -- a server that trickles ----------------------------------------------------------------------

Script = Callable[[socket.socket, threading.Event], None]


class TrickleServer:
    """Reads one HTTP request (headers and a Content-Length body), then runs ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.closing = threading.Event()
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/feed"

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            # OSError: the client gave up, which is the point.
            with contextlib.suppress(OSError):
                self.script(conn, self.closing)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=5)
        self.sock.close()


def drip(conn: socket.socket, data: bytes, closing: threading.Event) -> None:
    for i in range(len(data)):
        if closing.is_set():
            return
        conn.sendall(data[i : i + 1])
        time.sleep(TRICKLE)


def headers_trickle(conn: socket.socket, closing: threading.Event) -> None:
    # 100 header bytes at 0.3 s each: 30 s before the headers are done.
    drip(conn, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n", closing)


def body_trickle(with_length: bool) -> Script:
    def script(conn: socket.socket, closing: threading.Event) -> None:
        doc = rss([item(1)])
        length = f"Content-Length: {len(doc)}\r\n" if with_length else "Connection: close\r\n"
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/rss+xml\r\n{length}\r\n".encode())
        drip(conn, doc, closing)

    return script


@pytest.fixture
def trickling() -> Iterator[Callable[[Script], TrickleServer]]:
    servers: list[TrickleServer] = []

    def start(script: Script) -> TrickleServer:
        servers.append(TrickleServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


SCRIPTS = [
    pytest.param(headers_trickle, id="headers"),
    pytest.param(body_trickle(with_length=True), id="body-with-content-length"),
    pytest.param(body_trickle(with_length=False), id="body-until-close"),
]


# -- the deadline -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_trickling_feed_gives_up_at_the_deadline(
    trickling: Callable[[Script], TrickleServer], script: Script
) -> None:
    server = trickling(script)
    started = time.monotonic()
    result = fetch_feed(FeedState(server.url), FetchSettings(timeout=DEADLINE))
    took = time.monotonic() - started
    assert result.status == "error"
    assert server.url in result.error
    assert f"no full answer within {DEADLINE:g} s" in result.error
    assert result.entries == []
    assert DEADLINE - 0.1 <= took < DEADLINE + SLACK, took


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_trickling_webhook_receiver_gives_up_at_the_deadline(
    trickling: Callable[[Script], TrickleServer],
    script: Script,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "whsec_" + "QUJDREVGR0hJSktMTU5PUA==")
    server = trickling(script)
    hook = WebhookSender(
        "hook",
        WebhookOptions.model_validate(
            {"url": server.url, "secret_env": "HOOK_SECRET", "timeout": DEADLINE, "retries": 1}
        ),
        tmp_path,
    )
    post = Post(
        id="a1", kind="article", schedule="weekly", title="T", link="https://x.test/1", summary="", text="T"
    )
    started = time.monotonic()
    with pytest.raises(TemporaryFailure) as failure:
        hook.post(post)
    took = time.monotonic() - started
    hook.close()
    assert f"no full answer within {DEADLINE:g} s" in str(failure.value)
    assert server.requests == 1
    assert took < DEADLINE + SLACK, took


def test_a_quick_answer_after_a_slow_one_is_read_in_full(feed_server: FeedServer) -> None:
    # The deadline is per request: a feed that answers in time is read whole, every time.
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]), delay=0.2)
    for _ in range(3):
        result = fetch_feed(FeedState(feed_server.url("/feed.xml")), FetchSettings(timeout=DEADLINE))
        assert result.status == "ok", result.error
        assert [e.title for e in result.entries] == ["Post 1", "Post 2"]


# -- redirects -------------------------------------------------------------------------------------------

REFUSED = [
    pytest.param("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local", id="metadata"),
    pytest.param("http://10.0.0.1/feed.xml", "10.0.0.1", "private", id="private-10"),
    pytest.param("http://192.168.1.1/feed.xml", "192.168.1.1", "private", id="private-192"),
    pytest.param("http://[fe80::1]/feed.xml", "fe80::1", "link-local", id="link-local-v6"),
    pytest.param("http://[fd00::1]/feed.xml", "fd00::1", "unique-local", id="unique-local"),
    pytest.param("http://[::ffff:10.0.0.1]/feed.xml", "10.0.0.1", "private", id="v4-mapped"),
    pytest.param("http://224.0.0.1/feed.xml", "224.0.0.1", "multicast", id="multicast"),
    # The same address spelt as an attacker would: decimal, hex, IPv4 inside IPv6 (NAT64).
    pytest.param("http://2852039166/latest/", "169.254.169.254", "link-local", id="decimal"),
    pytest.param("http://0xa9fea9fe/latest/", "169.254.169.254", "link-local", id="hex"),
    pytest.param("http://[::ffff:169.254.169.254]/x", "169.254.169.254", "link-local", id="v4-mapped-meta"),
    pytest.param("http://[64:ff9b::a9fe:a9fe]/x", "64:ff9b::a9fe:a9fe", "link-local", id="nat64"),
    # Connecting to 0.0.0.0 reaches this very machine on Linux.
    pytest.param("http://0.0.0.0:{port}/other.xml", "0.0.0.0", "unspecified", id="unspecified"),
]


@pytest.mark.parametrize(("location", "address", "kind"), REFUSED)
def test_a_loopback_feed_redirecting_to_another_address_class_is_refused(
    feed_server: FeedServer, location: str, address: str, kind: str
) -> None:
    port = feed_server.httpd.server_address[1]
    feed_server.routes["/feed.xml"] = Route(status=302, headers={"Location": location.format(port=port)})
    feed_server.routes["/other.xml"] = Route(rss([item(1)]))
    url = feed_server.url("/feed.xml")
    started = time.monotonic()
    result = fetch_feed(FeedState(url), FetchSettings(timeout=5))
    # Refused before any connection: no connect timeout to wait out, nothing fetched.
    assert time.monotonic() - started < 2
    assert result.status == "error"
    assert url in result.error
    assert "refused" in result.error
    assert address in result.error and kind in result.error
    assert feed_server.hits("/other.xml") == []


def test_a_loopback_feed_redirecting_to_loopback_is_followed(feed_server: FeedServer) -> None:
    port = feed_server.httpd.server_address[1]
    feed_server.routes["/feed.xml"] = Route(
        status=301, headers={"Location": f"http://localhost:{port}/moved.xml"}
    )
    feed_server.routes["/moved.xml"] = Route(rss([item(1)]))
    result = fetch_feed(FeedState(feed_server.url("/feed.xml")), FetchSettings(timeout=5))
    assert result.status == "ok", result.error
    assert [e.title for e in result.entries] == ["Post 1"]
    assert result.fetch_url == f"http://localhost:{port}/moved.xml"  # a 301 is still remembered


def test_five_redirects_are_followed_and_a_sixth_is_not(feed_server: FeedServer) -> None:
    for n in range(6):
        feed_server.routes[f"/hop/{n}"] = Route(status=302, headers={"Location": f"/hop/{n + 1}"})
    feed_server.routes["/hop/6"] = Route(rss([item(1)]))

    five = fetch_feed(FeedState(feed_server.url("/hop/1")), FetchSettings(timeout=5))
    assert five.status == "ok", five.error

    six = fetch_feed(FeedState(feed_server.url("/hop/0")), FetchSettings(timeout=5))
    assert six.status == "error"
    assert "more than 5 redirects" in six.error


def test_a_redirect_loop_stops_at_the_bound(feed_server: FeedServer) -> None:
    feed_server.routes["/a"] = Route(status=302, headers={"Location": "/b"})
    feed_server.routes["/b"] = Route(status=302, headers={"Location": "/a"})
    result = fetch_feed(FeedState(feed_server.url("/a")), FetchSettings(timeout=5))
    assert result.status == "error"
    assert feed_server.url("/a") in result.error
    assert "more than 5 redirects" in result.error
    assert len(feed_server.hits("/a")) + len(feed_server.hits("/b")) == 6


def test_a_redirect_to_another_scheme_is_refused(feed_server: FeedServer) -> None:
    feed_server.routes["/feed.xml"] = Route(status=302, headers={"Location": "file:///etc/passwd"})
    result = fetch_feed(FeedState(feed_server.url("/feed.xml")), FetchSettings(timeout=5))
    assert result.status == "error"
    assert "file:///etc/passwd" in result.error and "refused" in result.error


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("93.184.216.34", "public"),
        ("2606:4700::1111", "public"),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "unique-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT: not the Internet either
        # IPv4 inside IPv6 reaches the IPv4 host: 6to4 and NAT64 gateways.
        ("2002:a9fe:a9fe::1", "link-local"),
        ("2002:7f00:1::1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("64:ff9b::a00:1", "private"),
        ("64:ff9b::5db8:d822", "public"),
        ("64:ff9b:1::a9fe:a9fe", "reserved"),
    ],
)
def test_address_classes(address: str, kind: str) -> None:
    from newsletter.transport import address_class

    assert address_class(address) == kind
