"""An unexpected end never deletes files: the sandbox fails, visibly, and keeps its home.

Each test ends a real sandbox the way it happens on a real host: the agent SIGKILLed
from the host, the sandbox's init SIGKILLed, the agent killed while a background
process of the user's still runs, the agent out of memory, the processes gone while
no service ran. After each: list() and info() say "failed" with the reason in words,
every file written before is intact and downloadable, commands and SSH logins are
refused with SandboxFailed (which names the reason), restart() gives a working
sandbox with the same files, and kill() removes everything (the leak checks of
conftest.py then look for any process, mount, cgroup or directory left).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import InvalidRequest, Sandbox, SandboxExists, SandboxExpired, SandboxFailed
from jupyter_sandbox.backends.cgroups import AGENT, Controller
from jupyter_sandbox.backends.storage import RECORD
from tests.conftest import UNPINNED_SSH, ServiceEnv, sandbox_pids, wait_for

FAIL_WITHIN = 10.0  # seconds: the reaper looks every few seconds


@pytest.fixture
def sandbox(service_env: ServiceEnv, tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox with files of every kind in its home, killed after the test."""
    sb = Sandbox.create(timeout="10m")
    try:
        sb.fs.write_text("notes.txt", "written through the API\n")
        sb.fs.write_bytes("data/blob.bin", bytes(range(256)) * 4096)
        sb.sh("mkdir -p made/deep && echo from a command > made/deep/out.txt")
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "up.txt").write_text("uploaded\n")
        sb.fs.upload(tmp_path / "tree", "tree")  # straight to the agent's socket, where it can
        yield sb
    finally:
        sb.kill()


def written_files(sb: Sandbox) -> dict[str, bytes]:
    """What the `sandbox` fixture wrote, as read back now."""
    return {
        path: sb.fs.read_bytes(path)
        for path in ("notes.txt", "data/blob.bin", "made/deep/out.txt", "tree/up.txt")
    }


EXPECTED = {
    "notes.txt": b"written through the API\n",
    "data/blob.bin": bytes(range(256)) * 4096,
    "made/deep/out.txt": b"from a command\n",
    "tree/up.txt": b"uploaded\n",
}


def assert_failed(env: ServiceEnv, sb: Sandbox, reason: str, tmp_path: Path) -> None:
    """Failed with `reason`, files intact and downloadable, commands refused, no process."""
    wait_for(lambda: sb.info().status == "failed", FAIL_WITHIN, message="the sandbox to fail")
    (tmp_path / "late.txt").write_text("uploaded after the failure\n")
    sb.fs.upload(tmp_path / "late.txt", "late.txt")  # the first file operation since
    assert sb.fs.read_text("late.txt") == "uploaded after the failure\n"
    sb.fs.remove("late.txt")
    info = sb.info()
    assert reason in info.failure, info.failure
    assert info.failed_at is not None
    listed = {s.id: s for s in Sandbox.list()}[sb.id]
    assert (listed.status, listed.failure) == ("failed", info.failure)
    with pytest.raises(SandboxFailed) as refused:
        sb.sh("true")
    assert reason in str(refused.value) and "restart" in str(refused.value)
    with pytest.raises(SandboxFailed):
        sb.spawn("sleep 1")
    with pytest.raises(SandboxFailed):
        sb.expose_ssh()
    assert written_files(sb) == EXPECTED
    assert sorted(f.name for f in sb.fs.list("made")) == ["deep"]
    sb.fs.download(".", tmp_path / "home")
    for path, content in EXPECTED.items():
        assert (tmp_path / "home" / path).read_bytes() == content
    # What serves the files is an agent started for files only.
    agent = sandbox_pids(env.storage, sb.id)["agent"]
    assert b"files-only" in Path(f"/proc/{agent}/cmdline").read_bytes()


