"""Sandbox lifetimes and the service's own: leases, deadlines, restarts, idle exit."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from jupyter_sandbox import Sandbox, SandboxExpired, SandboxNotFound
from tests.conftest import ServiceEnv, wait_for

pytestmark = [pytest.mark.unprivileged, pytest.mark.backends("local", "kubernetes")]

OWNER = """
import sys, time
from jupyter_sandbox import Sandbox
sb = Sandbox.create(timeout=sys.argv[1] if len(sys.argv) > 1 else "session")
print(sb.id, flush=True)
if len(sys.argv) > 2:
    sb.spawn("while true; do date +%s >> ticks; sleep 0.2; done")
    sb.fs.write_text("kept.txt", "still here")
    print("ready", flush=True)
time.sleep(3600)
"""


def start_owner(env: ServiceEnv, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, *args],
        env={**os.environ, **env.env},
        stdout=subprocess.PIPE,
        text=True,
    )
    sandbox_id = proc.stdout.readline().strip()
    assert sandbox_id.startswith("sb-")
    if len(args) > 1:
        assert proc.stdout.readline() == "ready\n"
    return proc, sandbox_id


def live_ids() -> set[str]:
    return {s.id for s in Sandbox.list()}


def test_with_block_kills_session_sandbox(service_env):
    with Sandbox.create() as sb:
        assert sb.id in live_ids()
    assert sb.id not in live_ids()
    with pytest.raises(SandboxExpired, match="killed"):
        Sandbox.connect(sb.id)
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("sb-doesnotexist")


def test_script_exit_kills_its_session_sandbox(service_env):
    done = subprocess.run(
        [sys.executable, "-c", "from jupyter_sandbox import Sandbox; print(Sandbox.create().id)"],
        env={**os.environ, **service_env.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    sandbox_id = done.stdout.strip()
    assert sandbox_id not in live_ids()
    ended = {s.id: s for s in Sandbox.list(include_ended=True)}[sandbox_id]
    assert ended.status == "ended" and ended.end_reason == "killed"


def test_killed_owner_is_reaped_through_the_lease(service_env):
    owner, sandbox_id = start_owner(service_env)
    assert sandbox_id in live_ids()
    owner.kill()
    owner.wait()
    killed_at = time.monotonic()
    wait_for(lambda: sandbox_id not in live_ids(), 20, message="the orphan to be reaped")
    assert time.monotonic() - killed_at <= 15
    info = {s.id: s for s in Sandbox.list(include_ended=True)}[sandbox_id]
    assert "lease" in info.end_reason


def test_duration_sandbox_outlives_its_creator_and_can_be_extended(service_env):
    owner, sandbox_id = start_owner(service_env, "10m")
    owner.kill()
    owner.wait()
    sb = Sandbox.connect(sandbox_id)
    try:
        assert sb.sh("echo reconnected").stdout == "reconnected\n"
        assert 500 < sb.info().time_left <= 600
        info = sb.extend_timeout("1h")
        assert 3500 < info.time_left <= 3600
    finally:
        sb.kill()


def test_expiry_is_enforced_without_clients(service_env):
    sb = Sandbox.create(timeout="1s")
    wait_for(lambda: sb.id not in live_ids(), 10, message="the sandbox to expire")
    ended = {s.id: s for s in Sandbox.list(include_ended=True)}[sb.id]
    assert ended.end_reason == "expired"


def test_extend_turns_a_session_sandbox_into_a_duration_one(service_env):
    sb = Sandbox.create()
    try:
        sb.extend_timeout("5m")
        assert sb.info().timeout == 300
    finally:
        sb.kill()


def test_service_sigkill_and_restart_readopts_sandboxes(service_env):
    keeper, kept_id = start_owner(service_env, "10m", "work")
    orphan, orphan_id = start_owner(service_env)
    kept = Sandbox.connect(kept_id)
    [ticker] = kept.processes()
    # Kill the owner of the session sandbox and the service, together.
    orphan.kill()
    service_env.stop_service(signal.SIGKILL)
    orphan.wait()
    # Time passes with no service: the orphan's lease lapses meanwhile.
    lapse_at = time.monotonic() + float(service_env.env["JUPYTER_SANDBOX_LEASE_TTL"]) + 0.5
    wait_for(lambda: time.monotonic() > lapse_at, 30, message="the lease to lapse")
    ids = live_ids()  # starts the service again
    assert kept_id in ids and orphan_id not in ids
    ended = {s.id: s for s in Sandbox.list(include_ended=True)}[orphan_id]
    assert "lease" in ended.end_reason
    again = Sandbox.connect(kept_id)
    assert again.fs.read_text("kept.txt") == "still here"
    processes = again.processes()
    assert [p.pid for p in processes] == [ticker.pid] and processes[0].running
    before = again.sh("wc -l < ticks").stdout
    wait_for(
        lambda: again.sh("wc -l < ticks").stdout != before,
        10,
        message="the background process to keep running",
    )
    keeper.kill()
    keeper.wait()
    again.kill()


def test_runtime_file_and_socket_are_private(service_env):
    Sandbox.list()
    runtime = json.loads(service_env.runtime_file.read_text())
    assert stat.S_IMODE(os.stat(runtime["socket"]).st_mode) == 0o600
    assert stat.S_IMODE(service_env.runtime_file.stat().st_mode) == 0o600
    second = service_env.run_cli("serve", check=False, timeout=30)
    assert second.returncode == 3 and "already running" in second.stderr


def test_idle_service_exits_by_itself(tmp_path, separate_service_env):
    env = {**separate_service_env, "JUPYTER_SANDBOX_IDLE_TIMEOUT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.wait(timeout=30) == 0
    assert "idle for" in proc.stderr.read()
    assert not (tmp_path / "rt" / "jupyter-sandbox.json").exists()
