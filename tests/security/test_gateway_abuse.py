"""Attacks on the SSH gateway by clients without a token: floods, stalls, brute force, ptys.

A real gateway on a free port in front of a real sandbox, attacked with plain
sockets and stock OpenSSH clients (as root and as `nobody`, two local users).
Each test fails if a client without a token can keep a token holder out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.ssh import GatewayLimits, generate_token, peers
from jupyter_sandbox.ssh.limits import MaxStartups, StartupLimiter
from jupyter_sandbox.ssh.peers import identify
from jupyter_sandbox.ssh.session import MAX_TERM_CELLS, SandboxSession
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

ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="sandboxes of the gateway tests run as root")
needs_openssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs openssh-client")
NOBODY = "nobody"
SHORT_DEADLINE = 4.0


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def idle_connections(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """`count` TCP connections to the gateway that never send a byte."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def closed(sock: socket.socket) -> bool:
    """Has the gateway closed this connection? (Reads away its banner.)"""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    return True


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def as_user(user: str, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv]


def bad_logins(
    gateway: Gw, count: int, *, sources: list[str] | None = None, user: str | None = None
):
    """`count` logins with unknown tokens at once; their exit codes."""
    procs = []
    for i in range(count):
        argv = gateway.ssh(generate_token(), "true")
        if sources:
            argv[1:1] = ["-b", sources[i % len(sources)]]
        procs.append(
            subprocess.Popen(
                as_user(user, argv) if user else argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return [proc.wait(120) for proc in procs]


def start_up_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "start-up limit" in r.getMessage()]


SMALL = GatewayLimits(
    per_source_startups=MaxStartups(10, 30, 20),
    startups=MaxStartups(15, 30, 20),
    login_timeout=SHORT_DEADLINE,
)


# -- start-up limits ---------------------------------------------------------------------


@root_only
@needs_openssh
@pytest.mark.parametrize(
    "limits",
    [SMALL, GatewayLimits(login_timeout=SHORT_DEADLINE)],
    ids=["small-limits", "default-limits"],
)
def test_idle_flood_does_not_lock_out_a_token_holder(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
    limits: GatewayLimits,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: 200 TCP connections from one source that never send a byte (64 locked
    everyone out before). A valid login from the same source still gets in at once, the
    gateway holds no more of them than its limit, and all are dropped at the deadline."""
    caplog.set_level(logging.INFO)
    gateway = Gw(loop, workdir, limits=limits)
    flood: list[socket.socket] = []
    try:
        token = gateway.issue(sandbox)
        flood = idle_connections(gateway.port, 200)
        flooded = time.monotonic()
        full = limits.per_source_startups.full
        wait_for(lambda: gateway.gateway.unauthenticated() + sum(map(closed, flood)) >= 200)
        assert gateway.gateway.unauthenticated() <= full
        started = time.monotonic()
        result = run(gateway.ssh(token, "echo in"))
        login_time = time.monotonic() - started
        print(f"valid login behind 200 idle connections: {login_time:.2f} s")
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
        assert login_time < 5.0, f"a valid login took {login_time:.1f} s"
        wait_for(lambda: all(map(closed, flood)), timeout=limits.login_timeout + 10)
        assert time.monotonic() - flooded >= limits.login_timeout - 0.5
        if full < 200:
            lines = start_up_lines(caplog)
            assert 1 <= len(lines) <= 3, lines  # one line when it bites, then counts
            assert "local uid 0" in lines[0]
        assert token not in caplog.text
    finally:
        close_all(flood)
        gateway.close()


@root_only
@needs_openssh
def test_a_flood_from_one_local_user_does_not_shut_out_another(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: root fills every start-up slot of the gateway (its per-source share is all
    of the total here) with idle connections. Another local user's valid login evicts one
    of the flood's, not the other way round."""
    hard = MaxStartups.parse("20")
    limits = GatewayLimits(per_source_startups=hard, startups=hard, login_timeout=30)
    gateway = Gw(loop, workdir, limits=limits)
    flood: list[socket.socket] = []
    try:
        token = gateway.issue(sandbox, uid=_uid(NOBODY))
        flood = idle_connections(gateway.port, 200)
        wait_for(lambda: gateway.gateway.unauthenticated() + sum(map(closed, flood)) >= 200)
        assert gateway.gateway.unauthenticated() == hard.full
        result = run(as_user(NOBODY, gateway.ssh(token, "echo in")))
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
    finally:
        close_all(flood)
        gateway.close()


@root_only
def test_silent_and_stalled_handshakes_end_at_the_login_deadline(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    """Attack: connect and send nothing, half a version banner, or a banner and no key
    exchange, to hold start-up slots forever. The deadline counts from the TCP accept."""
    gateway = Gw(loop, workdir, limits=SMALL)
    greetings = [b"", b"SSH-2.0-Open", b"SSH-2.0-OpenSSH_9.2\r\n"]
    sockets = idle_connections(gateway.port, len(greetings))
    opened = time.monotonic()
    ends: dict[int, float] = {}
    try:
        for sock, greeting in zip(sockets, greetings):
            sock.sendall(greeting)

        def all_closed() -> bool:
            for i, sock in enumerate(sockets):
                if i not in ends and closed(sock):
                    ends[i] = time.monotonic() - opened
            return len(ends) == len(sockets)

        wait_for(all_closed, timeout=SHORT_DEADLINE + 10)
    finally:
        close_all(sockets)
        gateway.close()
    assert all(SHORT_DEADLINE - 0.5 <= end <= SHORT_DEADLINE + 5 for end in ends.values()), ends


@root_only
@needs_openssh
def test_a_class_of_150_logs_in_at_the_same_instant(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Burst: 150 logins at once from one machine, as a class at the start of a lesson
    (exactly 64 got in before). With the default limits all of them succeed."""
    caplog.set_level(logging.INFO)
    with Gw(loop, workdir) as gateway:
        tokens = [gateway.issue(sandbox) for _ in range(150)]
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                ["ssh", "-o", "ConnectTimeout=120", *gateway.ssh(t, "true")[1:]],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for t in tokens
        ]
        codes = [proc.wait(240) for proc in procs]
        elapsed = time.monotonic() - started
        logins = [t for _, t in gateway.events if t.startswith("SSH connection from 127.0.0.1 ")]
        logins = [t for t in logins if " closed after " not in t]
        print(f"150 simultaneous logins: {len(logins)} in, {elapsed:.1f} s, exits {set(codes)}")
        assert len(logins) == 150 and codes == [0] * 150
        assert start_up_lines(caplog) == []  # a class fits without the limit biting


# -- failed logins -----------------------------------------------------------------------


@root_only
@needs_openssh
def test_brute_force_never_blocks_a_valid_token(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: 50 unknown tokens from 127.0.0.1, where the Jupyter tunnel comes from too
    (10 locked it out for 5 minutes before). The source is blocked, which slows its unknown
    tokens down, but a valid token from it still gets in."""
    limits = GatewayLimits(max_failures=10, blocked_delay=1.0)
    with Gw(loop, workdir, limits=limits) as gateway:
        token = gateway.issue(sandbox)
        assert set(bad_logins(gateway, 50)) == {255}
        assert gateway.gateway.ledger.failures.blocked("local uid 0")
        result = run(gateway.ssh(token, "echo in"))
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
        started = time.monotonic()
        assert run(gateway.ssh(generate_token(), "true")).returncode == 255
        assert time.monotonic() - started >= limits.blocked_delay


@root_only
@needs_openssh
def test_cycling_loopback_addresses_is_still_one_local_user(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: unknown tokens from 127.0.0.2 ... 127.0.0.50 (any local user may bind any
    of 127.0.0.0/8) to dodge a per-address block. They all count against one local user,
    root; `nobody`, another local user, is counted apart and unaffected."""
    with Gw(loop, workdir, limits=GatewayLimits(max_failures=10)) as gateway:
        token = gateway.issue(sandbox)
        sources = [f"127.0.0.{n}" for n in range(2, 51)]
        assert set(bad_logins(gateway, len(sources), sources=sources)) == {255}
        failures = gateway.gateway.ledger.failures
        assert set(failures.failures) | set(failures.blocked_until) == {"local uid 0"}
        assert failures.blocked("local uid 0")
        assert bad_logins(gateway, 1, user=NOBODY) == [255]
        nobody = f"local uid {_uid(NOBODY)}"
        assert len(failures.failures[nobody]) == 1 and not failures.blocked(nobody)
        nobodys = gateway.issue(sandbox, uid=_uid(NOBODY))
        from_nobody = run(as_user(NOBODY, gateway.ssh(nobodys, "true")))
        assert from_nobody.returncode == 0, from_nobody.stderr
        from_root = run(["ssh", "-b", "127.0.0.99", *gateway.ssh(token, "true")[1:]])
        assert from_root.returncode == 0, from_root.stderr


# -- pty sizes ---------------------------------------------------------------------------


@root_only
def test_absurd_pty_sizes_are_clamped(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: a pty request and a window change of 100000 x 100000 cells (over the
    kernel's 65535, which made the agent leak descriptors). The gateway clamps both and the
    sandbox keeps serving."""
    gateway = Gw(loop, workdir)
    token = gateway.issue(sandbox)
    huge = 100_000

    async def session() -> list[str]:
        async with asyncssh.connect(
            "127.0.0.1", gateway.port, username=token, known_hosts=None, client_keys=None
        ) as conn:
            proc = await conn.create_process(
                "stty -echo; stty size; read line; stty size",
                term_type="xterm",
                term_size=(huge, huge, huge, huge),
                encoding="utf-8",
            )
            first = await asyncio.wait_for(proc.stdout.readline(), 20)
            proc.change_terminal_size(huge * 10, huge * 10, huge, huge)
            proc.stdin.write("go\n")
            second = await asyncio.wait_for(proc.stdout.readline(), 20)
            await asyncio.wait_for(proc.wait(), 20)
            return [first.strip(), second.strip()]

    try:
        sizes = gateway.loop.run(session())
        assert sizes == [f"{MAX_TERM_CELLS} {MAX_TERM_CELLS}"] * 2
        assert run(gateway.ssh(token, "echo alive")).stdout == b"alive\n"
    finally:
        gateway.close()


# -- the rules, without a network ----------------------------------------------------------


class FakeConn:
    def __init__(self, source: str, last_active: float) -> None:
        self.source, self.last_active = source, last_active

    def abort(self) -> None:
        pass


@pytest.mark.unprivileged
def test_max_startups_follows_sshd() -> None:
    """start:rate:full as sshd reads it: no bite below start, certain at full, linear in
    between from rate percent; one number is a hard limit."""
    limit = MaxStartups.parse("10:30:100")
    assert not limit.bites(9, draw=lambda: 0.0)
    assert limit.bites(10, draw=lambda: 0.29) and not limit.bites(10, draw=lambda: 0.31)
    assert limit.bites(55, draw=lambda: 0.64) and not limit.bites(55, draw=lambda: 0.66)
    assert limit.bites(100, draw=lambda: 0.999)
    assert MaxStartups.parse("5") == MaxStartups(5, 100, 5)
    for bad in ("", "a:b:c", "10:30", "0:30:10", "20:30:10", "1:101:5"):
        with pytest.raises(ValueError):
            MaxStartups.parse(bad)


@pytest.mark.unprivileged
def test_limits_come_from_the_environment() -> None:
    limits = GatewayLimits.from_env(
        {
            "JUPYTER_SANDBOX_SSH_MAX_STARTUPS": "50:20:80",
            "JUPYTER_SANDBOX_SSH_PER_SOURCE_MAX_STARTUPS": "30",
            "JUPYTER_SANDBOX_SSH_LOGIN_TIMEOUT": "7.5",
            "JUPYTER_SANDBOX_SSH_MAX_FAILURES": "3",
        }
    )
    assert limits.startups == MaxStartups(50, 20, 80)
    assert limits.per_source_startups == MaxStartups(30, 100, 30)
    assert (limits.login_timeout, limits.max_failures) == (7.5, 3)
    assert GatewayLimits.from_env({}) == GatewayLimits()
    with pytest.raises(ValueError, match="JUPYTER_SANDBOX_SSH_MAX_STARTUPS"):
        GatewayLimits.from_env({"JUPYTER_SANDBOX_SSH_MAX_STARTUPS": "many"})


@pytest.mark.unprivileged
def test_limiter_drops_the_idlest_of_the_biggest_source() -> None:
    """When a per-source limit bites, the source's own idlest login goes; when the total
    bites, the idlest of the source holding the most, never a small source's."""
    limiter = StartupLimiter(
        GatewayLimits(per_source_startups=MaxStartups(3, 100, 3), startups=MaxStartups(5, 100, 5))
    )
    small = FakeConn("local uid 1000", 0.0)  # the idlest of all
    assert limiter.admit(small) is None
    flood = [FakeConn("local uid 0", 10.0 + i) for i in range(3)]
    assert [limiter.admit(c) for c in flood] == [None] * 3
    assert limiter.admit(FakeConn("local uid 0", 20.0)) is flood[0]  # its own, not `small`
    assert limiter.admit(FakeConn("192.0.2.7", 21.0)) is None  # total 5 now
    assert limiter.admit(FakeConn("192.0.2.8", 22.0)) is flood[1]  # total bites: biggest
    assert small in limiter.by_source["local uid 1000"] and limiter.total == 5


@pytest.mark.unprivileged
def test_sources_are_users_for_local_peers_and_networks_for_remote_ones() -> None:
    """Every loopback address of one user is one source, found from the kernel's socket
    table; remote IPv6 peers count by /64."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        sources = set()
        for client_address in ("127.0.0.1", "127.0.0.2", "127.3.4.5"):
            with socket.socket() as client:
                client.bind((client_address, 0))
                client.connect(server.getsockname())
                accepted, peer = server.accept()
                with accepted:
                    sources.add(identify(peer, accepted.getsockname()).source)
    assert sources == {f"local uid {os.getuid()}"}
    remote_v6 = identify(("2001:db8:1:2:aa::1", 5), ("2001:db8::9", 22))
    assert remote_v6 == peers.Peer("2001:db8:1:2::/64")
    assert identify(("::ffff:192.0.2.1", 5, 0, 0), ("::", 22, 0, 0)) == peers.Peer("192.0.2.1")


# -- peer lookup ---------------------------------------------------------------------------

SOCKET_HOG = """
import resource, socket, sys, time
pairs, hold = int(sys.argv[1]), float(sys.argv[2])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(4096)
keep = []
for _ in range(pairs):
    client = socket.socket()
    client.connect(server.getsockname())
    keep += [client, server.accept()[0]]
print("ready", flush=True)
time.sleep(hold)
"""
HOGS, HOG_PAIRS = 3, 9000  # 54k sockets, in processes within a 20k fd limit


def connect_close_flood(port: int, stop: threading.Event) -> int:
    """Connect to the gateway and close at once, as fast as possible, until `stop`."""
    count = 0
    while not stop.is_set():
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", port))
            count += 1
    return count


@root_only
@needs_openssh
def test_a_huge_socket_table_and_a_connect_flood_do_not_stall_logins(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: a local user with no token holds 54k idle loopback sockets (a big socket
    table) and connects and closes in a loop, so that every accept's owner lookup is
    slow and the gateway's loop stalls (whole-table reads of /proc/net/tcp did this). A
    valid login still gets in quickly while the flood runs."""
    gateway = Gw(loop, workdir, limits=GatewayLimits(login_timeout=SHORT_DEADLINE))
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", SOCKET_HOG, str(HOG_PAIRS), "120"], stdout=subprocess.PIPE
        )
        for _ in range(HOGS)
    ]
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            token = gateway.issue(sandbox)
            assert all(hog.stdout.readline() == b"ready\n" for hog in hogs)
            floods = [pool.submit(connect_close_flood, gateway.port, stop) for _ in range(2)]
            started = time.monotonic()
            logins = [run(gateway.ssh(token, "echo in")) for _ in range(3)]
            login_time = (time.monotonic() - started) / len(logins)
            stop.set()
            flooded = sum(flood.result(30) for flood in floods)
            print(
                f"mean login time with a 54k socket table and {flooded} connects: "
                f"{login_time:.2f} s"
            )
            assert all((r.returncode, r.stdout) == (0, b"in\n") for r in logins), logins
            assert login_time < 3.0, f"a valid login took {login_time:.1f} s"
        finally:
            stop.set()
            for hog in hogs:
                hog.kill()
                hog.wait(30)
            gateway.close()


@pytest.mark.unprivileged
def test_a_closed_client_is_charged_to_nobody() -> None:
    """Attack: a client connects and closes at once; its socket, gone or in TIME_WAIT,
    shows uid 0, which charged the flood to root's share. It names no user now, asked by
    sock_diag or by the /proc/net fallback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.socket()
        client.connect(server.getsockname())
        accepted, peer = server.accept()
        with accepted:
            local = accepted.getsockname()
            me = peers.local_peer(os.getuid())
            assert identify(peer, local) == me
            assert asyncio.run(peers.ProcReader().identify(peer, local)) == me
            client.close()
            wait_for(lambda: identify(peer, local) is peers.GONE, timeout=5)
            assert asyncio.run(peers.ProcReader().identify(peer, local)) is peers.GONE
        wait_for(lambda: identify(peer, local) is peers.GONE, timeout=5)
        assert asyncio.run(peers.ProcReader().identify(peer, local)) is peers.GONE


# -- window changes ----------------------------------------------------------------------------

WINDOW_CHANGES = 200_000


class PausableChannel:
    """The channel's flow-control side, which is all the input queue touches."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class RecordingStream:
    """The agent stream's sending side: records frames."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    async def send(self, kind: int, payload: bytes) -> None:
        self.sent.append((kind, payload))


@pytest.mark.unprivileged
def test_window_change_and_signal_floods_are_coalesced() -> None:
    """Attack: 200k window-change and signal requests while the agent is behind; each
    one was queued (1M grew the service by 40 MB). The queue holds one resize (the latest
    size) and each signal once, and the agent gets the latest size."""
    session = SandboxSession(target=None, audit=None)  # type: ignore[arg-type]
    session.chan = PausableChannel()  # type: ignore[assignment]
    for i in range(WINDOW_CHANGES):
        session.terminal_size_changed(80 + i % 100, 24, 0, 0)
        session.signal_received("INT")
    session.terminal_size_changed(123, 45, 0, 0)
    assert session.inbound.qsize() == 2
    stream = RecordingStream()

    async def drain() -> None:
        sender = asyncio.ensure_future(session._to_agent(stream))
        while not session.inbound.empty():
            await asyncio.sleep(0)
        sender.cancel()

    asyncio.run(drain())
    assert stream.sent == [(Frame.RESIZE, b'{"rows": 45, "cols": 123}'), (Frame.SIGNAL, b"2")]


@root_only
def test_a_window_change_flood_leaves_the_last_size(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: 200k window changes on a real session as fast as the client can send. The
    pty ends with the last size and the session and gateway keep serving."""
    gateway = Gw(loop, workdir)
    token = gateway.issue(sandbox)

    async def session() -> str:
        async with asyncssh.connect(
            "127.0.0.1", gateway.port, username=token, known_hosts=None, client_keys=None
        ) as conn:
            proc = await conn.create_process(
                "stty -echo; echo ready; read line; stty size",
                term_type="xterm",
                encoding="utf-8",
            )
            assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == "ready"
            for i in range(WINDOW_CHANGES):
                proc.change_terminal_size(100 + i % 50, 40, 0, 0)
            proc.change_terminal_size(123, 45, 0, 0)
            proc.stdin.write("go\n")
            size = await asyncio.wait_for(proc.stdout.readline(), 60)
            await asyncio.wait_for(proc.wait(), 20)
            return size.strip()

    try:
        assert gateway.loop.run(session(), timeout=120) == "45 123"
        assert run(gateway.ssh(token, "echo alive")).stdout == b"alive\n"
    finally:
        gateway.close()


# -- forwarding ------------------------------------------------------------------------------

SILENT_SERVER = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", {port}))
server.listen(256)
held = []
while True:
    held.append(server.accept()[0])
"""
LOCAL_FORWARDS, STDIO_FORWARDS = 45, 5


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@root_only
@needs_openssh
def test_forwards_to_a_silent_server_free_their_fds_when_the_client_leaves(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
) -> None:
    """Attack: open 50 forwards (-L and -W) to a server inside the sandbox that never
    writes, then disconnect; each relay kept reading its agent stream for good, leaking
    the gateway's fds. The gateway's open fds return to their baseline."""
    with Gw(loop, workdir) as gateway:
        _forward_and_leave(gateway, sandbox)


def _forward_and_leave(gateway: Gw, sandbox) -> None:  # noqa: F811
    port = free_port()
    sandbox.sh(f"cat > silent.py <<'EOF'\n{SILENT_SERVER.format(port=port)}EOF")
    sandbox.spawn("exec python3 silent.py")
    wait_for(lambda: sandbox.can_connect(port), what="the silent server")
    token = gateway.issue(sandbox)
    baseline = open_fds()
    for leave in (_openssh_forwards_killed, _asyncssh_forwards_closed):
        opened = leave(gateway, token, port, baseline)
        wait_for(lambda: open_fds() <= baseline, timeout=15, what="the fds to be freed")
        print(
            f"{leave.__name__}: gateway fds {baseline} before, {opened} with forwards, "
            f"back to {open_fds()}"
        )


def _openssh_forwards_killed(gateway: Gw, token: str, port: int, baseline: int) -> int:
    """-L and -W forwards from stock ssh clients, which are then killed."""
    local = free_port()
    forward = gateway.ssh(token)
    forward[1:1] = ["-N", "-L", f"{local}:127.0.0.1:{port}"]
    stdio = gateway.ssh(token)
    stdio[1:1] = ["-W", f"127.0.0.1:{port}"]
    clients: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        tunnel = stack.enter_context(Tunnel(forward))
        stdios = [stack.enter_context(Tunnel(stdio)) for _ in range(STDIO_FORWARDS)]
        wait_for(lambda: _connects(local), what="the tunnel")
        for _ in range(LOCAL_FORWARDS):
            clients.append(socket.create_connection(("127.0.0.1", local), timeout=10))
        wait_for(lambda: open_fds() >= baseline + LOCAL_FORWARDS + STDIO_FORWARDS, timeout=30)
        opened = open_fds()
        for proc in [tunnel, *stdios]:
            proc.proc.kill()
        close_all(clients)
    return opened


def _asyncssh_forwards_closed(gateway: Gw, token: str, port: int, baseline: int) -> int:
    """Direct-tcpip channels, half of them half-closed, then a clean disconnect."""

    async def forward_and_disconnect() -> int:
        async with asyncssh.connect(
            "127.0.0.1", gateway.port, username=token, known_hosts=None
        ) as conn:
            for i in range(LOCAL_FORWARDS + STDIO_FORWARDS):
                _, writer = await conn.open_connection("127.0.0.1", port)
                if i % 2:
                    writer.write_eof()
            return open_fds()

    return asyncio.run(forward_and_disconnect())


def _connects(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@root_only
@needs_openssh
def test_without_sock_diag_local_peers_are_found_off_the_loop(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the kernel has no sock_diag (made so here), an idle local connection is
    first counted as an unknown local peer, then against its user from /proc/net, read
    in a thread; a valid login still gets in."""

    def unavailable(*args: object) -> None:
        raise peers.Unavailable("no sock_diag")

    monkeypatch.setattr(peers, "local_peer_uid", unavailable)
    gateway = Gw(loop, workdir)
    idle: list[socket.socket] = []
    try:
        token = gateway.issue(sandbox)
        idle = idle_connections(gateway.port, 3)
        by_source = gateway.gateway.ledger.startups.by_source
        wait_for(lambda: len(by_source.get(f"local uid {os.getuid()}", ())) == 3)
        assert peers.UNKNOWN_LOCAL not in by_source
        assert run(gateway.ssh(token, "echo in")).stdout == b"in\n"
    finally:
        close_all(idle)
        gateway.close()
