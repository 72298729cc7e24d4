"""HTTP with one deadline for the whole exchange, and a redirect policy for fetching feeds.

requests' ``timeout`` bounds each socket operation, not the request: a server that sends one
byte every second holds a "5 s" request for as long as it likes (psf/requests#3099 declined a
total timeout; no maintained library adds one). Here every request gets a watchdog that shuts
its sockets down when the deadline passes, so DNS, connect, TLS, headers and body together
take at most ``timeout`` seconds (plus the moment it takes to notice).

Feeds follow at most ``MAX_REDIRECTS`` redirects, and never into loopback, private, link-local,
unique-local, unspecified, multicast or reserved addresses unless the feed's own URL is in that
class: a feed on the public Internet must not be able to make us fetch
``http://169.254.169.254/`` (cloud metadata) or an intranet page. Every address a host resolves
to is checked before any connection is made, and the connection goes to the very address that
was checked, so DNS rebinding between check and connect cannot slip through. Behind a proxy
(``HTTPS_PROXY`` and friends) the proxy connects; the address check is then the proxy's job.
The class of the configured URL's own addresses is trusted, as it resolves when fetched (an
intranet feed by host name must work): a feed owner who points their own host name at a
private address is not stopped by this check, only their redirects are.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

MAX_REDIRECTS = 5

# Enough lookups in flight for every feed of a round (fetch.workers is at most 64).
_dns = ThreadPoolExecutor(max_workers=64, thread_name_prefix="newsletter-dns")
_local = threading.local()


class TransportError(requests.RequestException):
    """The request was given up; ``str()`` says why in words a user can act on."""


class DeadlineExceeded(TransportError, requests.Timeout):
    """No full answer (headers and body) within the deadline."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no full answer within {timeout:g} s")


class Refused(TransportError):
    """A redirect the policy does not follow, or an answer too large to read."""


class _AddressRefused(Exception):
    # Not an OSError: urllib3 would take one for a network error, wrap it and retry.
    pass


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def address_class(address: str) -> str:
    """``public`` or the kind of special-purpose address ``address`` is."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one reaches that IPv4 host: ::ffff:a.b.c.d directly,
        # 6to4 (2002::/16) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48) through a gateway.
        if ip in _LOCAL_NAT64:
            return "reserved"  # where the IPv4 address sits depends on the site's prefix length
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    # Order matters: 169.254/16 and fc00::/7 are "private" to ipaddress as well.
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.IPv6Network("fc00::/7"):
        return "unique-local"
    if ip.is_private:
        return "private"
    return "public" if ip.is_global else "reserved"


class _Guard:
    """One request's deadline, the sockets it opened, and (for feeds) its address policy."""

    def __init__(self, timeout: float, *, restrict: bool) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.restrict = restrict
        self.allowed: set[str] | None = None  # set by the first connection when restricted
        self.fired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.fired or self.left() <= 0

    def watch(self, sock: socket.socket) -> None:
        # A duplicate of the descriptor: shutting it down ends the connection for every
        # descriptor, and it cannot be closed and reused under us by urllib3.
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with self._lock:
            if self._done:
                dup.close()
                return
            self._socks.append(dup)
            if self.fired:
                _shutdown(dup)

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            for s in self._socks:
                _shutdown(s)

    def check(self, host: str, addresses: list[str]) -> None:
        classes = {address_class(a) for a in addresses}
        if self.allowed is None:
            # The first connection is to the URL in the configuration: its class is trusted.
            self.allowed = classes | {"public"}
            return
        for address in addresses:
            kind = address_class(address)
            if kind not in self.allowed:
                shown = host if host == address else f"{host} ({address})"
                raise _AddressRefused(f"{shown} is a {kind} address")

    @contextmanager
    def active(self) -> Iterator[_Guard]:
        """Arm the deadline for the block. Anything that fails once it has passed fails as
        DeadlineExceeded, and so does a block that ends after the watchdog fired: it ended a
        body without a length, and what arrived is not the answer."""
        _local.guard = self
        self._timer.start()
        try:
            yield self
        except TransportError:
            raise
        except Exception:
            if self.expired():
                raise DeadlineExceeded(self.timeout) from None
            raise
        else:
            if self.fired:
                raise DeadlineExceeded(self.timeout)
        finally:
            _local.guard = None
            self._timer.cancel()
            with self._lock:
                self._done = True
                for s in self._socks:
                    s.close()
                self._socks.clear()


