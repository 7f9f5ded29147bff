"""A class of students runs its first cell at the same moment: time to first output.

    python bench/bench_class.py [--students N] [--short] [--system]

Each student is a process of its own with a Jupyter kernel of its own (ipykernel, the
extension loaded), as under JupyterHub. Once every kernel is ready, all students run,
at the same instant, the same cell three ways:

* locally, as they would without sandboxes: ``%%bash`` starting ``python3``;
* in a sandbox: ``%%sandbox``, which creates the student's sandbox on first use;
* in the same sandbox again.

It prints p50/p95/max of the time from that instant to the cell's first output and to
its end. Then the kernels shut down, which must end their sandboxes; the service is
stopped and nothing may be left (no sandbox, sandbox process, mount, cgroup or
directory). The exit status is 1 on any failed cell or leftover.

Per-user mode (the default): a private service of this user; every student is this
user. ``--system`` (root): a private system service (``serve --system``) and one OS
user per student, made with ``useradd`` and removed with ``userdel -r`` on every exit
path but SIGKILL; the students' processes run as those users, with the world-readable
Python of ``/opt/jupyter-sandbox-test/venv`` (``tests/system_fixtures.py`` makes it).
``--short``: 5 students.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load import PrivateService, _percentile  # noqa: E402

from jupyter_sandbox import Sandbox  # noqa: E402

CELLS = {
    "local: %%bash, python3": "%%bash\npython3 -c 'print(\"hello\")'",
    "%%sandbox, creating the sandbox": "%%sandbox\npython3 -c 'print(\"hello\")'",
    "%%sandbox, the same sandbox again": "%%sandbox\npython3 -c 'print(\"hello\")'",
}
START_AHEAD = 1.0  # seconds between sending a cell to every student and its start
READY_TIMEOUT = 600.0  # for every kernel to be up, on a busy machine
CELL_TIMEOUT = 300.0
SHARED_VENV = Path("/opt/jupyter-sandbox-test/venv")


# -- one student ----------------------------------------------------------------------


def student() -> int:
    """A student: a kernel of its own; runs each cell it is sent at the time it names."""
    from jupyter_client.manager import start_new_kernel

    # The kernel's own warnings (TCP without encryption) would drown the report.
    manager, client = start_new_kernel(
        kernel_name="python3", startup_timeout=READY_TIMEOUT, stderr=subprocess.DEVNULL
    )
    try:
        reply = client.execute_interactive("%load_ext jupyter_sandbox", timeout=60)
        _say({"ready": reply["content"]["status"] == "ok"})
        for line in sys.stdin:
            order = json.loads(line)
            if "cell" not in order:
                break
            _say(_run_cell(client, order["cell"], order["at"]))
    finally:
        manager.shutdown_kernel(now=False)  # as a notebook server does: this ends sandboxes
        client.stop_channels()
    return 0


def _run_cell(client, code: str, at: float) -> dict:
    time.sleep(max(0.0, at - time.monotonic()))
    first: list[float] = []
    errors: list[str] = []

    def on_output(msg: dict) -> None:
        if msg["msg_type"] == "stream" and not first:
            first.append(time.monotonic())
        elif msg["msg_type"] == "error":
            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

    reply = client.execute_interactive(code, output_hook=on_output, timeout=CELL_TIMEOUT)
    done = time.monotonic()
    ok = reply["content"]["status"] == "ok" and bool(first)
    return {
        "first": first[0] - at if first else None,
        "done": done - at,
        "error": None if ok else "; ".join(errors) or "no output",
    }


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


# -- the class ------------------------------------------------------------------------


class Students:
    """The students' processes, started at once; every one is told each cell at once."""

    def __init__(self, commands: list[list[str]], env: list[dict[str, str]]) -> None:
        self.procs = [
            subprocess.Popen(
                command,
                env=student_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd="/",
            )
            for command, student_env in zip(commands, env)
        ]

    def ready(self) -> list[str]:
        """Wait for every kernel; the errors of those that did not start."""
        return [f"student {i}: kernel not ready" for i, m in self._answers() if not m["ready"]]

    def run(self, cell: str) -> list[dict]:
        at = time.monotonic() + START_AHEAD
        for proc in self.procs:
            proc.stdin.write(json.dumps({"cell": cell, "at": at}) + "\n")
            proc.stdin.flush()
        return [answer for _, answer in self._answers()]

    def _answers(self) -> Iterator[tuple[int, dict]]:
        for i, proc in enumerate(self.procs):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"student {i} ended (exit status {proc.wait()})")
            yield i, json.loads(line)

    def finish(self) -> None:
        """Shut every kernel down (gracefully, at once), then make sure they went."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        deadline = time.monotonic() + 120
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_class(commands: list[list[str]], env: list[dict[str, str]]) -> tuple[dict, list[str]]:
    """Every cell run by every student at once: timings per cell, and the errors."""
    results: dict[str, list[dict]] = {}
    students = Students(commands, env)
    try:
        errors = students.ready()
        if not errors:
            for name, cell in CELLS.items():
                results[name] = students.run(cell)
                errors += [f"{name}: {r['error']}" for r in results[name] if r["error"]]
                print(f"ran {name!r}", flush=True)
    finally:
        students.finish()
    return results, errors


def report(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n{title}\n")
    print(
        "| cell, all students at once | first output p50 | p95 | max | cell done p50 | p95 | max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, answers in results.items():
        cells = []
        for key in ("first", "done"):
            values = sorted(a[key] for a in answers if a[key] is not None)
            cells += [_ms(_percentile(values, q)) if values else "-" for q in (0.5, 0.95, 1.0)]
        print(f"| {name} | {' | '.join(cells)} |")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- per-user mode --------------------------------------------------------------------


def per_user(count: int) -> int:
    service = PrivateService()  # its directories go into os.environ, for the students too
    os.environ["JUPYTER_SANDBOX_MODE"] = "user"  # never a system service that may run here
    leftovers: list[str] = []
    try:
        Sandbox.list()  # starts the service
        pool = _pool_size()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        commands = [[sys.executable, __file__, "--student"]] * count
        results, errors = run_class(commands, [env] * count)
        service.sandbox_ids |= {s.id for s in Sandbox.list(include_ended=True)}
        leftovers += [f"sandbox {s.id} still running" for s in Sandbox.list()]
        service.stop()
        leftovers += service.leftovers()
    finally:
        with contextlib.suppress(RuntimeError):
            service.stop()
        service.remove()
    user = pwd.getpwuid(os.getuid()).pw_name
    report(f"{count} students, per-user mode (one service of user {user}, pool {pool})", results)
    return _verdict(errors, leftovers)


def _pool_size() -> str:
    from jupyter_sandbox.client._async import shared_transport
    from jupyter_sandbox.client._sync import portal

    async def status() -> dict:
        return await shared_transport().request("GET", "/v1/status")

    return str(len(portal().call(status()).get("pool", [])))


def _verdict(errors: list[str], leftovers: list[str]) -> int:
    print(f"\nfailed cells: {len(errors)}; left after the end: {len(leftovers)}")
    for item in [*errors, *leftovers]:
        print(f"  {item}")
    return 1 if errors or leftovers else 0


# -- main -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=30, help="how many (default 30)")
    parser.add_argument("--short", action="store_true", help="5 students")
    parser.add_argument("--system", action="store_true", help="system mode, one OS user each")
    parser.add_argument("--student", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.student:
        return student()
    count = 5 if args.short else args.students
    if count < 1:
        parser.error("--students must be 1 or more")
    return per_user(count)


if __name__ == "__main__":
    sys.exit(main())
