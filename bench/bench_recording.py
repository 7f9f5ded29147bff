"""What terminal recording costs: pty output throughput and a keystroke's round trip,
in a sandbox whose terminals are recorded and in one whose are not.

    python bench/bench_recording.py [--mib 30] [--runs 200]

Starts a private service, two sandboxes (``record_terminals`` True and False) and
drives each with the stock ``ssh -tt``: ``yes | head -c MIB`` through the pty (the
recording stops at its 64 MiB bound, which a larger flood passes), and an interactive
shell answering RUNS one-line commands one after another. Prints a Markdown table and
removes everything it started.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import MiB, percentile, private_service

from jupyter_sandbox import Sandbox
from tests.conftest import UNPINNED_SSH


def ssh_argv(sb: Sandbox) -> list[str]:
    access = sb.expose_ssh()
    return ["ssh", "-tt", *UNPINNED_SSH, "-p", str(access.port), f"{access.username}@127.0.0.1"]


def flood(sb: Sandbox, mib: int) -> float:
    """MiB/s of pty output that reached the client."""
    started = time.monotonic()
    done = subprocess.run(
        [*ssh_argv(sb), f"yes | head -c {mib}M"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=600,
    )
    return len(done.stdout) / MiB / (time.monotonic() - started)


def round_trips(sb: Sandbox, runs: int) -> list[float]:
    """Seconds from sending a command line to reading its answer, `runs` times."""
    shell = subprocess.Popen(
        ssh_argv(sb), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert shell.stdin is not None and shell.stdout is not None
    times = []
    try:
        for i in range(runs + 1):
            marker = f"rt{i}x{i * 7}".encode()
            started = time.monotonic()
            shell.stdin.write(b"echo rt%dx$((%d*7))\n" % (i, i))
            shell.stdin.flush()
            seen = b""
            while marker not in seen.replace(b"echo " + marker, b""):
                select.select([shell.stdout], [], [], 30)
                seen += os.read(shell.stdout.fileno(), 65536)
            if i:  # the first waits for the login shell
                times.append(time.monotonic() - started)
    finally:
        shell.kill()
        shell.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=30, help="MiB that `yes` writes")
    parser.add_argument("--runs", type=int, default=200, help="command round trips")
    args = parser.parse_args()
    rows = []
    with private_service(pool=0):
        for recorded in (False, True):
            with Sandbox.create(record_terminals=recorded) as sb:
                rate = flood(sb, args.mib)
                times = round_trips(sb, args.runs)
                size = sum(r.size for r in sb.recordings())
            rows.append((recorded, rate, times, size))
    print("| terminals | pty output | command round trip p50 / p95 | recorded |")
    print("|---|---|---|---|")
    for recorded, rate, times, size in rows:
        p50 = statistics.median(times) * 1000
        p95 = percentile(times, 0.95) * 1000
        print(
            f"| {'recorded' if recorded else 'not recorded'} | {rate:.1f} MiB/s "
            f"| {p50:.1f} / {p95:.1f} ms | {size / MiB:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
