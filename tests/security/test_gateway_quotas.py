"""What one token holder may take from the SSH gateway: channels per connection and
connections per user, so one student cannot use up the descriptors of a shared gateway.

A real gateway on a free port in front of a real sandbox (and a supervised service
with gateway workers, for a worker's SIGKILL), driven by the stock ssh client as root
and as `nobody`. Each test fails if the abuser is not stopped with a clear message, if
another user is kept out meanwhile, or if the counts do not go back down.
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.ssh import GatewayLimits
from jupyter_sandbox.ssh.limits import ConnectionsPerUser
from tests.faults._supervised import SupervisedService
from tests.faults.test_gateway_workers import (
    all_workers,
    seen_workers,  # noqa: F401
    sessions_by_worker,
    ssh,
    stop_all,
    workers_service,
)
from tests.security.test_gateway_abuse import NOBODY, _uid, needs_openssh
from tests.test_ssh_gateway import (  # noqa: F401
    Gw,
    Loop,
    Tunnel,
    free_port,
    loop,
    run,
    sandbox,
    wait_for,
    workdir,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes of these tests run as root")
CHANNELS = 4
PER_USER = 3
CHANNEL_REFUSAL = f"holds {CHANNELS} open channels"
# Echoes each connection's data back, any number of connections at once.
ECHO_SERVER = """
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""
USER_REFUSAL = f"holds {PER_USER} SSH connections to this gateway already"


def shown(argv: list[str]) -> list[str]:
    """`argv` with LogLevel INFO, ssh's default: it prints banners and refused channels."""
    return ["LogLevel=INFO" if arg == "LogLevel=ERROR" else arg for arg in argv]


@pytest.fixture
def gw(loop: Loop, workdir: Path) -> Iterator[Gw]:  # noqa: F811
    limits = GatewayLimits(max_channels=CHANNELS, max_connections_per_user=PER_USER)
    gateway = Gw(loop, workdir, limits=limits)
    yield gateway
    gateway.close()


def exec_as(user: str, argv: list[str]) -> list[str]:
    """`argv` run as `user` in the same process (unlike runuser, which forks: killing it
    would leave its ssh running)."""
    return ["setpriv", f"--reuid={user}", f"--regid={_gid(user)}", "--clear-groups", *argv]


