"""Benchmark: SMTP delivery at a network distance, through a delaying relay on 127.0.0.1.

    .venv/bin/python bench/bench_latency.py [--messages 2000] [--loopback-messages 10000]
        [--rtt 0,20,60] [--connections 1,10,20,50] [--cap-seconds 40] [--quick]

The server is Postfix's smtp-sink (installed from Debian's postfix when missing, as root). This
kernel has no netem, so distance comes from ``relay.py``: a TCP relay in its own process that
forwards each chunk RTT/2 later in each direction. Its own ceiling is measured first.

1. At each RTT, the same message (the project's 25-article digest, taken from a dry run of
   ``send-digest``) sent by
   - the project: the whole ``newsletter send-digest`` process against a temporary project
     whose smtp sender points at the relay, with ``connections:`` omitted and set to each count;
   - plain smtplib, ``sendmail`` in lock-step on one connection;
   - ``refclient.py``: pipelining at one round trip a message over the same connection counts.
   msg/s is messages over wall time (the project's: the whole process, start-up included);
   CPU per message is the client's user + system time over messages (the project's: the whole
   child process, from getrusage(RUSAGE_CHILDREN)).
2. Loopback, no relay: the whole project process (default options) against smtplib.
3. The targets, each marked met or not met.

Slow configurations are capped: a client sends min(N, what fits in --cap-seconds) and the count
sent stands beside each figure. The reference and smtplib start no message after the cap; the
project gets a subscriber list of the capped size, estimated from a short probe run of its own.
Every count is checked against smtp-sink's own counter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import smtplib
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from _support import LOOPBACK, REPO, TimedSmtpSink, exit_on_problems, line_buffered, require_smtp_sink
from bench_digest import SCHEDULE, write_project
from relay import RelayProcess

ARTICLES = 25
REFCLIENT = Path(__file__).resolve().parent / "refclient.py"
DEFAULT_CONNECTIONS = 10  # what the smtp sender uses when connections: is omitted
TARGET_VS_REFERENCE = 0.7  # at 60 ms, connections: 20, project / reference(20)
TARGET_VS_SMTPLIB_FAR = 25.0  # at 60 ms, defaults, project / smtplib(1)
TARGET_VS_SMTPLIB_LOOPBACK = 1.5  # loopback, whole process / smtplib(1)
TARGET_CPU_MS = 0.3  # client CPU per message, project at loopback
FAR_RTT = 60
# The relay's ceiling needs enough messages a connection to be more than connection set-up.
CEILING_MESSAGES = 1000


@dataclass
class Run:
    """One client's run: what it sent, how long it took, what it cost."""

    label: str
    connections: int | None  # None: the project with connections: omitted
    sent: int
    seconds: float
    cpu_seconds: float
    server_count: int  # what smtp-sink counted for this run
    first_message: float = 0.0  # project: start of the process to the first message at the server
    less_dry_run: float | None = None  # project: CPU ms a message less one dry run's (start-up)
    refused: str = ""  # the project refused the configuration (an option it does not know)
    error: str = ""  # the run did not deliver what it should have

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds / self.sent * 1e3 if self.sent else 0.0

    @property
    def ok(self) -> bool:
        return not self.refused and not self.error and self.sent > 0