def _shutdown(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _resolve(host: str, port: int, left: float) -> list[tuple[Any, ...]]:
    # getaddrinfo cannot be interrupted; waiting for it in another thread keeps the deadline.
    future = _dns.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    return future.result(timeout=max(left, 0.001))


class _GuardedConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        guard: _Guard | None = getattr(_local, "guard", None)
        if guard is None or self.proxy is not None or getattr(self, "_tunnel_host", None):
            sock = super()._new_conn()
        else:
            sock = self._connect_checked(guard)
        if guard is not None:
            guard.watch(sock)
        return sock

    def _connect_checked(self, guard: _Guard) -> socket.socket:
        try:
            infos = _resolve(self.host, self.port or 80, guard.left())
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except FutureTimeout:
            raise ConnectTimeoutError(self, f"looking up {self.host} timed out") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if guard.restrict:
            guard.check(self.host, addresses)
        error: OSError | None = None
        for address in addresses:
            try:
                # A numeric host: no second lookup, so this is the address that was checked.
                return urllib3.util.connection.create_connection(
                    (address, self.port or 80),
                    max(min(guard.left(), _seconds(self.timeout)), 0.001),
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as exc:  # TimeoutError included
                error = exc
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from error
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        guard: _Guard | None = getattr(_local, "guard", None)
        if guard is not None and self.sock is not None:
            guard.watch(self.sock)  # a kept-alive connection, reused for this request
        super().request(*args, **kwargs)


def _seconds(timeout: Any) -> float:
    return float(timeout) if isinstance(timeout, int | float) else 3600.0


class _GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections belong to the current request's deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are urllib3's own
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        guard: _Guard | None = getattr(_local, "guard", None)
        if guard is not None:
            left = guard.left()
            if left <= 0:
                raise DeadlineExceeded(guard.timeout)
            kwargs["timeout"] = (left, left)
        return super().send(request, *args, **kwargs)


def mount(session: requests.Session) -> requests.Session:
    """Give ``session`` connections that honour the deadline of ``request``/``get``."""
    if not isinstance(session.get_adapter("https://example.org/"), DeadlineAdapter):
        session.mount("https://", DeadlineAdapter())
        session.mount("http://", DeadlineAdapter())
    return session


def request(
    session: requests.Session, method: str, url: str, *, timeout: float, **kwargs: Any
) -> requests.Response:
    """``session.request`` with its body read, all within ``timeout`` seconds in total.

    Raises DeadlineExceeded (a requests.Timeout) when the answer is not complete in time.
    """
    if kwargs.get("stream"):
        raise ValueError("the body is read within the deadline; stream=True cannot be")
    mount(session)
    guard = _Guard(timeout, restrict=False)
    with guard.active():
        return session.request(method, url, timeout=timeout, **kwargs)


@dataclass
class Answer:
    """A GET's final answer; ``body`` is read only for 2xx."""

    status: int
    reason: str
    url: str  # where the answer came from, after redirects
    headers: Mapping[str, str]
    body: bytes = b""
    history: list[int] = field(default_factory=list)  # status of each redirect followed


def get(
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: float,
    max_bytes: int,
    max_redirects: int = MAX_REDIRECTS,
) -> Answer:
    """GET a feed: redirects under the policy above, at most ``max_bytes`` (decoded) read."""
    guard = _Guard(timeout, restrict=True)
    with requests.Session() as session, guard.active():
        mount(session)
        return _follow(session, url, headers, timeout, max_bytes, max_redirects)


def _follow(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    timeout: float,
    max_bytes: int,
    max_redirects: int,
) -> Answer:
    history: list[int] = []
    current = url
    while True:
        try:
            resp = session.get(current, headers=dict(headers), stream=True, allow_redirects=False)
        except _AddressRefused as exc:
            raise Refused(
                f"redirect to {current} refused: {exc}; feeds are only followed to public"
                " addresses or to ones like the feed's own"
            ) from None
        with resp:
            target = session.get_redirect_target(resp)
            if target is None:
                answer = Answer(resp.status_code, resp.reason or "", resp.url, resp.headers, b"", history)
                if 200 <= resp.status_code < 300:
                    answer.body = _read(resp, max_bytes)
                return answer
            history.append(resp.status_code)
            following = requests.utils.requote_uri(urljoin(resp.url, target))
        if len(history) > max_redirects:
            raise Refused(
                f"more than {max_redirects} redirects (the last to {following}); put the feed's"
                " current URL in schedules.yaml"
            )
        if urlsplit(following).scheme.lower() not in ("http", "https"):
            raise Refused(f"redirect to {following} refused: only http and https are followed")
        current = following


def _read(resp: requests.Response, max_bytes: int) -> bytes:
    declared = resp.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise Refused(f"{int(declared):,} bytes is over the {max_bytes:,} byte cap")
    chunks, size = [], 0
    # read1 returns whatever has arrived; iter_content would wait for a full chunk.
    while chunk := resp.raw.read1(64 * 1024, decode_content=True):
        size += len(chunk)
        if size > max_bytes:
            raise Refused(f"more than the {max_bytes:,} byte cap; not read")
        chunks.append(chunk)
    return b"".join(chunks)
