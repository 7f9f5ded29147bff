"""A supervised sandbox service of a test's own, and what tests check around its faults.

The service is started the way a user's first call starts it (detached, under its
supervisor) in an environment of its own; this process's client talks to it. After
the test the whole supervisor tree is stopped, and nothing of any sandbox may be
left: no process, mount, directory or cgroup.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from tests.conftest import _alive, cgroup_dirs, sandbox_mounts, sandbox_processes, wait_for

RESTART_TIMEOUT = 20.0  # generous: the machine is shared; bench/bench_restart.py has numbers


class SupervisedService:
    """Paths, pids and faults of the service a test started."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runtime_dir = Path(env["JUPYTER_RUNTIME_DIR"])
        self.storage = Path(env["JUPYTER_SANDBOX_DIR"])
        self.log_file = Path(env["JUPYTER_DATA_DIR"]) / "sandbox" / "service.log"
        self.ended: set[str] = set()

    def runtime(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.runtime_dir / "jupyter-sandbox.json").read_text())
        return {}

    def service_pid(self) -> int | None:
        pid = self.runtime().get("pid")
        return pid if pid and _alive(pid) else None

    def supervisor_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.runtime_dir / "jupyter-sandbox-supervisor.pid").read_text())
            return pid if _alive(pid) else None
        return None

    def kill_service(self) -> int:
        """SIGKILL the service (not its supervisor); its pid, once it is gone."""
        pid = self.service_pid()
        assert pid is not None, "no service runs"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 10, message=f"service {pid} to die")
        return pid

    def wait_back(self, old_pid: int) -> tuple[int, float]:
        """The pid of the service that replaced `old_pid`, and how long that took.

        Only the runtime file is watched (the service writes it once it listens):
        no client call is made, so nothing but the supervisor can have started it.
        """
        start = time.monotonic()

        def new_pid() -> int | None:
            pid = self.service_pid()
            return pid if pid not in (None, old_pid) else None

        pid = wait_for(new_pid, RESTART_TIMEOUT, message="the supervisor to restart the service")
        return int(pid), time.monotonic() - start

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        """Stop the whole supervisor tree: SIGTERM, then SIGKILL to whatever is left."""
        supervisor, service = self.supervisor_pid(), self.service_pid()
        pids = [p for p in (supervisor, service) if p is not None]
        if supervisor is not None:
            os.kill(supervisor, signal.SIGTERM)
        elif service is not None:
            os.kill(service, signal.SIGTERM)
        try:
            wait_for(lambda: not any(_alive(p) for p in pids), 60, message="the service to stop")
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def assert_nothing_left(self) -> None:
        """After `stop()`: no sandbox process, mount, directory or cgroup remains."""
        processes = sandbox_processes(self.storage)
        mounts = sandbox_mounts(self.storage)
        sandboxes = self.storage / "sandboxes"
        dirs = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else []
        cgroups = [d for d in cgroup_dirs() if Path(d).name in self.ended]
        for pid in processes:  # do not leave them to the next test, whatever happens
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not processes, f"sandbox processes left: {processes}"
        assert not mounts, f"sandbox homes still mounted: {mounts}"
        assert not dirs, f"sandbox directories left: {dirs}"
        assert not cgroups, f"cgroups of ended sandboxes left: {cgroups}"


def supervised_service(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **settings: str
) -> Iterator[SupervisedService]:
    """Point this process's client at a fresh service (started by the first call)."""
    env = {**env, "JUPYTER_SANDBOX_POOL": "0", "JUPYTER_SANDBOX_LEASE_TTL": "4", **settings}
    for name, value in env.items():
        if name.startswith("JUPYTER_") and os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    service = SupervisedService(env)
    try:
        yield service
    finally:
        try:
            if service.service_pid() is not None:
                for info in Sandbox.list(include_ended=True):
                    service.ended.add(info.id)
                    if info.status != "ended":
                        Sandbox.connect(info.id).kill()
        finally:
            service.stop()
        service.assert_nothing_left()
