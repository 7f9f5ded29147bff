"""How fast a sandbox whose agent dies is seen failed, serves its files again, restarts.

    python bench/bench_failed.py [--rounds 5]

Starts a private service (its own runtime, data and storage directories, no warm
pool), creates one sandbox with a file in its home, then `--rounds` times: SIGKILLs
the sandbox's agent from the host and measures until `list()` shows it failed (the
reaper alone notices: list() asks nothing of the sandbox), the first file read
afterwards (which starts the files-only agent), and `restart()` with a `sh('true')`
answered. Prints a Markdown table and stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def seconds_until(predicate, timeout: float = 30.0) -> float:
    """Seconds until `predicate()` is true (polled every 10 ms)."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the sandbox was not seen failed")
        time.sleep(0.01)
    return time.perf_counter() - start


def listed_status(sandbox_id: str) -> str:
    from jupyter_sandbox import Sandbox

    return {s.id: s.status for s in Sandbox.list()}[sandbox_id]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from bench_sandbox import private_service
    from conftest import sandbox_pids

    from jupyter_sandbox import Sandbox

    failed, files, restarted, create = [], [], [], []
    with private_service(pool=0) as storage:
        Sandbox.list()  # start the service outside the measurement
        create.append(timed(lambda: Sandbox.create(timeout="10m").kill()))
        sb = Sandbox.create(timeout="10m")
        try:
            sb.fs.write_text("work.txt", "kept\n")
            for _ in range(args.rounds):
                os.kill(sandbox_pids(storage, sb.id)["agent"], signal.SIGKILL)
                failed.append(seconds_until(lambda: listed_status(sb.id) == "failed"))
                files.append(timed(lambda: sb.fs.read_text("work.txt")))
                restarted.append(timed(lambda: (sb.restart(), sb.sh("true"))))
                create.append(timed(lambda: Sandbox.create(timeout="10m").kill()))
        finally:
            sb.kill()

    def row(label: str, values: list[float]) -> str:
        p50, worst = statistics.median(values) * 1000, max(values) * 1000
        return f"| {label} | {p50:.0f} | {worst:.0f} |"

    print(f"{args.rounds} rounds, agent SIGKILLed from the host, on {os.cpu_count()} CPUs\n")
    print("| from | p50 ms | max ms |\n|---|---|---|")
    print(row("the kill to failed in list() (reaper only)", failed))
    print(row("first file read of the failed sandbox (starts its files agent)", files))
    print(row("restart() and sh('true')", restarted))
    print(row("for scale: create() and kill() of a new sandbox, no pool", create))


if __name__ == "__main__":
    main()