class Bench:
    def __init__(self, sink: TimedSmtpSink, root: Path, message: Path, cap: float, dry_cpu: float) -> None:
        self.sink, self.root, self.message, self.cap = sink, root, message, cap
        self.dry_cpu = dry_cpu
        self.problems: list[str] = []
        self.projects = 0

    def check_count(self, label: str, before: int, sent: int) -> int:
        counted = self.sink.wait_for(before + sent) - before
        if counted != sent:
            self.problems.append(f"{label}: the client says {sent} sent, smtp-sink counted {counted}")
        return counted

    # -- the reference clients, in their own process ------------------------------------------

    def client(self, kind: str, port: int, messages: int, connections: int = 1, cap: bool = True) -> Run:
        label = "smtplib, lock-step" if kind == "smtplib" else "reference, pipelined"
        before = self.sink.received()
        cmd = [sys.executable, str(REFCLIENT), "--client", kind, "--port", str(port)]
        cmd += ["--message", str(self.message), "--messages", str(messages)]
        cmd += ["--connections", str(connections), "--seconds", str(self.cap if cap else 0)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.cap * 3 + 120, check=False)
        lines = done.stdout.strip().splitlines()
        data: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-300:]}
        if done.returncode != 0 or "error" in data:
            sys.exit(f"{label} ({connections} connections) aborted: {data.get('error')}")
        if data["failed"]:
            self.problems.append(f"{label} ({connections}): {data['failed']} message(s) refused")
        counted = self.check_count(f"{label} ({connections})", before, data["sent"])
        return Run(label, connections, data["sent"], data["seconds"], data["cpu_seconds"], counted)

    # -- the project's own process ------------------------------------------------------------

    def project(self, port: int, count: int, connections: int | None) -> Run:
        self.projects += 1
        where = self.root / f"project-{self.projects}"
        where.mkdir()
        config = write_project(where, count, ARTICLES, port)
        if connections is not None:
            text = config.read_text(encoding="utf-8")
            text = text.replace("    timeout: 30\n", f"    timeout: 30\n    connections: {connections}\n", 1)
            config.write_text(text, encoding="utf-8")
        cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "newsletter", "--config", str(config)]
        cmd += ["send-digest", SCHEDULE]
        label = "project send-digest"
        name = f"{label} ({connections or 'default'} connections, {count} messages)"
        before = self.sink.received()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        limit = self.cap * 3 + 60
        start = perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=where, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            done = None
        wall = perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        if done is None:
            counted = self.sink.received() - before
            self.problems.append(f"{name}: did not finish within {limit:g} s")
            return Run(label, connections, 0, wall, cpu, counted, error=f"did not finish within {limit:g} s")
        found = re.search(r"sent (\d+), pending (\d+), failed (\d+)", done.stdout)
        sent = int(found.group(1)) if found else 0
        said = done.stderr.strip() or done.stdout.strip()
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        # A crash says what it was on its last line; an error message on its first ones.
        tail = f"crashed: {lines[-1]}" if "Traceback" in said else " | ".join(lines[:3])
        tail = re.sub(r"\S*schedules\.yaml: ", "", tail)[:160]
        if done.returncode != 0 and not found and self.sink.received() == before:
            # Nothing built, nothing sent. An unknown connections: key is a version without the
            # option, not a failure; anything else is one.
            if connections is not None and "connections" in said and "Traceback" not in said:
                return Run(label, connections, 0, wall, cpu, 0, refused=tail)
            self.problems.append(f"{name}: {tail}")
            return Run(label, connections, 0, wall, cpu, 0, error=tail)
        if done.returncode != 0 or sent != count or found is None or found.group(2) != "0":
            counted = self.sink.received() - before
            self.problems.append(f"{name}: exit {done.returncode}, {done.stdout.strip()[-200:]} {tail}")
            return Run(label, connections, 0, wall, cpu, counted, error=f"delivered {sent} of {count}")
        counted = self.check_count(name, before, sent)
        span = self.sink.span(before, before + sent)
        first = span[0] - start if span else 0.0
        less = max(cpu - self.dry_cpu, 0.0) / sent * 1e3
        return Run(label, connections, sent, wall, cpu, counted, first_message=first, less_dry_run=less)

    def capped_project(self, port: int, messages: int, connections: int | None, floor_rate: float) -> Run:
        """The project with min(messages, what fits in the cap), sized from a probe run of its own.

        floor_rate (smtplib's at this distance) sizes the probe so that even a project no
        faster than smtplib finishes it in a few seconds.
        """
        conns = connections or DEFAULT_CONNECTIONS
        probe_seconds = min(5.0, self.cap / 4)
        # Ten messages a connection: fewer measure mostly the connections being opened.
        probe = min(messages, max(10 * conns, int(floor_rate * probe_seconds)))
        first = self.project(port, probe, connections)
        if not first.ok or probe == messages:
            return first
        # Start-up is paid once; the rest goes at the probe's rate once messages flow.
        flowing = max(first.seconds - first.first_message, 1e-3)
        rate = max(first.sent - 1, 1) / flowing
        count = min(messages, int(rate * max(self.cap - first.first_message, 0.0)))
        if count <= probe:
            return first
        return self.project(port, count, connections)


# -- the message ---------------------------------------------------------------------------------