def assert_restarts(sb: Sandbox) -> None:
    """restart() gives a working sandbox with the same files; a second one is refused."""
    info = sb.restart()
    assert (info.status, info.failure, info.failed_at) == ("running", None, None)
    assert sb.sh("cat made/deep/out.txt").stdout == "from a command\n"
    assert written_files(sb) == EXPECTED
    with pytest.raises(InvalidRequest, match="only a failed sandbox"):
        sb.restart()


def assert_killed_clean(env: ServiceEnv, sb: Sandbox) -> None:
    directory = env.storage / "sandboxes" / sb.id
    sb.kill()
    assert not directory.exists()
    with pytest.raises(SandboxExpired, match="killed"):
        sb.info()


@pytest.mark.unprivileged
def test_agent_sigkilled_from_the_host(service_env: ServiceEnv, sandbox: Sandbox, tmp_path):
    """The host SIGKILLs the agent: the sandbox fails as "killed by signal 9 (SIGKILL)"."""
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["agent"], signal.SIGKILL)
    assert_failed(service_env, sandbox, "its agent was killed by signal 9 (SIGKILL)", tmp_path)
    with pytest.raises(SandboxExists, match="failed and is kept: restart or kill it first"):
        Sandbox.create(name=sandbox.name, timeout="1m")  # its name stays taken
    assert_restarts(sandbox)
    assert_killed_clean(service_env, sandbox)


@pytest.mark.unprivileged
def test_init_sigkilled_from_the_host(service_env: ServiceEnv, sandbox: Sandbox, tmp_path):
    """The host SIGKILLs bwrap's init (pid 1 of the sandbox): every process in it ends."""
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["init"], signal.SIGKILL)
    reason = "its init process was killed by signal 9 (SIGKILL)"
    assert_failed(service_env, sandbox, reason, tmp_path)
    listed = service_env.run_cli("list").stdout
    assert "failed" in listed and reason in listed
    assert f"failed: {reason}" in service_env.run_cli("info", sandbox.id).stdout
    listed_json = json.loads(service_env.run_cli("list", "--json").stdout)
    assert {s["id"]: s["failure"] for s in listed_json}[sandbox.id] == sandbox.info().failure
    assert "running again" in service_env.run_cli("restart", sandbox.id).stdout
    assert sandbox.info().status == "running"
    refused = service_env.run_cli("restart", sandbox.id, check=False)
    assert refused.returncode != 0 and "only a failed sandbox" in refused.stderr
    sandbox.sh("true")
    assert_killed_clean(service_env, sandbox)


@pytest.mark.unprivileged
def test_agent_killed_while_a_background_process_runs(
    service_env: ServiceEnv, sandbox: Sandbox, tmp_path
):
    """Background processes keep bwrap's init alive once the agent is gone; the sandbox
    must still fail at once (not stay "running" while every call fails), and those
    processes must be stopped."""
    sandbox.spawn("while true; do date >> ticks.log; sleep 0.2; done")
    sandbox.spawn("sleep 1000")
    wait_for(lambda: sandbox.fs.exists("ticks.log"), message="the background process")
    before = sandbox_pids(service_env.storage, sandbox.id)
    os.kill(before["agent"], signal.SIGKILL)
    wait_for(lambda: not _alive(before["agent"]), message="the agent to end")
    with pytest.raises(SandboxFailed, match="killed by signal 9"):
        sandbox.sh("true")  # the first call after the kill already knows
    assert_failed(service_env, sandbox, "its agent was killed by signal 9 (SIGKILL)", tmp_path)
    assert not _alive(before["init"])  # with the user's processes under it
    size = len(sandbox.fs.read_bytes("ticks.log"))
    assert size > 0 and len(sandbox.fs.read_bytes("ticks.log")) == size  # nothing writes
    assert_restarts(sandbox)
    assert_killed_clean(service_env, sandbox)


