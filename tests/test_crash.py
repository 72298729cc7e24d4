"""A send killed with SIGKILL mid-way loses nobody and duplicates at most the message in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import FeedServer, Mailbox, Project, Route, item, rss

RECIPIENTS = 300


def test_sigkill_mid_send_then_rerun_gives_everyone_exactly_one_copy(
    project: Project, feed_server: FeedServer, smtp_server: tuple[Mailbox, int]
) -> None:
    box, port = smtp_server
    box.data_delay = 0.004  # a few seconds in all, so the kill lands mid-send
    feed_server.routes["/feed.xml"] = Route(rss([item(1), item(2)]))
    addresses = [f"reader{i:03d}@example.com" for i in range(RECIPIENTS)]
    project.setup([feed_server.url("/feed.xml")], smtp_port=port, subscribers=addresses)
    # One connection keeps the old bound, at most one message of unknown fate; ten
    # connections may each have one (tests/test_pipeline.py).
    text = project.config.read_text()
    project.config.write_text(text.replace("    timeout: 10\n", "    timeout: 10\n    connections: 1\n", 1))

    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "--config", str(project.config), "send-digest", "weekly"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    deadline = time.monotonic() + 60
    while len(box.messages) < RECIPIENTS // 3:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the send never got going"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    delivered_before = len(box.messages)
    assert delivered_before < RECIPIENTS, "the kill came too late to test anything"
    box.data_delay = 0  # slow only so that the kill lands mid-send; the rerun need not be

    # The kill needed a process of its own; the reruns do not.
    rerun = project.run_in_process("send-digest", "weekly")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    counts = box.by_recipient()
    assert set(counts) == set(addresses), "someone got nothing"
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= 1, f"{duplicates} duplicates after one kill"
    # The rerun finished the killed issue rather than building a second one.
    assert {str(m["Subject"]) for m in box.parsed()} == {"Test Weekly #1: Post 2"}

    third = project.run_in_process("send-digest", "weekly")
    assert "nothing new" in third.stdout and len(box.messages) == sum(counts.values())
