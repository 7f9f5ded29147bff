"""How long a crashed service is away: SIGKILL it, time its way back.

    python bench/bench_restart.py [--rounds 5]

Starts a private supervised service (its own runtime, data and storage
directories) with one sandbox and one SSH credential, then SIGKILLs the service
`--rounds` times, each once it is fully back, and measures from the kill to:
the supervisor's new service listening (its runtime file), a `sh('true')` of
the same client handle answered (the call is made right after the kill), and
`ssh ... true` through the same token and port succeeding. Prints a Markdown
table and stops everything it started.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESTART_DELAY = 0.25  # the supervisor's first backoff; crashes here are far apart


def service_pid(runtime_file: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = json.loads(runtime_file.read_text())["pid"]
        os.kill(pid, 0)
        return pid
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def poll(predicate, timeout: float = 30.0) -> float:
    """Seconds until `predicate()` is true (polled every 5 ms)."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"gave up after {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="jsb-bench-"))
    storage = Path(
        tempfile.mkdtemp(prefix="jsb-bench-", dir="/var/tmp" if os.geteuid() == 0 else None)
    )
    os.chmod(storage, 0o711)
    os.environ.update(
        JUPYTER_RUNTIME_DIR=str(base / "rt"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_SANDBOX_DIR=str(storage),
        JUPYTER_SANDBOX_SSH_PORT="0",
        JUPYTER_SANDBOX_POOL="0",
    )
    from jupyter_sandbox import Sandbox
    from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config

    runtime_file = base / "rt" / "jupyter-sandbox.json"
    supervisor_file = base / "rt" / "jupyter-sandbox-supervisor.pid"
    sb = Sandbox.create(timeout="10m")
    try:
        access = sb.expose_ssh()
        (base / "known_hosts").write_text(access.known_hosts_line + "\n")
        config = base / "ssh_config"
        write_ssh_config(
            config, access.hostname, access.port, access.username, base / "known_hosts"
        )
        ssh = ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
        ok = [*ssh, HOST_ALIAS, "true"]

        def fresh_supervisor() -> None:
            """Stop the supervisor cleanly; the next call starts a new one (no crash
            history, so each kill below meets the first, shortest restart delay)."""
            supervisor = int(supervisor_file.read_text())
            os.kill(supervisor, signal.SIGTERM)
            poll(lambda: not alive(supervisor))
            sb.sh("true")

        def kill_service() -> tuple[int, float]:
            """SIGKILL the service; once it is dead (its sockets closed), its pid and when."""
            old = service_pid(runtime_file)
            os.kill(old, signal.SIGKILL)
            killed = time.perf_counter()
            poll(lambda: not alive(old))
            return old, killed

        listening, answered, ssh_back = [], [], []
        for _ in range(args.rounds):
            old, _ = kill_service()
            listening.append(poll(lambda old=old: service_pid(runtime_file) not in (None, old)))
            fresh_supervisor()
            _, killed = kill_service()
            sb.sh("true")  # made at once: it waits for the service the supervisor restarts
            answered.append(time.perf_counter() - killed)
            fresh_supervisor()
            _, killed = kill_service()
            poll(lambda: subprocess.run(ok, capture_output=True, timeout=30).returncode == 0)
            ssh_back.append(time.perf_counter() - killed)
            fresh_supervisor()
        print(
            f"\n{args.rounds} rounds; the supervisor waits {RESTART_DELAY} s after a first crash\n"
        )
        print("| from SIGKILL of the service to | median | max |")
        print("|---|---|---|")
        for label, values in (
            ("its replacement listening (runtime file)", listening),
            ("`sh('true')` on the same handle answered", answered),
            ("`ssh` with the same token and port logged in", ssh_back),
        ):
            print(f"| {label} | {statistics.median(values):.2f} s | {max(values):.2f} s |")
    finally:
        sb.kill()
        with contextlib.suppress(OSError, ValueError):
            supervisor = int(supervisor_file.read_text())
            os.kill(supervisor, signal.SIGTERM)
            poll(lambda: not alive(supervisor))
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