@pytest.mark.unprivileged
def test_processes_gone_while_no_service_ran(service_env: ServiceEnv, sandbox: Sandbox, tmp_path):
    """The service stops, the sandbox's processes end (as at a host restart), a service
    starts again: the sandbox is failed with that reason, not deleted as lost."""
    init = sandbox_pids(service_env.storage, sandbox.id)["init"]
    service_env.stop_service()
    os.kill(init, signal.SIGKILL)
    wait_for(lambda: not _alive(init), message="the sandbox's init to end")
    assert_failed(service_env, sandbox, "its processes ended while no service ran", tmp_path)
    assert_restarts(sandbox)
    assert_killed_clean(service_env, sandbox)


@pytest.mark.unprivileged
def test_failed_sandbox_ends_at_its_deadline(service_env: ServiceEnv, sandbox: Sandbox):
    """Failed keeps the files until the deadline, not forever: then the sandbox ends."""
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["agent"], signal.SIGKILL)
    wait_for(lambda: sandbox.info().status == "failed", FAIL_WITHIN, message="failure")
    assert sandbox.fs.read_text("notes.txt") == "written through the API\n"
    sandbox.extend_timeout(1)
    wait_for(lambda: _ended(sandbox), 15, message="the deadline to end it")
    with pytest.raises(SandboxExpired, match="expired"):
        sandbox.info()
    assert not (service_env.storage / "sandboxes" / sandbox.id).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent's own memory group is v1 as root")
def test_agent_out_of_memory(service_env: ServiceEnv, sandbox: Sandbox, tmp_path):
    """The agent runs out of memory and the kernel's OOM killer ends it.

    On cgroup v1 as root the agent has a memory group of its own (``agent``), with
    room beyond anything user code can take. To push the agent itself over, the test
    does what a root operator could: it writes a limit of 16 MiB above the agent's
    current use into that group's ``memory.limit_in_bytes``, then uploads 64 MiB into
    the sandbox's /tmp. The agent writes that tmpfs file, its pages are charged to the
    agent's group and cannot be reclaimed (no swap), so the OOM killer strikes there.
    """
    controller = Controller()
    if controller.version != 1 or controller.unavailable:
        pytest.skip(f"needs cgroup v1 as root: {controller.unavailable or 'v2 here'}")
    group = controller.bases["memory"] / sandbox.id / AGENT
    used = int((group / "memory.usage_in_bytes").read_text())
    limit = (used + (16 << 20)) // (1 << 20) << 20
    (group / "memory.limit_in_bytes").write_text(str(limit))
    with pytest.raises((SandboxFailed, SandboxExpired)):
        sandbox.fs.write_bytes("/tmp/big", bytes(64 << 20))
    assert_failed(service_env, sandbox, f"out of memory: limit {limit >> 20} MiB", tmp_path)
    assert_restarts(sandbox)
    assert_killed_clean(service_env, sandbox)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs ssh: apt-get install openssh-client")
@pytest.mark.unprivileged
def test_ssh_login_to_a_failed_sandbox_is_refused_with_the_reason(
    service_env: ServiceEnv, sandbox: Sandbox
):
    """A token issued before the failure no longer logs in: stderr says why and what to do.
    After restart() the same token logs in again."""
    access = sandbox.expose_ssh()
    # LogLevel INFO (OpenSSH's default) shows the banner; ssh takes an option's first value.
    command = ["ssh", "-o", "LogLevel=INFO", *UNPINNED_SSH, "-p", str(access.port)]
    command += [f"{access.username}@{access.hostname}"]
    assert _ssh(command, "cat notes.txt").stdout == "written through the API\n"
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["agent"], signal.SIGKILL)
    wait_for(lambda: sandbox.info().status == "failed", FAIL_WITHIN, message="failure")
    refused = _ssh(command, "true")
    assert refused.returncode == 255
    assert "failed: its agent was killed by signal 9 (SIGKILL)" in refused.stderr
    assert "restart it with sb.restart()" in refused.stderr
    sandbox.restart()
    assert _ssh(command, "cat notes.txt").stdout == "written through the API\n"