def _gid(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def held(gateway: Gw, token: str, count: int, user: str | None = None) -> list[subprocess.Popen]:
    """`count` connections that stay logged in (each prints "up" once it runs)."""
    argv = gateway.ssh(token, "echo up; exec sleep 600")
    procs = [
        subprocess.Popen(exec_as(user, argv) if user else argv, stdout=subprocess.PIPE)
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout.readline() == b"up\n"
    return procs


def echoes(sock: socket.socket, text: bytes = b"ping\n") -> bool:
    """Does the echo server at the other end of the forward answer on `sock`?"""
    try:
        sock.sendall(text)
        return sock.recv(65536) == text
    except OSError:
        return False


def fresh_echo(port: int) -> bool:
    """Does a new connection to the forward on `port` get an answer?"""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        return echoes(sock)


@root_only
@needs_openssh
def test_channels_of_one_connection_are_capped(gw: Gw, sandbox) -> None:  # noqa: F811
    """Attack: one connection opening forward after forward (`ssh -L`, idle sockets). Past
    the cap the gateway refuses the channel with a reason the client prints; another
    connection of the same token works meanwhile; a closed channel makes room again."""
    port = free_port()
    sandbox.spawn(f"exec python3 -c {shlex.quote(ECHO_SERVER)} {port}")
    token = gw.issue(sandbox)
    local = free_port()
    forward = shown(gw.ssh(token, "-N", "-L", f"{local}:127.0.0.1:{port}"))
    with Tunnel(forward) as tunnel:
        wait_for(lambda: _attempt(fresh_echo, local), what="the forward")
        wait_for(lambda: not _open_channels(gw), what="the probe's channel to close")
        holding = [socket.create_connection(("127.0.0.1", local)) for _ in range(CHANNELS)]
        try:
            assert all(echoes(sock) for sock in holding)  # each an open channel
            assert not fresh_echo(local)  # one more: refused, ssh closes the socket
            other = run(gw.ssh(token, "echo other"))
            assert (other.returncode, other.stdout) == (0, b"other\n"), other.stderr
            holding.pop().close()
            wait_for(lambda: fresh_echo(local), what="room for a channel")
        finally:
            for sock in holding:
                sock.close()
        tunnel.proc.terminate()
        tunnel.proc.wait(10)
        stderr = tunnel.proc.stderr.read().decode()
    assert f"open failed: resource shortage: this connection {CHANNEL_REFUSAL}" in stderr, stderr


def _open_channels(gateway: Gw) -> int:
    return sum(conn.open_channels() for conn in gateway.gateway.connections)


def _attempt(check, port: int) -> bool:
    try:
        return check(port)
    except OSError:
        return False


@root_only
@needs_openssh
def test_connections_of_one_user_are_capped(gw: Gw, sandbox) -> None:  # noqa: F811
    """Attack: a user holding many connections. Past the cap the login is refused with a
    banner naming the limit and what to do, whatever token of that user it uses; another
    user logs in meanwhile; each closed connection makes room again, and the count goes
    back to zero."""
    token, second = gw.issue(sandbox), gw.issue(sandbox)
    nobodys = gw.issue(sandbox, uid=_uid(NOBODY))
    users = gw.gateway.ledger.users
    procs = held(gw, token, PER_USER)
    try:
        assert users.count("uid 0") == PER_USER
        refused = run(shown(gw.ssh(second, "echo in")))
        assert refused.returncode == 255 and refused.stdout == b""
        assert (
            USER_REFUSAL in refused.stderr.decode() and "ControlMaster" in refused.stderr.decode()
        )
        theirs = held(gw, nobodys, 1, user=NOBODY)
        procs += theirs
        assert users.count(f"uid {_uid(NOBODY)}") == 1
        procs[0].kill()
        procs[0].wait(10)
        wait_for(lambda: users.count("uid 0") == PER_USER - 1, what="the count to go down")
        again = run(gw.ssh(second, "echo in"))
        assert (again.returncode, again.stdout) == (0, b"in\n"), again.stderr
    finally:
        stop_all(procs)
    wait_for(
        lambda: not users.by_user and not users.user_of, what=f"zero counts, not {users.by_user}"
    )


@pytest.fixture
def capped_service(
    separate_service_env,
    monkeypatch,
    seen_workers,  # noqa: F811
) -> Iterator[SupervisedService]:
    yield from workers_service(
        separate_service_env,
        monkeypatch,
        seen_workers,
        JUPYTER_SANDBOX_SSH_MAX_CONNECTIONS_PER_USER=str(PER_USER),
    )


@root_only
@needs_openssh
def test_the_cap_holds_across_workers_and_a_killed_workers_connections_stop_counting(
    capped_service: SupervisedService,
) -> None:
    """The per-user cap is counted in the service for every worker together; a worker
    killed with SIGKILL gives back exactly the connections it held."""
    with Sandbox.create() as sb:
        access = sb.expose_ssh()
        pids = all_workers(capped_service)
        procs = [subprocess.Popen(ssh(access, "echo up; exec sleep 600"), stdout=subprocess.PIPE)]
        procs += [
            subprocess.Popen(ssh(access, "echo up; exec sleep 600"), stdout=subprocess.PIPE)
            for _ in range(PER_USER - 1)
        ]
        try:
            for proc in procs:
                assert proc.stdout.readline() == b"up\n"
            spread = sessions_by_worker(capped_service, access.port)
            assert len(spread) > 1, spread  # the connections are in several workers
            refused = subprocess.run(shown(ssh(access, "echo in")), capture_output=True, timeout=60)
            assert refused.returncode == 255 and USER_REFUSAL in refused.stderr.decode()
            victim = next(pid for pid in pids if spread.get(pid) == 1)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: sum(p.poll() is not None for p in procs) == 1, 10)
            all_workers(capped_service)
            again = wait_for(
                lambda: (
                    (
                        r := subprocess.run(
                            shown(ssh(access, "echo in")), capture_output=True, timeout=60
                        )
                    ).returncode
                    == 0
                    and r
                ),
                30,
                what="a login once the killed worker's connection stopped counting",
            )
            assert again.stdout == b"in\n"
            procs.append(
                subprocess.Popen(ssh(access, "echo up; exec sleep 600"), stdout=subprocess.PIPE)
            )
            assert procs[-1].stdout.readline() == b"up\n"
            full = subprocess.run(shown(ssh(access, "echo in")), capture_output=True, timeout=60)
            assert full.returncode == 255 and USER_REFUSAL in full.stderr.decode()
        finally:
            stop_all(procs)


@pytest.mark.unprivileged
def test_the_caps_are_read_from_the_environment_and_checked() -> None:
    """64 channels a connection; 64 connections a user in the system service, no cap in
    a per-user one (every token is its owner's); both follow their variables, and a bad
    value names the variable."""
    assert (GatewayLimits().max_channels, GatewayLimits().max_connections_per_user) == (64, None)
    assert GatewayLimits.from_env({}, system=True).max_connections_per_user == 64
    limits = GatewayLimits.from_env(
        {
            "JUPYTER_SANDBOX_SSH_MAX_CHANNELS": "8",
            "JUPYTER_SANDBOX_SSH_MAX_CONNECTIONS_PER_USER": "5",
        }
    )
    assert (limits.max_channels, limits.max_connections_per_user) == (8, 5)
    for bad in ("0", "-3", "lots"):
        with pytest.raises(ValueError, match="JUPYTER_SANDBOX_SSH_MAX_CHANNELS: expected"):
            GatewayLimits.from_env({"JUPYTER_SANDBOX_SSH_MAX_CHANNELS": bad})


@pytest.mark.unprivileged
def test_each_user_is_counted_apart_and_a_connection_once() -> None:
    """The counter: one user's connections never use another's room, counting a
    connection again changes nothing, and releasing an unknown one is harmless."""
    users = ConnectionsPerUser(2)
    assert users.reserve("a1", "uid 1") and users.reserve("a1", "uid 1")
    assert users.reserve("a2", "uid 1") and not users.reserve("a3", "uid 1")
    assert users.reserve("b1", "uid 2") and users.count("uid 1") == 2
    users.release("a1")
    users.release("nobody knows")
    assert users.reserve("a3", "uid 1") and users.count("uid 1") == 2
    for conn in ("a2", "a3", "b1"):
        users.release(conn)
    assert users.by_user == {} and users.user_of == {}
