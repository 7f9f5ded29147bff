"""Requests while another process holds the state database's write lock.

    python bench/bench_state_lock.py [--seconds 10]

Runs a private sandbox service with two sandboxes: one to run ``sh("true")`` in, and
a "session" one whose lease this process renews all along. Another connection then
holds ``BEGIN EXCLUSIVE`` on the service's ``state.sqlite3`` for ``--seconds``, and
``sh("true")`` is called every 50 ms meanwhile. Prints the worst and median latency
and how many calls went through; the target is every call within 1 s (the database
waits belong to a background writer, never to a request).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import time
from pathlib import Path

from bench_sandbox import private_service

from jupyter_sandbox import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with private_service(pool=0):
        target = Sandbox.create(timeout="10m")
        owned = Sandbox.create()  # its lease is renewed in the background meanwhile
        database = Path(os.environ["JUPYTER_DATA_DIR"]) / "sandbox" / "state.sqlite3"
        lock = sqlite3.connect(database, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        latencies = []
        try:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                target.sh("true")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)
        finally:
            lock.execute("COMMIT")
            lock.close()
        print(
            f"sh('true') under a {args.seconds:.0f} s lock: {len(latencies)} calls, "
            f"median {statistics.median(latencies) * 1000:.1f} ms, "
            f"worst {max(latencies) * 1000:.1f} ms (target: under 1000 ms); "
            f"the session sandbox is {owned.info().status}"
        )
        owned.kill()
        target.kill()


if __name__ == "__main__":
    main()