def _ssh(command: list[str], remote: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, remote], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.unprivileged
def test_failed_sandbox_survives_a_killed_service(service_env: ServiceEnv, sandbox: Sandbox):
    """A service SIGKILLed while a failed sandbox's files are served: the next service's
    start-up sweep leaves the directory alone, stops the files-only agent it finds, and
    keeps the sandbox failed with the same reason and files."""
    os.kill(sandbox_pids(service_env.storage, sandbox.id)["agent"], signal.SIGKILL)
    wait_for(lambda: sandbox.info().status == "failed", FAIL_WITHIN, message="failure")
    failure = sandbox.info().failure
    assert written_files(sandbox) == EXPECTED
    files_agent = sandbox_pids(service_env.storage, sandbox.id)  # started by that read
    service_env.stop_service(signal.SIGKILL)
    info = sandbox.info()  # starts a service
    assert (info.status, info.failure) == ("failed", failure)
    assert not _alive(files_agent["init"])
    assert written_files(sandbox) == EXPECTED
    assert_restarts(sandbox)


OWNER = """
import sys, time
from jupyter_sandbox import Sandbox
sb = Sandbox.create()
sb.fs.write_text("notes.txt", "kept while the owner lives\\n")
print(sb.id, flush=True)
time.sleep(600)
"""


@pytest.mark.unprivileged
def test_failed_session_sandbox_ends_when_its_owner_goes(service_env: ServiceEnv):
    """A "session" sandbox that failed keeps its files while its owner renews the lease,
    and ends (files removed) once the owner is gone and the lease lapses."""
    owner = service_env.run_python(OWNER)
    try:
        sandbox_id = owner.stdout.readline().strip()
        sb = Sandbox.connect(sandbox_id)
        os.kill(sandbox_pids(service_env.storage, sandbox_id)["agent"], signal.SIGKILL)
        wait_for(lambda: sb.info().status == "failed", FAIL_WITHIN, message="failure")
        lease_ttl = float(service_env.env["JUPYTER_SANDBOX_LEASE_TTL"])
        wait_for(lambda: time.time() > sb.info().failed_at + 2 * lease_ttl, 3 * lease_ttl + 5)
        assert sb.info().status == "failed"  # two lease periods on: its owner renews it
        assert sb.fs.read_text("notes.txt") == "kept while the owner lives\n"
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: _ended(sb), 3 * lease_ttl + 5, message="the lease to lapse")
    with pytest.raises(SandboxExpired, match="lease"):
        sb.info()
    assert not (service_env.storage / "sandboxes" / sandbox_id).exists()


def _ended(sb: Sandbox) -> bool:
    try:
        sb.info()
    except SandboxExpired:
        return True
    return False


@pytest.mark.unprivileged
def test_host_restart_while_no_service_ran(service_env: ServiceEnv, sandbox: Sandbox, tmp_path):
    """A host restart cannot happen in a test: it is stood in for by what one leaves behind,
    a sandbox whose processes are gone and whose record names another boot of the host
    (the boot id in its record is rewritten while no service runs)."""
    init = sandbox_pids(service_env.storage, sandbox.id)["init"]
    service_env.stop_service()
    os.kill(init, signal.SIGKILL)
    wait_for(lambda: not _alive(init), message="the sandbox's init to end")
    record_file = service_env.storage / "sandboxes" / sandbox.id / RECORD
    saved = json.loads(record_file.read_text())
    runtime = json.loads(saved["record"]["runtime"])
    saved["record"]["runtime"] = json.dumps({**runtime, "boot_id": "an-earlier-boot"})
    record_file.write_text(json.dumps(saved))
    reason = "the host restarted while no service ran, which ended its processes"
    assert_failed(service_env, sandbox, reason, tmp_path)
    assert_restarts(sandbox)
    assert_killed_clean(service_env, sandbox)
