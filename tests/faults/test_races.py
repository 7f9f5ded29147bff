"""Races and bursts: commands that leave their input unread, concurrent SSH, a class logging in.

Real service, real sandboxes, stock OpenSSH clients. Each test runs its operations
at once and expects every one to succeed with the right result.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jupyter_sandbox import AsyncSandbox, Sandbox
from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config
from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.client._async import shared_transport
from jupyter_sandbox.client._sync import portal
from jupyter_sandbox.client._transport import read_frames

pytestmark = pytest.mark.unprivileged

KiB, MiB = 1 << 10, 1 << 20
# Around the sizes where a pipe (64 KiB) or a socket buffer fills, and well past them.
INPUT_SIZES = [0, 1, 64 * KiB - 1, 64 * KiB + 1, 300 * KiB, 3 * MiB]
# What a command may do with its input, and what it prints then.
READERS = {
    "exits at once": ("true", lambda size: ""),
    "never reads": ("echo ran", lambda size: "ran\n"),
    "reads a little": ("head -c 10 | wc -c", lambda size: f"{min(size, 10)}\n"),
    "closes its stdin": ("exec 0<&-; sleep 0.05; echo closed", lambda size: "closed\n"),
    "reads it all": ("wc -c", lambda size: f"{size}\n"),
}
SSH_AT_ONCE = 50
CLASS_SIZE = 150


def pattern(size: int) -> bytes:
    return bytes(itertools.islice(itertools.cycle(b"0123456789abcdef\n"), size))


def test_commands_that_leave_their_input_unread_succeed(sandbox: Sandbox) -> None:
    """Every command gets its input, whatever it does with it, 300 calls at once."""
    cases = [
        (name, size) for _ in range(2) for name in READERS for size in INPUT_SIZES for _ in range(5)
    ]

    def run(case: tuple[str, int]) -> tuple[str, int, str]:
        name, size = case
        result = sandbox.sh(READERS[name][0], input=pattern(size), timeout=60)
        return name, size, result.stdout

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, cases))
    assert len(results) == len(cases) == 300
    wrong = [(n, s, out) for n, s, out in results if out.lstrip() != READERS[n][1](s)]
    assert not wrong, f"{len(wrong)} of {len(cases)} commands printed the wrong thing: {wrong[:5]}"


def test_an_exit_status_survives_unread_input(sandbox: Sandbox) -> None:
    result = sandbox.sh("head -c 1 >/dev/null; exit 3", input=pattern(2 * MiB), check=False)
    assert result.exit_code == 3


def test_a_filter_passes_input_larger_than_any_buffer_back(sandbox: Sandbox) -> None:
    """A command writing as it reads, with input the client sends before it reads."""
    data = pattern(40 * MiB)
    assert sandbox.sh("cat", input=data, timeout=120).stdout == data.decode()


def test_base64_input_in_a_json_body_is_taken_too(sandbox: Sandbox) -> None:
    """The plain JSON form of exec (input_b64), with commands that never read it."""

    async def run(cmd: str) -> tuple[bytes, int]:
        body = {"cmd": cmd, "input_b64": base64.b64encode(pattern(500 * KiB)).decode()}
        output, exit_code = b"", None
        async with shared_transport().stream(
            "POST", f"/v1/sandboxes/{sandbox.id}/exec", json=body
        ) as response:
            async for kind, payload in read_frames(response):
                if kind == Frame.STDOUT:
                    output += payload
                elif kind == Frame.EXIT:
                    exit_code = json.loads(payload)["exit_code"]
        return output, exit_code

    async def all_at_once() -> list[tuple[bytes, int]]:
        return await asyncio.gather(*(run(cmd) for cmd in ["true", "echo ok"] * 25))

    results = portal().call(all_at_once())
    assert results == [(b"", 0), (b"ok\n", 0)] * 25


@pytest.fixture
def ssh_config(sandbox: Sandbox, tmp_path: Path) -> Iterator[Path]:
    """A private config for `ssh -F config sandbox` into `sandbox`, its host key pinned."""
    access = sandbox.expose_ssh()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(access.known_hosts_line + "\n")
    config = tmp_path / "config"
    write_ssh_config(config, access.hostname, access.port, access.username, known_hosts)
    yield config


def start_ssh(config: Path, command: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", HOST_ALIAS, command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, bytes, bytes]]:
    return [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in procs]


def test_fifty_ssh_commands_at_once_with_stdin_at_eof(ssh_config: Path) -> None:
    for _ in range(3):
        procs = [start_ssh(ssh_config, f"echo hi {i}") for i in range(SSH_AT_ONCE)]
        results = finish(procs)
        expected = [(0, f"hi {i}\n".encode(), b"") for i in range(SSH_AT_ONCE)]
        failed = [(r, e) for r, e in zip(results, expected) if r != e]
        assert not failed, f"{len(failed)} of {SSH_AT_ONCE} ssh commands failed: {failed[:3]}"


def test_a_class_logging_in_at_the_same_instant_all_gets_in(ssh_config: Path, service_env) -> None:
    log_before = service_env.log_file.read_text()
    procs = [start_ssh(ssh_config, "true") for _ in range(CLASS_SIZE)]
    results = finish(procs)
    failed = [r for r in results if r != (0, b"", b"")]
    assert not failed, f"{len(failed)} of {CLASS_SIZE} logins failed: {failed[:3]}"
    new_lines = service_env.log_file.read_text()[len(log_before) :]
    assert "start-up limit" not in new_lines


def test_a_slow_reader_gets_all_output_of_a_command_that_exited(sandbox: Sandbox) -> None:
    """The command is long gone while most of its output still waits for the reader."""
    size, width = 5 * MiB, 1023

    async def read_slowly() -> tuple[int, int]:
        handle = await AsyncSandbox.connect(sandbox.id)
        lines = received = 0
        command = f"head -c {size} /dev/zero | tr '\\0' x | fold -w {width}"
        async for line in handle.stream(command, timeout=120):
            lines, received = lines + 1, received + len(line.text)
            if lines % 256 == 0:
                await asyncio.sleep(0.2)  # a reader busy with something else
        return lines, received

    lines, received = portal().call(read_slowly())
    assert lines == -(-size // width)
    assert received == size + lines - 1  # every line but the last ends with a newline


BUSY_OWNER = """
import json
from concurrent.futures import ThreadPoolExecutor
from jupyter_sandbox import Sandbox

with Sandbox.create() as sandbox:
    with ThreadPoolExecutor(300) as pool:
        outputs = list(pool.map(lambda i: sandbox.sh(f"sleep 4; echo {i}").stdout, range(300)))
    print(json.dumps({"outputs": outputs, "status": sandbox.info().status}))
"""


def test_a_session_sandbox_outlives_a_busy_owner(separate_service_env: dict[str, str]) -> None:
    """Its owner keeps every connection to the service busy for longer than the lease
    (the default 10 s): the renewals still get through, and the sandbox stays."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_LEASE_TTL": "10", "JUPYTER_SANDBOX_POOL": "0"}
    service = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        owner = subprocess.run(
            [sys.executable, "-c", BUSY_OWNER], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        service.terminate()
        service.wait(30)
    assert owner.returncode == 0, owner.stderr[-2000:]
    result = json.loads(owner.stdout)
    assert result == {"outputs": [f"{i}\n" for i in range(300)], "status": "running"}
    storage = Path(env["JUPYTER_SANDBOX_DIR"]) / "sandboxes"
    assert not storage.exists() or not list(storage.iterdir())
