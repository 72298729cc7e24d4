"""Senders: plugins through entry points, and the SMTP sender against real aiosmtpd servers."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from conftest import FeedServer, Mailbox, Project, Route, free_port, item, rss
from newsletter.config import load_config
from newsletter.errors import ConfigError, DeliveryError
from newsletter.senders import Outgoing, forget_plugins, sender_types
from newsletter.senders.bluesky import BlueskySender
from newsletter.senders.discord import DiscordSender
from newsletter.senders.mastodon import MastodonSender
from newsletter.senders.slack import SlackSender
from newsletter.senders.smtp import SmtpOptions, SmtpSender
from newsletter.senders.throttle import Throttle
from newsletter.senders.webhook import WebhookSender


def test_built_in_senders_come_from_the_entry_point_group() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="newsletter.senders")}
    assert names["smtp"] == "newsletter.senders.smtp:SmtpSender"
    assert names["file"] == "newsletter.senders.file:FileSender"
    assert sender_types()["smtp"] is SmtpSender


def test_the_smtp_sender_loads_no_renderer_web_framework_database_or_http_client() -> None:
    heavy = ("jinja2", "premailer", "flask", "sqlite3", "_sqlite3", "requests")
    code = f"import sys, newsletter.senders.smtp; print(*[m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []


SERVICES = {
    "slack": SlackSender,
    "discord": DiscordSender,
    "mastodon": MastodonSender,
    "bluesky": BlueskySender,
}


def test_each_service_is_its_own_type_and_the_format_key_still_maps_to_it(project: Project) -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="newsletter.senders")}
    options = {
        "slack": "    url: https://hooks.slack.com/services/T1/B1/x\n",
        "discord": "    url: https://discord.com/api/webhooks/1/tok\n",
        "mastodon": "    url: https://mastodon.test/\n    token_env: TOKEN\n    visibility: unlisted\n",
        "bluesky": "    identifier: news.example.net\n    password_env: BSKY_PASSWORD\n",
    }
    senders = "".join(
        f"  new_{kind}:\n    type: {kind}\n{opts}  old_{kind}:\n    type: webhook\n    format: {kind}\n{opts}"
        for kind, opts in options.items()
    )
    project.setup(["feed.xml"])
    project.config.write_text(project.config.read_text().replace("schedules:\n", senders + "schedules:\n"))
    config = load_config(project.config)
    for kind, cls in SERVICES.items():
        assert names[kind] == f"newsletter.senders.{kind}:{cls.__name__}"
        new, old = config.sender(f"new_{kind}"), config.sender(f"old_{kind}")
        assert type(new) is cls and type(old) is cls
        assert new.options == old.options
    assert config.sender("old_mastodon").options.model_dump()["url"] == "https://mastodon.test"
    assert config.sender("old_bluesky").options.model_dump()["url"] == "https://bsky.social"

    # Each service's options refuse what is not theirs, naming the file and the key.
    project.config.write_text(
        project.config.read_text().replace("    type: slack\n", "    type: slack\n    secret_env: S\n")
    )
    with pytest.raises(ConfigError) as err:
        load_config(project.config)
    assert f"{project.config}: senders.new_slack.secret_env: unknown key" in str(err.value)


def test_each_service_declares_its_post_length() -> None:
    # How each counts and how long a post may be: social.py asks the sender, it does not guess.
    limits = {kind: (cls.text_rule, cls.text_limit) for kind, cls in SERVICES.items()}
    assert limits == {
        "slack": ("mastodon", 3000),
        "discord": ("mastodon", 2000),
        "mastodon": ("mastodon", None),  # per instance: the schedule's share.mastodon_limit
        "bluesky": ("bluesky", 300),
    }
    assert (WebhookSender.text_rule, WebhookSender.text_limit) == ("mastodon", None)


def test_one_throttle_paces_sends_and_honours_a_hold() -> None:
    now, waits = [100.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    paced = Throttle(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        paced.wait()
    assert waits == [0.25, 0.25]  # the first goes at once
    held = Throttle(max_wait=2, clock=lambda: now[0], sleep=sleep)
    held.hold(60)  # a target asked for a minute; no single wait is longer than max_wait
    held.wait()
    assert waits[-1] == 2


PLUGIN = """
from pathlib import Path
from newsletter.senders import Sender, SenderOptions

class MemoOptions(SenderOptions):
    folder: str

