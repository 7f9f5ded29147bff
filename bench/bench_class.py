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
import collections
import contextlib
import itertools
import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
KERNEL_STARTS = 3  # tries for a kernel that lost a race for its ports


# -- one student ----------------------------------------------------------------------


def student() -> int:
    """A student: a kernel of its own; runs each cell it is sent at the time it names."""
    with tempfile.TemporaryFile() as log:
        try:
            manager, client = _start_kernel(log)
        except Exception as e:
            log.seek(0)
            _say({"ready": False, "error": f"{e!r}; the kernel said: {log.read()[-2000:]!r}"})
            return 1
        try:
            reply = client.execute_interactive("%load_ext jupyter_sandbox", timeout=60)
            _say({"ready": reply["content"]["status"] == "ok", "error": "%load_ext failed"})
            for line in sys.stdin:
                order = json.loads(line)
                if "cell" not in order:
                    break
                _say(_run_cell(client, order["cell"], order["at"]))
        finally:
            manager.shutdown_kernel(now=False)  # as a notebook server does: ends sandboxes
            client.stop_channels()
    return 0


def _start_kernel(log: IO[bytes]) -> tuple:
    """An ipykernel whose output goes to `log`: its warning about TCP without encryption
    would drown the report. Its history stays in memory, as nbgrader has it: thirty
    kernels opening one history database at once is no part of a cell's time.

    jupyter_client picks free ports before the kernel binds them, so kernels started at
    the same moment can pick the same one; the one that loses is started again.
    """
    from jupyter_client.manager import start_new_kernel

    for attempt in itertools.count(1):
        log.seek(0)
        log.truncate()
        try:
            return start_new_kernel(
                kernel_name="python3",
                startup_timeout=READY_TIMEOUT,
                extra_arguments=["--HistoryManager.hist_file=:memory:"],
                stdout=log,
                stderr=log,
            )
        except RuntimeError:
            log.seek(0)
            if attempt == KERNEL_STARTS or b"Address already in use" not in log.read():
                raise


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
        answers = self._answers()
        return [
            f"student {i}: kernel not ready: {m.get('error')}" for i, m in answers if not m["ready"]
        ]

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


# -- system mode ----------------------------------------------------------------------


def system(count: int) -> int:
    from tests.system_fixtures import SHARED_VENV, os_users

    python = SHARED_VENV / "bin" / "python"
    if not python.exists():
        print(f"{python} is missing: the root test run makes it (tests/system_fixtures.py)")
        return 1
    outcome: dict = {"results": {}, "errors": [], "leftovers": [], "pool": "?"}
    try:
        with _signals_end_the_run(), os_users(students=count, instructors=0) as classroom:
            _system_class(classroom.students, python, outcome)
    except AssertionError as e:  # what removing the users left behind
        outcome["leftovers"].append(str(e))
    title = f"{count} students, system mode (one service as root, {count} OS users, pool "
    report(title + f"{outcome['pool']})", outcome["results"])
    return _verdict(outcome["errors"], outcome["leftovers"])


def _system_class(students: list, python: Path, outcome: dict) -> None:
    """The class run by `students` (OS users) against a private ``serve --system``."""
    from tests.system_fixtures import SHARED_VENV, start_system_service, user_env

    pool = os.environ.get("JUPYTER_SANDBOX_POOL", "2")  # as a per-user service has it
    try:
        service = start_system_service(JUPYTER_SANDBOX_POOL=pool)
    except AssertionError as e:
        raise RuntimeError(str(e)) from None
    try:
        os.environ.update({**service.client_env(), "JUPYTER_SANDBOX_MODE": "system"})
        outcome["pool"] = _pool_size()
        commands = [_as_user(u, str(python), __file__, "--student") for u in students]
        env = [user_env(u, service, SHARED_VENV, JUPYTER_SANDBOX_MODE="system") for u in students]
        outcome["results"], outcome["errors"] = run_class(commands, env)
        made = collections.Counter(s.user for s in Sandbox.list(include_ended=True))
        if made != collections.Counter(u.name for u in students):
            outcome["errors"].append(f"sandboxes made per user: {dict(made)}, not one each")
        running = Sandbox.list()
        outcome["leftovers"] += [f"sandbox {s.id} of {s.user} still running" for s in running]
    finally:
        try:
            service.stop()
        except AssertionError as e:
            outcome["leftovers"].append(str(e))


def _as_user(user, *argv: str) -> list[str]:
    """`argv` run as `user` (an OsUser): its uid, gid and groups."""
    return ["setpriv", "--reuid", str(user.uid), "--regid", str(user.gid), "--init-groups", *argv]


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: the users made are removed."""

    def end(signum: int, frame: object) -> None:
        raise SystemExit(f"ended by signal {signum}")

    saved = {sig: signal.signal(sig, end) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


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
    if args.system:
        if os.geteuid() != 0:
            parser.error("--system needs root: it makes OS users and runs serve --system")
        return system(count)
    return per_user(count)


if __name__ == "__main__":
    sys.exit(main())
