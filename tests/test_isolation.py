"""Isolation probes run from inside sandboxes, limits, and hosts that cannot isolate."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from jupyter_sandbox import CommandTimeout, Sandbox
from tests.conftest import ROOT, ServiceEnv, sandbox_processes

pytestmark = pytest.mark.unprivileged


def test_host_files_are_not_writable(sandbox, service_env: ServiceEnv):
    probe = sandbox.sh(
        "for d in /usr/bin /etc /home /var /tmp /; do "
        "touch $d/probe-$$ 2>/dev/null && echo wrote:$d; done; "
        f"touch {ROOT}/probe 2>/dev/null && echo wrote:repo; "
        f"ls {service_env.storage} 2>/dev/null && echo sees:storage; true"
    ).stdout
    # /usr takes writes into a throwaway overlay; /tmp is the sandbox's own tmpfs.
    assert "wrote:repo" not in probe and "sees:storage" not in probe
    assert not list(Path("/usr/bin").glob("probe-*"))
    assert not (ROOT / "probe").exists()
    other = Sandbox.create()
    try:
        assert other.sh("ls /usr/bin/probe-* 2>/dev/null; true").stdout == ""
    finally:
        other.kill()


def test_another_sandbox_home_is_out_of_reach(service_env: ServiceEnv):
    with Sandbox.create() as a, Sandbox.create() as b:
        a.fs.write_text("secret.txt", "a's secret")
        a_home = service_env.storage / "sandboxes" / a.id / "home"
        found = b.sh(f"cat {a_home}/secret.txt 2>&1; find / -name secret.txt 2>/dev/null; true")
        assert "a's secret" not in found.stdout
        assert b.fs.list(".") == []


def test_host_processes_are_invisible(sandbox):
    # Only the init of the user's pid namespace and the probe itself (the agent is above it).
    names = sandbox.sh("ps -eo comm=").stdout.split()
    assert set(names) <= {"sandbox-init", "sh", "ps"}, names
    assert names.count("sandbox-init") == 1
    result = sandbox.sh(f"kill -0 {os.getpid()} || kill -0 1 && echo own-init", check=False)
    assert "Operation not permitted" in result.stderr or "No such process" in result.stderr


def test_user_and_hostname(sandbox, service_env: ServiceEnv):
    assert sandbox.sh("id -un; id -u; hostname").stdout.split() == ["sandbox", "1000", sandbox.id]
    assert sandbox.sh("cat /etc/passwd").stdout.count("sandbox:x:1000:1000:") == 1
    # Seen from the host, every process of the sandbox runs as an unprivileged uid.
    host_uids = {os.stat(f"/proc/{pid}").st_uid for pid in sandbox_processes(service_env.storage)}
    assert host_uids and 0 not in host_uids if os.geteuid() == 0 else host_uids == {os.getuid()}


@pytest.fixture
def host_listener():
    """A TCP server on the host's loopback that answers one fixed line."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"host-service\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def test_no_network_by_default(sandbox, host_listener):
    probe = (
        f"python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', "
        f'{host_listener}), timeout=3); print(s.recv(100).decode())"'
    )
    result = sandbox.sh(probe, check=False)
    assert result.exit_code != 0 and "host-service" not in result.stdout
    assert sandbox.sh(
        "ls /sys/class/net 2>/dev/null || ip -o link | cut -d: -f2"
    ).stdout.split() in (["lo"], [])


def test_host_network_on_request(service_env, host_listener):
    with Sandbox.create(network="host") as sb:
        out = sb.sh(
            f"python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', "
            f'{host_listener}), timeout=3); print(s.recv(100).decode())"'
        ).stdout
        assert out.strip() == "host-service"


def test_limits_contain_fork_bomb_and_memory_hog(service_env):
    with Sandbox.create(memory="96M", pids=64) as sb:
        info = sb.info()
        if "NOT enforced" in (info.limits_note or ""):
            # No cgroups for this user, and the note says so.
            pytest.skip(f"cgroups unavailable here: {info.limits_note}")
        # The bomb runs until the command's timeout kills its whole process group.
        with pytest.raises(CommandTimeout) as bomb:
            sb.sh("bash -c ':(){ :|:& };:; while :; do :; done' 2>&1", timeout=3)
        assert "Resource temporarily unavailable" in bomb.value.result.stdout
        assert 0 < sb.info().usage["pids"] < 64  # the bomb is gone, the sandbox is not
        hog = sb.sh(
            "python3 -c \"x = bytearray(400 * 1024 * 1024); x[::4096] = b'x' * "
            "(len(x) // 4096); print('survived')\"",
            check=False,
        )
        assert hog.exit_code == 137 and "survived" not in hog.stdout
        assert sb.sh("echo still-here").stdout == "still-here\n"
        usage = sb.info().usage
        assert usage["available"] and usage["memory_bytes"] > 0 and usage["pids"] >= 1


def test_missing_user_namespaces_fail_loudly(tmp_path):
    """In a user namespace whose limit on nested namespaces is 0, nothing may start."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    storage = Path(tempfile.mkdtemp(dir="/var/tmp" if os.geteuid() == 0 else None))
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from jupyter_sandbox.backends.local import LocalBackend, SandboxSpec\n"
        "from jupyter_sandbox import IsolationUnavailable\n"
        f"backend = LocalBackend(Path({str(storage)!r}))\n"
        "asyncio.run(backend.prepare())\n"
        "try:\n"
        "    asyncio.run(backend.start(SandboxSpec('sb-nouserns')))\n"
        "except IsolationUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
        "else:\n"
        "    print('STARTED')\n"
    )
    script = "echo 0 > /proc/sys/user/max_user_namespaces && exec " + sys.executable + ' -c "$0"'
    try:
        result = subprocess.run(
            ["unshare", "--user", "--map-root-user", "sh", "-c", script, code],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    assert "STARTED" not in result.stdout, result
    assert result.stdout.startswith("UNAVAILABLE"), result.stderr
    message = result.stdout.lower()
    assert "user namespaces are needed" in message and "sysctl" in message
