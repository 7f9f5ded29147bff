"""Attacks on the newest service parts: the supervisor and its restart window, ..."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from jupyter_sandbox._config import Paths
from jupyter_sandbox.client._service import is_supervised
from jupyter_sandbox.ssh.gateway import SERVER_VERSION
from tests.conftest import ROOT, wait_for

# Binds the port given as argv[1] as soon as it can, until stdin closes; says "GOT" if so.
GRABBER = """
import socket, sys, threading
port = int(sys.argv[1]); stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("trying", flush=True)
while not stop.is_set():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); s.listen(1); print("GOT", flush=True); break
    except OSError:
        s.close()
stop.wait()
"""


def _runtime(env: dict[str, str]) -> dict:
    try:
        return json.loads((Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json").read_text())
    except (OSError, ValueError):
        return {}


def serve(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`jupyter-sandbox serve ARGS` (its supervisor, which starts the service), quiet."""
    return subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def grab_then_kill(port: int, service_pid: int) -> subprocess.Popen:
    """Another user's program that binds `port` the moment it is free, then the service
    SIGKILLed under it; the program prints nothing unless it got the port."""
    grabber = subprocess.Popen(
        ["/usr/bin/python3", "-c", GRABBER, str(port)],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_as_nobody,
    )
    try:
        assert grabber.stdout.readline() == "trying\n"
        os.kill(service_pid, signal.SIGKILL)
        wait_for(lambda: not _alive(service_pid), 10, 0.01, "the killed service to be gone")
    except BaseException:
        grabber.kill()
        grabber.wait()
        raise
    return grabber


def _as_nobody() -> None:
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_another_user_cannot_take_the_ssh_port_while_the_service_restarts(
    separate_service_env: dict[str, str],
) -> None:
    env = {**separate_service_env, "PYTHONPATH": str(ROOT)}
    supervisor = serve(env)
    grabber = None
    try:
        first = wait_for(lambda: _runtime(env).get("ssh_port") and _runtime(env), 60, 0.1)
        port = first["ssh_port"]
        grabber = grab_then_kill(port, first["pid"])
        # A login made while no service runs waits for the next one, and reaches it.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            banner = conn.makefile("rb").readline()
        assert banner.decode().strip() == f"SSH-2.0-{SERVER_VERSION}"
        second = wait_for(lambda: _runtime(env).get("pid") not in (None, first["pid"]), 60, 0.1)
        assert second and _runtime(env)["ssh_port"] == port
        grabber.stdin.close()
        assert grabber.stdout.read() == "", "another user took the SSH port"
    finally:
        if grabber is not None:
            grabber.kill()
            grabber.wait()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0


def test_serve_beside_a_service_whose_supervisor_was_killed_leaves_it_alone(
    separate_service_env: dict[str, str],
) -> None:
    env = {**separate_service_env, "PYTHONPATH": str(ROOT)}
    supervisor = serve(env)
    first = wait_for(lambda: _runtime(env).get("ssh_port") and _runtime(env), 60, 0.1)
    try:
        supervisor.kill()
        supervisor.wait()
        second = subprocess.run(
            [sys.executable, "-m", "jupyter_sandbox", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 3, second.stderr
        assert "already running" in second.stderr
        assert "taken by another process" not in second.stderr
        assert _runtime(env) == first
        with socket.create_connection(("127.0.0.1", first["ssh_port"]), timeout=10) as conn:
            assert conn.makefile("rb").readline().startswith(b"SSH-2.0-jupyter-sandbox")
    finally:
        os.kill(first["pid"], signal.SIGTERM)
        wait_for(lambda: not _alive(first["pid"]), 60, 0.1, "the service to stop")


def test_the_tcp_api_keeps_its_port_and_token_while_the_service_restarts(
    separate_service_env: dict[str, str],
) -> None:
    env = {**separate_service_env, "PYTHONPATH": str(ROOT)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    supervisor = serve(env, "--tcp", f"127.0.0.1:{api_port}")
    grabber = None
    try:
        first = wait_for(lambda: _runtime(env).get("token") and _runtime(env), 60, 0.1)
        grabber = grab_then_kill(api_port, first["pid"])
        # A client holding the token it was given keeps working, through the same port.
        answer = httpx.get(
            f"http://127.0.0.1:{api_port}/v1/status",
            headers={"Authorization": f"Bearer {first['token']}"},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["pid"] != first["pid"]
        assert _runtime(env)["url"] == first["url"]
        grabber.stdin.close()
        assert grabber.stdout.read() == "", "another user took the API port"
    finally:
        if grabber is not None:
            grabber.kill()
            grabber.wait()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_users_process_at_a_stale_supervisor_pid_is_no_supervisor(
    tmp_path: Path,
) -> None:
    paths = Paths(tmp_path / "rt", tmp_path / "data", tmp_path / "storage")
    paths.runtime_dir.mkdir()
    # Looks like a supervisor in `ps`, as the console script would: anyone may run one.
    bin_dir = Path(tempfile.mkdtemp())
    bin_dir.chmod(0o755)
    (bin_dir / "jupyter-sandbox").write_text("import sys\nsys.stdin.read()\n")
    argv = ["/usr/bin/python3", str(bin_dir / "jupyter-sandbox"), "serve"]
    theirs = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd="/", preexec_fn=_as_nobody)
    mine = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        for proc in (theirs, mine):  # Popen returns before exec has set up the argv
            cmdline = Path(f"/proc/{proc.pid}/cmdline")
            wait_for(cmdline.read_bytes, 10, 0.01, "the exec")
        paths.supervisor_file.write_text(str(theirs.pid))
        assert not is_supervised(paths)  # a client starts a service instead of waiting
        paths.supervisor_file.write_text(str(mine.pid))
        assert is_supervised(paths)
    finally:
        for proc in (theirs, mine):
            proc.stdin.close()
            proc.wait()
        shutil.rmtree(bin_dir)