class MemoSender(Sender):
    Options = MemoOptions

    def send(self, message):
        path = self.base_dir / self.options.folder / (message.recipient + ".txt")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(message.data)
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An installed third-party package that registers a `memo` sender, as pip would lay it out."""
    site = tmp_path / "site"
    (site / "memo_sender.py").parent.mkdir()
    (site / "memo_sender.py").write_text(PLUGIN)
    info = site / "memo_sender-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: memo-sender\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[newsletter.senders]\nmemo = memo_sender:MemoSender\n")
    monkeypatch.syspath_prepend(str(site))
    forget_plugins()
    yield
    forget_plugins()


def test_a_third_party_sender_plugs_in_through_its_entry_point(
    third_party: None, project: Project, feed_server: FeedServer
) -> None:
    feed_server.routes["/feed.xml"] = Route(rss([item(1)]))
    project.setup([feed_server.url("/feed.xml")])
    text = project.config.read_text().replace("type: file\n    path: outbox", "type: memo\n    folder: memos")
    project.config.write_text(text)
    result = project.run("send-digest", "weekly")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (project.root / "memos").iterdir()) == [
        "ann@example.com.txt",
        "bob@example.com.txt",
        "cy@example.com.txt",
    ]
    # Its options are validated like a built-in's.
    project.config.write_text(text.replace("folder: memos", "fodler: memos"))
    bad = project.run("check")
    assert bad.exit_code == 2 and "senders.main.fodler: unknown key" in bad.output


# -- SMTP against real servers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"news" and data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)


def serve(box: Mailbox, certificate: tuple[Path, Path], implicit: bool) -> tuple[Controller, int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    port = free_port()
    kwargs: dict[str, Any] = {"authenticator": authenticator, "auth_required": True}
    if implicit:
        # aiosmtpd does not count an implicit-TLS socket as TLS for its AUTH check.
        kwargs.update(ssl_context=context, auth_require_tls=False)
    else:
        kwargs.update(tls_context=context, require_starttls=True)
    controller = Controller(box, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    return controller, port


def message(to: str) -> Outgoing:
    data = f"From: news@example.net\r\nTo: {to}\r\nSubject: hi\r\n\r\nhello\r\n".encode()
    return Outgoing("news@example.net", to, "<1@example.net>", data, "t-1")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_tls_and_auth(mode: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    box = Mailbox()
    controller, port = serve(box, certificate, implicit=mode == "ssl")
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret")
    try:
        opts = SmtpOptions(
            host="127.0.0.1",
            port=port,
            username="news",
            password_env="SMTP_PASSWORD",
            ca_file=str(certificate[0]),
            timeout=10,
            **{mode: True},
        )
        with SmtpSender("mail", opts, Path(".")) as sender:
            sender.send(message("ann@example.com"))
            sender.send(message("bob@example.com"))
        assert box.by_recipient() == {"ann@example.com": 1, "bob@example.com": 1}

        monkeypatch.setenv("SMTP_PASSWORD", "wrong")
        with pytest.raises(DeliveryError, match="refused the login"):
            SmtpSender("mail", opts, Path(".")).open()
    finally:
        controller.stop()


def test_an_untrusted_certificate_is_refused(certificate: tuple[Path, Path]) -> None:
    box = Mailbox()
    controller, port = serve(box, certificate, implicit=False)
    try:
        opts = SmtpOptions(host="127.0.0.1", port=port, starttls=True, timeout=10)
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            SmtpSender("mail", opts, Path(".")).open()
    finally:
        controller.stop()


class Dropper(Mailbox):
    """Drops the connection at the third RCPT, as an overloaded server does."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts = 0
        self.connections = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        self.rcpts += 1
        if self.rcpts == 3:
            server.transport.close()
            return "421 closing"
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_one_connection_for_many_messages_and_a_dropped_one_is_reopened() -> None:
    box = Dropper()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        opts = SmtpOptions(host="127.0.0.1", port=port, timeout=10)
        with SmtpSender("mail", opts, Path(".")) as sender:
            for n in range(6):
                sender.send(message(f"r{n}@example.com"))
        assert box.by_recipient() == {f"r{n}@example.com": 1 for n in range(6)}
        assert box.connections == 2
    finally:
        controller.stop()


def test_rate_limit_spaces_the_messages(smtp_server: tuple[Mailbox, int]) -> None:
    box, port = smtp_server
    opts = SmtpOptions(host="127.0.0.1", port=port, rate_limit=20, timeout=10)
    start = time.monotonic()
    with SmtpSender("mail", opts, Path(".")) as sender:
        for n in range(5):
            sender.send(message(f"r{n}@example.com"))
    # Five messages at 20 a second need at least four intervals of 50 ms.
    assert time.monotonic() - start >= 0.2
    assert len(box.messages) == 5


# -- no password in clear text over the network ----------------------------------------------


def test_a_password_without_tls_to_a_remote_host_is_a_config_error(project: Project) -> None:
    project.setup(["feed.xml"])
    text = project.config.read_text().replace(
        "    type: file\n    path: outbox",
        "    type: smtp\n    host: smtp.example.org\n    port: 587\n    username: news\n"
        "    password_env: SMTP_PASSWORD",
    )
    project.config.write_text(text)
    # Refused when the file is read, before any command could open a connection.
    result = project.run_process("check")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert str(project.config) in output and "senders.main" in output, output
    assert "unencrypted" in output and "starttls: true" in output and "ssl: true" in output, output
    for fixed in ("    starttls: true\n", "    ssl: true\n    port: 465\n"):
        project.config.write_text(text.replace("    port: 587\n", fixed))
        assert project.run_process("check").returncode == 0


def test_the_sender_checks_again_before_it_connects() -> None:
    # Options that skipped validation (built by a plugin or a script) are refused just the same,
    # before a byte is sent. 0.0.0.0 is no loopback address, yet stays on this machine.
    opts = SmtpOptions.model_construct(
        host="0.0.0.0", port=free_port(), username="news", password_env="SMTP_PASSWORD", timeout=5
    )
    with pytest.raises(DeliveryError, match="unencrypted") as caught:
        SmtpSender("mail", opts, Path(".")).open()
    assert "starttls" in caught.value.hint


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("mail.localhost", False),
        ("smtp.example.org", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_only_this_machine_counts_as_loopback(host: str, loopback: bool) -> None:
    from newsletter.senders.smtp import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_relay_on_this_machine_takes_auth_without_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    box = Mailbox()
    port = free_port()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret")
    try:
        for host in ("127.0.0.1", "localhost"):
            opts = SmtpOptions.model_validate(
                {"host": host, "port": port, "username": "news", "password_env": "SMTP_PASSWORD"}
            )
            with SmtpSender("mail", opts, Path(".")) as sender:
                sender.send(message(f"{host}@example.com"))
        assert box.by_recipient() == {"127.0.0.1@example.com": 1, "localhost@example.com": 1}
    finally:
        controller.stop()
