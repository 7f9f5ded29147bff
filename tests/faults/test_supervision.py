"""The supervisor keeps the service up: a crash is repaired with no client call.

Real services (started detached by the client, as a user's first call does), real
sandboxes, real `ssh`. Each test kills or signals real processes and checks what
a user would: the service is back by itself, sandboxes and files are still there,
deadlines that passed meanwhile are enforced, and nothing is left behind.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from tests.conftest import _alive, sandbox_processes, wait_for
from tests.faults._supervised import SupervisedService, supervised_service

pytestmark = pytest.mark.unprivileged


@pytest.fixture
def service(separate_service_env, monkeypatch) -> Iterator[SupervisedService]:
    yield from supervised_service(separate_service_env, monkeypatch)


def ticking(service: SupervisedService) -> Sandbox:
    """A 10-minute sandbox with a file and a background process that keeps writing."""
    sb = Sandbox.create(timeout="10m")
    sb.fs.write_text("kept.txt", "still here")
    sb.spawn("while true; do echo tick >> ticks; sleep 0.1; done")
    return sb


def ticks(sb: Sandbox) -> int:
    return int(sb.sh("wc -l < ticks").stdout)


def test_a_killed_service_is_back_by_itself_and_readopts_its_sandboxes(service):
    sb = ticking(service)
    port = service.runtime()["ssh_port"]
    supervisor = service.supervisor_pid()
    assert supervisor is not None

    old = service.kill_service()
    service.wait_back(old)

    assert service.supervisor_pid() == supervisor
    assert service.runtime()["ssh_port"] == port
    assert "was killed by SIGKILL; starting it again" in service.log()
    # The same handle goes on working: the sandbox was re-adopted, not restarted.
    assert sb.fs.read_text("kept.txt") == "still here"
    before = ticks(sb)
    wait_for(lambda: ticks(sb) > before, 10, message="the background process to keep writing")
    [process] = sb.processes()
    assert process.running
    assert f"re-adopted sandbox {sb.id}" in service.log().split(f"(pid {old})")[-1]
    sb.kill()


def test_a_deadline_that_passed_while_the_service_was_down_is_enforced_on_its_return(
    service,
):
    """The service is down longer than a sandbox's timeout (its supervisor is held up,
    as in a crash loop's backoff): within seconds of its return the sandbox ends, with
    no client call, and its end says it expired."""
    sb = Sandbox.create(timeout="3s")
    deadline = sb.info().expires_at
    supervisor = service.supervisor_pid()
    os.kill(supervisor, signal.SIGSTOP)
    try:
        old = service.kill_service()
        wait_for(lambda: time.time() > deadline + 1, 10, message="the deadline to pass")
        assert sandbox_processes(service.storage / "sandboxes" / sb.id), "ended while down"
    finally:
        os.kill(supervisor, signal.SIGCONT)
    service.wait_back(old)
    returned = time.monotonic()
    wait_for(
        lambda: not sandbox_processes(service.storage / "sandboxes" / sb.id),
        10,
        message="the expired sandbox to end after the service's return",
    )
    ended_within = time.monotonic() - returned
    assert ended_within < 10
    [info] = [s for s in Sandbox.list(include_ended=True) if s.id == sb.id]
    assert info.status == "ended" and info.end_reason == "expired"


def test_idle_exit_ends_the_supervisor(separate_service_env, tmp_path):
    """The service's own exit 0 (idle, no sandboxes) is not a crash: nothing restarts."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_IDLE_TIMEOUT": "1", "JUPYTER_SANDBOX_POOL": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "idle for" in proc.stderr and "starting it again" not in proc.stderr
    assert "supervisor: the service exited with code 0; stopping" in proc.stderr
    assert not (tmp_path / "rt" / "jupyter-sandbox.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_stops_the_service_cleanly(service, sig):
    """SIGTERM/SIGINT to the supervisor: the service stops cleanly (runtime file gone,
    "service stopped" logged, both exit), sandboxes with a duration keep running and
    are re-adopted by the next start."""
    sb = ticking(service)
    supervisor, pid = service.supervisor_pid(), service.service_pid()
    os.kill(supervisor, sig)
    wait_for(lambda: not _alive(supervisor) and not _alive(pid), 60, message="both to exit")
    assert not (service.runtime_dir / "jupyter-sandbox.json").exists()
    assert "service stopped" in service.log()
    assert "starting it again" not in service.log()
    assert sandbox_processes(service.storage / "sandboxes" / sb.id)
    # The next call starts a new supervised service, which re-adopts the sandbox.
    assert sb.fs.read_text("kept.txt") == "still here"
    assert service.supervisor_pid() not in (None, supervisor)
    sb.kill()


def test_sigkill_of_the_supervisor_leaves_the_service_running(service):
    sb = ticking(service)
    supervisor, pid = service.supervisor_pid(), service.service_pid()
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not _alive(supervisor), 10, message="the supervisor to die")
    assert _alive(pid)
    # A client started afterwards finds that same service; it starts no second one.
    code = "import sys; from jupyter_sandbox import Sandbox; print(Sandbox.connect(sys.argv[1]).id)"
    found = subprocess.run(
        [sys.executable, "-c", code, sb.id],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.stdout.strip() == sb.id, found.stderr
    assert service.service_pid() == pid and service.supervisor_pid() is None
    assert sb.fs.read_text("kept.txt") == "still here"
    sb.kill()


def test_a_crash_loop_ends_with_one_clear_line(service):
    """A service that dies each time it comes up is restarted with growing delays,
    then given up on with a line that says so and what to do; the next call starts it
    again."""
    Sandbox.list()
    supervisor = service.supervisor_pid()
    crashes = 0

    def after(old: int) -> tuple[int | None] | None:
        """(new pid,) once the service is back, (None,) once the supervisor gave up."""
        new = service.service_pid()
        if new not in (None, old):
            return (new,)
        return None if _alive(supervisor) else (None,)

    pid = service.service_pid()
    while pid is not None:
        os.kill(pid, signal.SIGKILL)
        crashes += 1
        [pid] = wait_for(functools.partial(after, pid), 30, message="a restart or the end")
    log = service.log()
    delays = [float(d) for d in re.findall(r"starting it again in ([0-9.]+) s", log)]
    assert delays == sorted(delays) and delays[0] <= 1.0 and len(delays) == crashes - 1
    [line] = [line for line in log.splitlines() if "not restarting it again" in line]
    assert f"crashed {crashes} times" in line and "the next client call" in line
    assert Sandbox.list() == []  # the next call starts it again
    assert service.supervisor_pid() not in (None, supervisor)


def test_the_supervisor_and_service_carry_no_secrets(separate_service_env, tmp_path):
    """A client process with credentials in its environment starts the service: neither
    the supervisor's nor the service's argv or environment carries them."""
    secrets = {
        "JUPYTERHUB_API_TOKEN": "hub-token-0123456789",
        "JUPYTER_SANDBOX_TOKEN": "sandbox-token-0123456789",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-0123456789",
        "DB_PASSWORD": "db-password-0123456789",
    }
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0", **secrets}
    code = "from jupyter_sandbox import Sandbox; Sandbox.list()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    service = SupervisedService(env)
    try:
        pids = [service.supervisor_pid(), service.service_pid()]
        assert None not in pids
        for pid in pids:
            proc = Path(f"/proc/{pid}")
            seen = (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes()
            for name, value in secrets.items():
                assert name.encode() not in seen and value.encode() not in seen
            assert env["JUPYTER_RUNTIME_DIR"].encode() in seen  # its own settings are kept
    finally:
        service.stop()
        service.assert_nothing_left()
