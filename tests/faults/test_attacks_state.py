"""Faults found by attacking the failed state and the state store, each kept fixed here.

* A service SIGKILLed while it restarts a failed sandbox leaves that start running
  with no record naming its pid: the next service must stop it all the same.
* A sandbox whose record file cannot be read, with no database row either, must be
  visible (failed, its files readable, killable), never an invisible running one.
* A lost storage identity file, with the database gone, must not orphan the sandboxes.
* A database that is not the service's (a schema of its own, a directory in its place)
  is kept aside and replaced, as a damaged one is.
* A runtime recorded in another boot never names a live process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox._errors import InvalidRequest, SandboxError, ServiceUnavailable
from jupyter_sandbox.backends.local import LocalBackend, Runtime, _start_time
from tests.conftest import ServiceEnv, _alive, sandbox_pids, sandbox_processes, wait_for


def _directory(env: ServiceEnv, sandbox_id: str) -> Path:
    return env.storage / "sandboxes" / sandbox_id


def _processes_of(env: ServiceEnv, sandbox_id: str) -> list[int]:
    marker = f"/sandboxes/{sandbox_id}/".encode()
    found = []
    for pid in sandbox_processes(env.storage):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _recorded_status(env: ServiceEnv, sandbox_id: str) -> str:
    record = json.loads((_directory(env, sandbox_id) / "record.json").read_text())
    return record["record"]["status"]


def _failed_sandbox(env: ServiceEnv) -> Sandbox:
    """A sandbox with a file in its home whose agent was SIGKILLed: it is failed."""
    sb = Sandbox.create(timeout="10m")
    sb.fs.write_text("work.txt", "written before the fault")
    os.kill(sandbox_pids(env.storage, sb.id)["agent"], signal.SIGKILL)
    wait_for(lambda: sb.info().status == "failed", message="the sandbox to fail")
    return sb


def _new_service(env: ServiceEnv, old_pid: int | None) -> int:
    return wait_for(
        lambda: (pid := env.service_pid()) not in (None, old_pid) and pid,
        30,
        message="the service to come back",
    )


def _stop_service_and_forget_database(env: ServiceEnv) -> None:
    env.stop_service()
    data = Path(env.env["JUPYTER_DATA_DIR"]) / "sandbox"
    for path in data.glob("state.sqlite3*"):
        path.unlink()


def _kill_mid_restart(env: ServiceEnv, sb: Sandbox) -> str | None:
    """Restart `sb`, SIGKILLing the service once the restart's bwrap runs; what the
    sandbox's record said at the kill (None if the service was never killed)."""
    service = env.service_pid()
    assert service is not None
    before = set(_processes_of(env, sb.id))
    caught: list[str] = []

    def kill_when_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if set(_processes_of(env, sb.id)) - before:
                os.kill(service, signal.SIGSTOP)  # held before it can record the start
                caught.append(_recorded_status(env, sb.id))
                os.kill(service, signal.SIGKILL)
                return

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        sb.restart()
    except ServiceUnavailable:
        pass  # the service was killed during the call, as intended
    killer.join()
    if not caught:
        return None
    _new_service(env, service)
    return caught[0]


def test_service_killed_mid_restart_leaves_no_process_behind(service_env: ServiceEnv) -> None:
    sb = _failed_sandbox(service_env)
    for _attempt in range(3):  # the window (bwrap started, record not yet written) is short
        if _kill_mid_restart(service_env, sb) == "failed":
            break
        if sb.info().status == "running":  # the restart won the race: fail it again
            os.kill(sandbox_pids(service_env.storage, sb.id)["agent"], signal.SIGKILL)
            wait_for(lambda: sb.info().status == "failed", message="the sandbox to fail")
    else:
        pytest.fail("the service was never killed between a restart's start and its record")
    sb = Sandbox.connect(sb.id)
    assert sb.info().status == "failed"
    # The start that no record names is stopped by the service that came back.
    assert _processes_of(service_env, sb.id) == []
    assert sb.fs.read_text("work.txt") == "written before the fault"
    assert sb.restart().status == "running"
    assert sb.sh("cat work.txt").stdout == "written before the fault"
    sb.kill()
    assert _processes_of(service_env, sb.id) == []


