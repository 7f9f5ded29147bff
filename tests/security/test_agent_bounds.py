"""What user code can make the agent hold: log floods, pty sizes, files that never end.

Each test feeds the agent something hostile from inside the sandbox (or, for the pty,
a request as the SSH gateway would pass it on) and checks that the agent's memory,
disk and descriptors stay bounded and that it keeps answering.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox._errors import FileError
from jupyter_sandbox.agent import logs as agent_logs
from jupyter_sandbox.agent import protocol
from jupyter_sandbox.agent.protocol import Frame
from tests.conftest import ServiceEnv, wait_for
from tests.security.test_agent_reach import _cmdline, _status, sandbox_tree

MiB = 1 << 20


def agent_pid(service_env: ServiceEnv, sandbox: Sandbox) -> int:
    """The agent's host pid: the Python process among the sandbox's processes."""
    tree = sandbox_tree(service_env, sandbox.id)
    return next(pid for pid in tree if _cmdline(pid).startswith("/usr/bin/python3 "))


@pytest.mark.unprivileged
@pytest.mark.parametrize("shape", ["letters", "nul bytes"])
def test_line_without_newline_keeps_log_bounded(
    sandbox: Sandbox, service_env: ServiceEnv, shape: str
):
    """Attack: a background process writes 32 MiB with no newline (the agent once kept
    it as one entry and grew to 700 MiB); NUL bytes also grow sixfold as JSON."""
    translate = "| tr '\\0' a" if shape == "letters" else ""
    proc = sandbox.spawn(f"head -c {32 * MiB} /dev/zero {translate}")
    assert proc.wait(timeout=120) == 0
    assert sandbox.sh("echo alive", timeout=10).stdout == "alive\n"
    state = service_env.storage / "sandboxes" / sandbox.id / "state"
    sizes = {p.name: p.stat().st_size for p in state.glob("log.jsonl*")}
    assert set(sizes) == {"log.jsonl", "log.jsonl.1"}, sizes  # it did rotate
    assert all(size <= agent_logs.LOG_LIMIT for size in sizes.values()), sizes
    with sandbox.logs() as entries:
        output = [e for e in entries if e.source == f"proc:{proc.pid}" and e.stream == "stdout"]
    assert output and all(len(e.text) <= agent_logs.ENTRY_BYTES for e in output)
    assert sum(len(e.text) for e in output) <= agent_logs.RING_BYTES  # not the whole flood
    peak = int(_status(agent_pid(service_env, sandbox))["VmHWM"].split()[0]) * 1024
    assert peak < 150 * MiB, f"the agent's memory peaked at {peak / MiB:.0f} MiB"


def agent_request(socket_path: str, op: str, **args: object) -> list[tuple[int, bytes]]:
    """Send one request straight to an agent; every frame it answers until it closes."""
    frames = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(socket_path)
        sock.sendall(protocol.request_line(op, **args))
        reader = sock.makefile("rb")
        while header := reader.read(protocol.HEADER.size):
            kind, size = protocol.HEADER.unpack(header)
            frames.append((kind, reader.read(size)))
            if kind in (Frame.EXIT, Frame.ERROR):
                break
    return frames


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(os.geteuid() != 0, reason="reads a non-dumpable agent's /proc/PID/fd")
def test_oversized_pty_is_refused_without_descriptor_leak(
    sandbox: Sandbox, service_env: ServiceEnv
):
    """Attack: a pty of 100000 rows (it used to leak the pty's two descriptors each time)."""
    socket_path = str(service_env.storage / "sandboxes" / sandbox.id / protocol.AGENT_SOCKET)
    pid = agent_pid(service_env, sandbox)
    before = fd_count(pid)
    good = agent_request(socket_path, "exec", argv=["stty", "size"], pty={"rows": 50, "cols": 80})
    assert (Frame.STDOUT, b"50 80\r\n") in good
    for size in ({"rows": 100000, "cols": 80}, {"rows": 24, "cols": -1}, {"rows": "x"}):
        frames = agent_request(socket_path, "exec", argv=["true"], pty=size)
        kind, payload = frames[-1]
        assert kind == Frame.ERROR and json.loads(payload)["type"] == "BadRequest", frames
        assert "pty rows and cols" in json.loads(payload)["message"]
    wait_for(lambda: fd_count(pid) == before, 5, message=f"the agent back at {before} fds")
    assert sandbox.sh("echo alive", timeout=10).stdout == "alive\n"


@pytest.mark.unprivileged
@pytest.mark.parametrize("setup,path", [("mkfifo fifo", "fifo"), ("true", "/dev/zero")])
def test_reading_a_fifo_or_device_fails_at_once(sandbox: Sandbox, setup: str, path: str):
    """Attack: a FIFO (nobody ever writes) or an endless device offered as a file to read."""
    sandbox.sh(setup)
    start = time.monotonic()
    with pytest.raises(FileError, match="not a regular file"):
        sandbox.fs.read_bytes(path)
    assert time.monotonic() - start < 5
    assert sandbox.sh("echo alive", timeout=10).stdout == "alive\n"
