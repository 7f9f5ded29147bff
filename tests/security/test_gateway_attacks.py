"""Attacks on the SSH gateway's recordings, workers and audit lines, each tried for real."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from pathlib import Path

import asyncssh
import pytest

from jupyter_sandbox.agent.remote import AgentClient
from jupyter_sandbox.ssh import Target, generate_token, hash_token, recording
from jupyter_sandbox.ssh.control import Channel
from jupyter_sandbox.ssh.recording import Recording
from jupyter_sandbox.ssh.workers import SharedLoads, target_message


def _disk_taken(directory: Path) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in os.scandir(directory))


@pytest.mark.unprivileged
def test_many_tiny_recordings_cannot_fill_the_disk_or_its_inodes(tmp_path: Path) -> None:
    """A token holder who opens pty session after pty session, each ending at once, leaves
    a header-only recording each time (about 200 bytes, but a block and an inode on disk).
    Counting lengths only, 256 MiB of them is over a million files: gigabytes of blocks and
    the host's inodes. The sandbox's recordings must be bounded by what they take."""
    sandbox_dir = tmp_path / "sandbox"
    sandbox_dir.mkdir()
    refused = None
    for _ in range(5000):
        try:
            Recording.start(sandbox_dir, 80, 24, "xterm", "shell").close()
        except OSError as e:
            refused = e
            break
    directory = sandbox_dir / recording.DIRECTORY
    assert refused is not None, f"{len(os.listdir(directory))} recordings started, none refused"
    assert refused.errno == errno.EDQUOT
    assert "recordings" in str(refused)
    files = len(os.listdir(directory))
    assert files <= 1000
    assert _disk_taken(directory) <= recording.SANDBOX_LIMIT
    assert len(recording.list_recordings(sandbox_dir)) == files  # all of them still listed


def _worker_argv(listening: socket.socket, theirs: socket.socket, loads, keys: Path) -> list:
    return [
        sys.executable,
        "-m",
        "jupyter_sandbox.ssh.worker",
        f"--listen-fd={listening.fileno()}",
        f"--control-fd={theirs.fileno()}",
        f"--loads-fd={loads.fd}",
        "--workers=1",
        f"--host-keys={keys}",
        f"--parent={os.getpid()}",
    ]


@pytest.mark.unprivileged
def test_a_login_that_completed_is_not_dropped_by_a_late_start_up_limit(tmp_path: Path) -> None:
    """The service counts logins in progress for every worker and, when MaxStartups bites,
    tells a worker to drop one. A login can complete in the worker while that order is on
    its way (a flood keeps the service busy): the worker must then keep the login, as a
    valid token is never refused by the start-up limits. Here the test is the service end
    of a real worker's channel and sends the order just after the login completed."""
    token = generate_token()
    target = Target("sb-test", AgentClient(str(tmp_path / "no-agent.sock")), {}, hash_token(token))
    listening = socket.create_server(("127.0.0.1", 0))
    loads = SharedLoads.create(1)

    async def scenario() -> str:
        ours, theirs = socket.socketpair()
        worker = await asyncio.create_subprocess_exec(
            *_worker_argv(listening, theirs, loads, tmp_path),
            pass_fds=(listening.fileno(), theirs.fileno(), loads.fd),
        )
        theirs.close()
        channel = await Channel.over(ours)
        ready, logged_in = asyncio.Event(), asyncio.Event()
        logins: list[int] = []

        def handle(message: dict) -> dict | None:
            if message["op"] == "resolve":
                found = message["token_hash"] == target.token_hash
                return {"target": target_message(target) if found else None}
            if message["op"] == "admit":
                logins.append(message["conn"])
            if message["op"] == "remove":
                logged_in.set()
            if message["op"] == "ready":
                ready.set()
            return None

        serving = asyncio.ensure_future(channel.serve(handle))
        try:
            await asyncio.wait_for(ready.wait(), 30)
            port = listening.getsockname()[1]
            async with asyncssh.connect(
                "127.0.0.1", port, username=token, known_hosts=None, client_keys=None
            ) as conn:
                await asyncio.wait_for(logged_in.wait(), 10)
                # the service's order to drop the login, sent before it heard the login ended
                await channel.request({"op": "abort", "conn": logins[0]})
                # a forward the logged-in connection answers (its sandbox's agent is missing)
                with pytest.raises(asyncssh.ChannelOpenError) as refused:
                    await conn.open_connection("127.0.0.1", 1)
                return "dropped" if conn.is_closed() else refused.value.reason
        finally:
            channel.close()
            await serving
            await asyncio.wait_for(worker.wait(), 30)

    try:
        outcome = asyncio.run(scenario())
    finally:
        listening.close()
        loads.close()
    assert outcome != "dropped", "the worker dropped a login that had completed"
