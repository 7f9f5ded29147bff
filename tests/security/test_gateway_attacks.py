"""Attacks on the SSH gateway's recordings, workers and audit lines, each tried for real."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from jupyter_sandbox.agent.protocol import HEADER, Frame, encode, encode_json
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


class ServiceEnd:
    """The service's end of a real gateway worker's channel, played by the test: it
    answers the worker's requests for one token and records what the worker reports."""

    def __init__(self, directory: Path, agent_socket: Path | None = None) -> None:
        self.token = generate_token()
        # without an agent, forwards and sessions get a clear refusal
        agent = AgentClient(str(agent_socket or directory / "no-agent.sock"))
        self.target = Target("sb-test", agent, {}, hash_token(self.token))
        self.directory = directory
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.logins: list[int] = []  # connection ids, as the worker admitted them
        self.on_resolve: Callable[[dict, Channel], None] | None = None

    async def run(self, client: Callable[[ServiceEnd, Channel], Awaitable[str]]) -> str:
        """Start a worker on the listening socket, run `client`, stop the worker."""
        loads = SharedLoads.create(1)
        ours, theirs = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "jupyter_sandbox.ssh.worker",
            f"--listen-fd={self.listening.fileno()}",
            f"--control-fd={theirs.fileno()}",
            f"--loads-fd={loads.fd}",
            "--workers=1",
            f"--host-keys={self.directory}",
            f"--parent={os.getpid()}",
        ]
        fds = (self.listening.fileno(), theirs.fileno(), loads.fd)
        worker = await asyncio.create_subprocess_exec(*argv, pass_fds=fds)
        theirs.close()
        channel = await Channel.over(ours)
        self.ready, self.logged_in = asyncio.Event(), asyncio.Event()
        serving = asyncio.ensure_future(channel.serve(lambda m: self._handle(m, channel)))
        try:
            await asyncio.wait_for(self.ready.wait(), 30)
            return await client(self, channel)
        finally:
            channel.close()
            await serving
            await asyncio.wait_for(worker.wait(), 30)
            self.listening.close()
            loads.close()

    def connect(self) -> asyncssh.connection._ConnectionContextManager:
        port = self.listening.getsockname()[1]
        return asyncssh.connect(
            "127.0.0.1", port, username=self.token, known_hosts=None, client_keys=None
        )

    def _handle(self, message: dict, channel: Channel) -> dict | None:
        op = message["op"]
        if op == "resolve":
            found = message["token_hash"] == self.target.token_hash
            answer = {"target": target_message(self.target) if found else None}
            if self.on_resolve is None:
                return answer
            channel.send({**answer, "answer": message["id"]})
            self.on_resolve(message, channel)
        elif op == "reserve":
            return {"refused_by": None}  # no cap on the connections of its user
        elif op == "admit":
            self.logins.append(message["conn"])
        elif op == "remove":
            self.logged_in.set()
        elif op == "ready":
            self.ready.set()
        return None


async def _still_logged_in(conn: asyncssh.SSHClientConnection) -> bool:
    """Whether the gateway still serves the connection: a forward it answers (refused, as
    the sandbox's agent is missing) rather than a closed connection."""
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", 1)
    return not conn.is_closed()


@pytest.mark.unprivileged
def test_a_login_that_completed_is_not_dropped_by_a_late_start_up_limit(tmp_path: Path) -> None:
    """The service counts logins in progress for every worker and, when MaxStartups bites,
    tells a worker to drop one. A login can complete in the worker while that order is on
    its way (a flood keeps the service busy): the worker must then keep the login, as a
    valid token is never refused by the start-up limits. Here the test is the service end
    of a real worker's channel and sends the order just after the login completed."""

    async def client(service: ServiceEnd, channel: Channel) -> str:
        async with service.connect() as conn:
            await asyncio.wait_for(service.logged_in.wait(), 10)
            # the service's order to drop the login, sent before it heard the login ended
            await channel.request({"op": "abort", "conn": service.logins[0]})
            return "kept" if await _still_logged_in(conn) else "dropped"

    outcome = asyncio.run(ServiceEnd(tmp_path).run(client))
    assert outcome == "kept", "the worker dropped a login that had completed"


@pytest.mark.unprivileged
def test_a_token_revoked_while_its_answer_is_on_the_way_does_not_log_in(tmp_path: Path) -> None:
    """Revoking a token closes its sessions in every worker. The service may revoke it just
    after it answered a worker's question about it: the answer and the order to close then
    reach the worker together, before the login it was for has its target. That login must
    not go on with the revoked token."""
    service = ServiceEnd(tmp_path)

    def revoke(message: dict, channel: Channel) -> None:
        target = service.target
        channel.send({"op": "close", "sandbox_id": target.sandbox_id, "token_hash": None})

    service.on_resolve = revoke

    async def client(service: ServiceEnd, channel: Channel) -> str:
        try:
            async with service.connect() as conn:
                return "logged in" if await _still_logged_in(conn) else "closed"
        except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError):
            return "refused"

    outcome = asyncio.run(service.run(client))
    assert outcome != "logged in", "a login went on with a token revoked meanwhile"


def _hostile_agent(path: Path) -> socket.socket:
    """A replaced agent on `path`: it starts every command, sends a line of output, then a
    frame of a kind that does not exist, and keeps the connection open."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            conn.makefile("rb").readline()
            conn.sendall(encode_json(Frame.RESULT, {"pid": 7}) + encode(Frame.STDOUT, b"hi\n"))
            conn.sendall(HEADER.pack(99, 0))

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.unprivileged
def test_a_replaced_agent_breaking_the_protocol_ends_the_session(tmp_path: Path) -> None:
    """A session whose agent sends what the protocol does not allow mid-command must end,
    with a message, rather than leave the client waiting on a channel nobody serves."""
    agent = _hostile_agent(tmp_path / "agent.sock")
    service = ServiceEnd(tmp_path, tmp_path / "agent.sock")

    async def client(service: ServiceEnd, channel: Channel) -> asyncssh.SSHCompletedProcess:
        async with service.connect() as conn:
            return await asyncio.wait_for(conn.run("true", encoding=None), 20)

    try:
        result = asyncio.run(service.run(client))
    finally:
        agent.close()
    assert result.stdout == b"hi\n"
    assert result.exit_status == 255
    assert b"agent" in result.stderr