def test_unreadable_record_without_database_makes_a_failed_sandbox(
    service_env: ServiceEnv,
) -> None:
    sb = Sandbox.create(timeout="10m")
    sb.fs.write_text("work.txt", "written before the fault")
    old = sandbox_pids(service_env.storage, sb.id)
    _stop_service_and_forget_database(service_env)
    (_directory(service_env, sb.id) / "record.json").write_text('{"format": 1, "rec')

    info = next(i for i in Sandbox.list() if i.id == sb.id)
    assert info.status == "failed"
    assert "record does not check out (not JSON;" in info.failure
    kept = list(_directory(service_env, sb.id).glob("record.json.unreadable-*"))
    assert len(kept) == 1 and str(kept[0]) in info.failure
    # What ran of it was stopped: nothing runs unknown to the service.
    assert not [pid for pid in old.values() if _alive(pid)]
    assert Sandbox.connect(sb.id).fs.read_text("work.txt") == "written before the fault"
    Sandbox.connect(sb.id).kill()
    assert not _directory(service_env, sb.id).exists()


def test_lost_storage_identity_and_database_keep_the_sandboxes(service_env: ServiceEnv) -> None:
    sb = Sandbox.create(timeout="10m")
    sb.fs.write_text("work.txt", "written before the fault")
    _stop_service_and_forget_database(service_env)
    (service_env.storage / "storage.json").write_text("")

    assert sb.info().status == "running"
    assert sb.sh("cat work.txt").stdout == "written before the fault"
    assert "took its id back from the manifests" in service_env.log_file.read_text()
    sb.kill()
    assert not _directory(service_env, sb.id).exists()


@pytest.mark.parametrize("foreign", ["schema", "directory"])
def test_a_database_not_the_services_is_kept_aside_and_replaced(
    service_env: ServiceEnv, foreign: str
) -> None:
    sb = Sandbox.create(timeout="10m")
    _stop_service_and_forget_database(service_env)
    database = Path(service_env.env["JUPYTER_DATA_DIR"]) / "sandbox" / "state.sqlite3"
    if foreign == "schema":
        db = sqlite3.connect(database)
        db.execute("CREATE TABLE ssh_tokens (something_else TEXT)")
        db.commit()
        db.close()
    else:
        database.mkdir()

    assert sb.info().status == "running"
    log = service_env.log_file.read_text()
    assert f"kept it as {database}.damaged-" in log
    assert database.is_file()

    def recorded() -> bool:
        db = sqlite3.connect(database)
        try:
            return db.execute("SELECT status FROM sandboxes WHERE id = ?", (sb.id,)).fetchall()
        finally:
            db.close()

    wait_for(recorded, message="the new database to hold the sandbox")
    sb.kill()
    for aside in database.parent.glob("state.sqlite3.damaged-*"):
        if aside.is_dir():
            aside.rmdir()


@pytest.mark.unprivileged
def test_a_runtime_of_another_boot_is_never_alive(tmp_path: Path) -> None:
    me = os.getpid()
    runtime = Runtime(
        pid=me,
        pid_start=_start_time(me) or "",
        directory=str(tmp_path),
        host_uid=os.getuid(),
        cgroups={},
        cgroup_version=0,
        limits_note=None,
        boot_id="another-boot",
    )
    backend = LocalBackend(tmp_path)
    assert not backend.alive(runtime)
    runtime.boot_id = ""
    assert backend.alive(runtime)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs root and chattr")
def test_a_record_that_cannot_be_written_gives_typed_errors(service_env: ServiceEnv) -> None:
    """extend and expose_ssh of a sandbox whose record file cannot be replaced: a typed
    error naming the file and saying what took effect, never a bare HTTP 500."""
    sb = Sandbox.create(timeout="10m")
    record = _directory(service_env, sb.id) / "record.json"
    subprocess.run(["chattr", "+i", str(record)], check=True)
    try:
        with pytest.raises(SandboxError) as extended:
            sb.extend_timeout("1h")
        message = str(extended.value)
        assert "new deadline is in effect" in message and str(record) in message, message
        assert sb.info().expires_at > time.time() + 3000  # as the message says
        with pytest.raises(SandboxError) as exposed:
            sb.expose_ssh()
        assert "no SSH access was given" in str(exposed.value) and str(record) in str(exposed.value)
    finally:
        subprocess.run(["chattr", "-i", str(record)], check=True)
    assert sb.expose_ssh().username
    sb.kill()


@pytest.mark.unprivileged
def test_extending_to_session_says_what_a_deadline_needs(service_env: ServiceEnv) -> None:
    with Sandbox.create(timeout="10m") as sb:
        with pytest.raises(InvalidRequest) as error:
            sb.extend_timeout("session")
        message = str(error.value)
        assert '"session" is not a duration' in message and '"5m"' in message, message


def test_a_failed_sandbox_that_was_killed_is_listed_as_killed(service_env: ServiceEnv) -> None:
    sb = _failed_sandbox(service_env)
    sb.kill()
    [line] = [
        line for line in service_env.run_cli("list", "--all").stdout.splitlines() if sb.id in line
    ]
    assert "ended" in line and "killed (after it failed: its agent was killed" in line, line