def sample_message(root: Path) -> tuple[Path, float, float]:
    """A real message of the project, and the dry run's wall and CPU seconds.

    The dry run writes every message to the outbox. Of one message, it is mostly what every
    send-digest pays once: the interpreter, the CSV, the feed, the render.
    """
    where = root / "dry-run"
    where.mkdir()
    config = write_project(where, 1, ARTICLES, 25)  # the port is never used by a dry run
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "newsletter", "--config", str(config)]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = perf_counter()
    done = subprocess.run(
        [*cmd, "send-digest", SCHEDULE, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=where,
        timeout=120,
        check=False,
    )
    wall = perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    files = sorted((where / "outbox").rglob("*.eml"))
    if done.returncode != 0 or not files:
        sys.exit(f"the dry run wrote no message: {done.stdout.strip()} {done.stderr.strip()}")
    return files[0], wall, cpu


def round_trip(port: int, probes: int = 20) -> float:
    """Median NOOP round trip through whatever listens on port: the distance the relay makes."""
    times = []
    with smtplib.SMTP(LOOPBACK, port, local_hostname="localhost", timeout=30) as conn:
        for _ in range(probes):
            start = perf_counter()
            code, _text = conn.noop()
            times.append(perf_counter() - start)
            if code != 250:
                sys.exit(f"NOOP through port {port} answered {code}")
    return statistics.median(times)


# -- output --------------------------------------------------------------------------------------


def conns_text(run: Run) -> str:
    return f"({DEFAULT_CONNECTIONS})" if run.connections is None else str(run.connections)


def table(title: str, runs: list[Run]) -> None:
    print(f"\n{title}")
    print(f"  {'client':<34} {'conns':>5} {'sent':>6} {'msg/s':>8} {'CPU ms/msg':>10}  notes")
    for run in runs:
        name = run.label + (" (defaults)" if run.connections is None else "")
        if run.refused or run.error:
            why = f"refused: {run.refused}" if run.refused else f"FAILED: {run.error}"
            print(f"  {name:<34} {conns_text(run):>5} {'-':>6} {'-':>8} {'-':>10}  {why}")
            continue
        notes = []
        if run.first_message:
            notes.append(f"first message after {run.first_message:.2f} s")
        if run.less_dry_run is not None:
            notes.append(f"CPU less a dry run's {run.less_dry_run:.3f} ms/msg")
        note = "; ".join(notes)
        print(
            f"  {name:<34} {conns_text(run):>5} {run.sent:>6,} {run.rate:>8,.1f} {run.cpu_ms:>10.3f}  {note}"
        )


def find(runs: list[Run], label: str, connections: int | None) -> Run | None:
    return next((r for r in runs if r.label.startswith(label) and r.connections == connections), None)


def verdict(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "not measured"
    met = value <= target if at_most else value >= target
    return "met" if met else "NOT MET"


def ratio(a: Run | None, b: Run | None) -> float | None:
    if a is None or b is None or not a.ok or not b.ok or b.rate == 0:
        return None
    return a.rate / b.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per run at a distance (default 2000)")
    parser.add_argument("--loopback-messages", type=int, default=10_000, help="default 10000")
    parser.add_argument("--rtt", default="0,20,60", help="round-trip times in ms (default 0,20,60)")
    parser.add_argument("--connections", default="1,10,20,50", help="default 1,10,20,50")
    parser.add_argument("--cap-seconds", type=float, default=40.0, help="longest run (default 40)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few messages, RTT 0 and 20")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.loopback_messages = 200, 1000
        args.rtt, args.cap_seconds = "0,20", 4.0
    try:
        rtts = [float(x) for x in args.rtt.split(",") if x.strip()]
        counts = [int(x) for x in args.connections.split(",") if x.strip()]
    except ValueError:
        parser.error("--rtt and --connections take comma-separated numbers")
    if not rtts or not counts or min(counts) < 1 or min(rtts) < 0 or args.messages < 1:
        parser.error("need at least one RTT >= 0, connection counts >= 1 and --messages >= 1")
    line_buffered()
    print(
        f"latency benchmark: {ARTICLES}-article digest, {args.messages:,} messages a run (cap"
        f" {args.cap_seconds:g} s), RTT {args.rtt} ms; Python {platform.python_version()},"
        f" {os.cpu_count()} CPUs, 127.0.0.1 only"
    )
    path = require_smtp_sink("server")

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp, TimedSmtpSink(path) as sink:
        root = Path(tmp)
        message, dry_wall, dry_cpu = sample_message(root)
        size = message.stat().st_size
        print(f"message: the project's own, from a dry run: {size / 1024:,.1f} KB")
        print(
            f"the dry run of one message (start-up, CSV, feed, render): {dry_wall:.2f} s,"
            f" {dry_cpu:.2f} s CPU; every send-digest below pays about that once"
        )
        bench = Bench(sink, root, message, args.cap_seconds, dry_cpu)

        # The relay's ceiling: if it were the limit, every figure below would be its own.
        widest = max(counts)
        many = max(args.messages, CEILING_MESSAGES)
        direct = bench.client("pipelined", sink.port, many, widest, cap=False)
        direct_trip = round_trip(sink.port)
        with RelayProcess(sink.port, 0) as relay:
            relayed = bench.client("pipelined", relay.port, many, widest, cap=False)
            relay_trip = round_trip(relay.port)
        print(f"\nrelay ceiling: reference client, {widest} connections, {many:,} messages, 0 ms")
        mib = direct.rate * size / 2**20
        share = relayed.rate / direct.rate
        print(f"  direct to smtp-sink      {direct.rate:>8,.0f} msg/s  ({mib:,.0f} MiB/s)")
        print(f"  through the relay, 0 ms  {relayed.rate:>8,.0f} msg/s  ({share:.0%} of direct)")
        print(
            f"  NOOP round trip: direct {direct_trip * 1e3:.2f} ms, through the relay at 0 ms"
            f" {relay_trip * 1e3:.2f} ms (what the relay adds to every round trip)"
        )

        print(
            "\nmsg/s: messages / wall time. The project's is the whole send-digest process (start-up"
            "\nincluded), its CPU the child's user + system time; the clients' span connect to QUIT."
        )
        by_rtt: dict[float, list[Run]] = {}
        for rtt in rtts:
            runs: list[Run] = []
            with RelayProcess(sink.port, rtt) as relay:
                measured = round_trip(relay.port)
                lockstep = bench.client("smtplib", relay.port, args.messages)
                runs.append(lockstep)
                for n in counts:
                    runs.append(bench.client("pipelined", relay.port, args.messages, n))
                for conns in [None, *counts]:
                    runs.append(bench.capped_project(relay.port, args.messages, conns, lockstep.rate))
            by_rtt[rtt] = runs
            limit = f"at most {args.messages:,} messages or {args.cap_seconds:g} s"
            table(f"RTT {rtt:g} ms (relay; NOOP round trip {measured * 1e3:.1f} ms), {limit}", runs)

        loop_project = bench.project(sink.port, args.loopback_messages, None)
        loop_smtplib = bench.client("smtplib", sink.port, args.loopback_messages, cap=False)
        loopback = [loop_smtplib, loop_project]
        table(f"loopback, direct to smtp-sink, {args.loopback_messages:,} messages", loopback)
        loop_ratio = ratio(loop_project, loop_smtplib)
        print(f"  project / smtplib: {loop_ratio:.2f}" if loop_ratio is not None else "")

    far = by_rtt.get(FAR_RTT, [])
    far_ref = ratio(find(far, "project", 20), find(far, "reference", 20))
    far_lib = ratio(find(far, "project", None), find(far, "smtplib", 1))
    cpu = loop_project.cpu_ms if loop_project.ok else None
    targets = [
        (f"{FAR_RTT} ms, connections: 20: project / reference(20)", far_ref, TARGET_VS_REFERENCE, False),
        (f"{FAR_RTT} ms, defaults: project / smtplib(1)", far_lib, TARGET_VS_SMTPLIB_FAR, False),
        (
            f"loopback {args.loopback_messages:,}: whole process / smtplib(1)",
            loop_ratio,
            TARGET_VS_SMTPLIB_LOOPBACK,
            False,
        ),
        ("client CPU per message, project at loopback (ms)", cpu, TARGET_CPU_MS, True),
    ]
    print("\ntargets")
    for name, value, target, at_most in targets:
        shown = f"{value:,.2f}" if value is not None else "-"
        sign = "<=" if at_most else ">="
        print(f"  {name:<54} {shown:>8}  target {sign} {target:g}  {verdict(value, target, at_most)}")
    if cpu is not None:
        print(f"  (smtplib at loopback: {loop_smtplib.cpu_ms:.3f} ms a message)")
    refused = sorted({r.refused for runs in by_rtt.values() for r in runs if r.refused})
    for why in refused:
        print(f"  note: the project refused a connections: setting: {why}")
    exit_on_problems(bench.problems)
    print(f"\nevery count checked against smtp-sink's own counter ({sink.received():,} messages in all)")


if __name__ == "__main__":
    main()
