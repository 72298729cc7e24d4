"""Benchmark (issue 6, item 5): whole-process start-up of the command line.

    .venv/bin/python bench/bench_startup.py [--runs 20]

Times, as whole processes, ``newsletter --help`` and ``newsletter check`` on the example
configuration (the repository's schedules.yaml with examples/, subscribers/ and templates/,
copied to a temporary folder so that the state database ``check`` opens is not created in the
work tree). ``check`` is timed twice: on a fresh state (nothing fetched yet, as in a new
clone), and after ``newsletter fetch`` (so ``check`` also renders an issue to report its size).
For scale, the same for a bare ``python -c pass`` with the same interpreter.

hyperfine runs them when it is installed (``--warmup 2``, median of ``--runs``); otherwise a
loop of subprocess runs timed with time.perf_counter, after two warm-up runs, median printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

from _support import REPO, line_buffered

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
EXAMPLE = ["schedules.yaml", "examples", "subscribers", "templates"]


def copy_example(dest: Path) -> Path:
    for name in EXAMPLE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest / "schedules.yaml"


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # the installed package's .pyc files are used, as for users
    return e


def loop_times(cmd: list[str], cwd: Path, runs: int, warmup: int = 2) -> list[float]:
    times = []
    for i in range(warmup + runs):
        start = perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, timeout=60, check=False)
        took = perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{shlex.join(cmd)} exited {done.returncode}: {done.stderr.decode()[-1500:]}")
        if i >= warmup:
            times.append(took)
    return times


def hyperfine_times(hyperfine: str, cmd: list[str], cwd: Path, runs: int) -> list[float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run(
            [
                hyperfine,
                "--warmup",
                "2",
                "--runs",
                str(runs),
                "--shell=none",
                "--style",
                "none",
                "--export-json",
                out.name,
                shlex.join(cmd),
            ],
            cwd=cwd,
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"hyperfine failed on {shlex.join(cmd)}: {done.stderr[-1500:]}")
        return [float(t) for t in json.loads(Path(out.name).read_text())["results"][0]["times"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per command (default 20)")
    parser.add_argument(
        "--no-hyperfine", action="store_true", help="use the subprocess loop even if hyperfine is there"
    )
    args = parser.parse_args()
    line_buffered()
    hyperfine = None if args.no_hyperfine else shutil.which("hyperfine")
    how = (
        f"hyperfine ({hyperfine})"
        if hyperfine
        else "subprocess loop + time.perf_counter (hyperfine not installed)"
    )
    print(
        f"start-up benchmark: whole-process wall time, median of {args.runs} runs after 2 warm-ups;"
        f" {how}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )

    def measure(cmd: list[str], cwd: Path) -> list[float]:
        return (
            hyperfine_times(hyperfine, cmd, cwd, args.runs) if hyperfine else loop_times(cmd, cwd, args.runs)
        )

    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        config = copy_example(root)
        cases = [
            ("python -c pass (the floor)", [sys.executable, "-c", "pass"]),
            ("newsletter --help", [NEWSLETTER, "--help"]),
            ("newsletter check (fresh state)", [NEWSLETTER, "--config", str(config), "check"]),
        ]
        for label, cmd in cases:
            rows.append((label, measure(cmd, root)))
        fetched = subprocess.run(
            [NEWSLETTER, "--config", str(config), "fetch"],
            cwd=root,
            env=env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if fetched.returncode != 0:
            sys.exit(f"newsletter fetch failed: {fetched.stderr[-1500:]}")
        check_after = [NEWSLETTER, "--config", str(config), "check"]
        rows.append(("newsletter check (after fetch: renders)", measure(check_after, root)))
        sample = subprocess.run(check_after, cwd=root, env=env(), capture_output=True, text=True, timeout=60)
        print("  check says: " + " | ".join((sample.stdout + sample.stderr).strip().splitlines()))

    floor = statistics.median(rows[0][1])
    print(f"\n  {'command':<42} {'median':>9} {'min':>9} {'max':>9} {'vs floor':>9}")
    for label, times in rows:
        med = statistics.median(times)
        print(
            f"  {label:<42} {med * 1e3:>7.0f}ms {min(times) * 1e3:>7.0f}ms {max(times) * 1e3:>7.0f}ms"
            f" {med / floor:>8.1f}x"
        )


if __name__ == "__main__":
    main()
