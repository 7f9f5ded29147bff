"""Attacks by other users of the machine on a token: tokens from this machine work only for
the OS user they were issued to.

A real gateway on a free port (dual-stack, every address) in front of a real sandbox,
driven by the stock ssh, scp and sftp clients run as real OS users made for the test.
A token read from another student's `ps` must be useless here, whatever address the
thief binds, whatever port it reuses; and one student's bad logins must never slow
another down.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox.service.ssh_port import bind_listener
from jupyter_sandbox.ssh import GatewayLimits, generate_token, peers
from jupyter_sandbox.ssh.gateway import OTHER_USER
from tests.system_fixtures import OsUser, os_users
from tests.test_ssh_gateway import (  # noqa: F401
    Gw,
    Loop,
    loop,
    random_file,
    run,
    sandbox,
    wait_for,
    workdir,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes OS users and runs as them")
REFUSED_BANNER = OTHER_USER.split(";")[0].removeprefix("jupyter-sandbox: ")
# A ProxyCommand run with /usr/bin/python3 (any user can run it): connects to the gateway
# from a chosen source address and port, then relays stdin and stdout.
RELAY = textwrap.dedent(
    """
    import socket, sys, threading
    source, port, host, gateway = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((source, port))
    sock.connect((host, gateway))
    def up():
        while data := sys.stdin.buffer.read1(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    threading.Thread(target=up, daemon=True).start()
    while data := sock.recv(65536):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    """
)


@pytest.fixture(scope="module")
def students() -> Iterator[list[OsUser]]:
    with os_users(students=2, instructors=0) as made:
        yield made.students


@pytest.fixture
def gw(loop: Loop, workdir: Path) -> Iterator[Gw]:  # noqa: F811
    """A gateway on every address, IPv4 and IPv6 (as `JUPYTER_SANDBOX_SSH_HOST=""`)."""
    gateway = Gw(loop, workdir, sock=bind_listener("", 0))
    yield gateway
    gateway.close()


def as_user(user: OsUser, argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid", str(user.uid), "--regid", str(user.gid), "--init-groups", *argv]


def ssh(gw: Gw, token: str, host: str = "127.0.0.1", *options: str) -> list[str]:
    """The ssh command for `token` at `host`, with the banner shown (LogLevel INFO)."""
    argv = gw.ssh(token, "echo in")
    argv[argv.index(f"{token}@127.0.0.1")] = f"{token}@{host}"
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"
    return [argv[0], *options, *argv[1:]]


def refused(result: subprocess.CompletedProcess) -> bool:
    """Refused as a wrong token is (with the banner saying why)."""
    return result.returncode == 255 and b"Permission denied" in result.stderr


def host_address(version: int) -> str:
    """An address of this host's own that is not loopback (its LAN address)."""
    found = [
        a
        for a in peers.host_addresses()
        if a.version == version and not a.is_loopback and not a.is_link_local
    ]
    if not found:
        pytest.skip(f"this host has no IPv{version} address besides loopback")
    return str(found[0])


def test_a_token_works_over_loopback_only_for_the_user_it_was_issued_to(
    gw: Gw,
    sandbox,  # noqa: F811
    students: list[OsUser],
    workdir: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: student B read student A's token from `ps` and uses it over loopback, with
    ssh, scp and sftp; root tries it too (uid 0 is not exempt). All are refused like a
    wrong token, with a banner saying why, and one log line naming the users and not the
    token. A gets in with each tool."""
    caplog.set_level(logging.INFO)
    alice, bob = students
    token = gw.issue(sandbox, uid=alice.uid)
    os.chmod(random_file(workdir / "payload", 1 << 20), 0o644)
    (workdir / "batch").write_text("put payload up.bin\nget up.bin down.bin\n")
    opts = gw.options("-P", str(gw.port))
    scp = ["scp", "-q", *opts, "payload", f"{token}@127.0.0.1:copied.bin"]
    sftp = ["sftp", "-q", *opts, "-b", "batch", f"{token}@127.0.0.1"]

    def by(user: OsUser | None, argv: list[str]) -> subprocess.CompletedProcess:
        """`argv` as `user` (None: root), in a directory of its own holding the files."""
        cwd = workdir / (user.name if user else "root")
        cwd.mkdir(exist_ok=True)
        for name in ("payload", "batch"):
            (cwd / name).write_bytes((workdir / name).read_bytes())
        if user:
            subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(cwd)], check=True)
        command = as_user(user, argv) if user else argv
        return subprocess.run(command, cwd=cwd, capture_output=True, timeout=120, check=False)

    for thief in (bob, None):
        result = by(thief, ssh(gw, token))
        assert refused(result) and REFUSED_BANNER.encode() in result.stderr, result.stderr
        for tool in (scp, sftp):
            assert by(thief, tool).returncode == 255  # its refusal is in the log lines below
    lines = [r.getMessage() for r in caplog.records if "presented from this machine" in r.message]
    assert len(lines) == 6, lines
    assert f"local uid {bob.uid}" in lines[0] and f"issued to uid {alice.uid}" in lines[0]
    assert "local uid 0" in lines[-1]
    assert token not in caplog.text and all(token not in text for _, text in gw.events)
    assert sandbox.sh("ls copied.bin up.bin")[0] != 0  # nothing reached the sandbox

    own = by(alice, ssh(gw, token))
    assert (own.returncode, own.stdout) == (0, b"in\n"), own.stderr
    assert by(alice, scp).returncode == 0
    result = by(alice, sftp)
    assert result.returncode == 0, result.stderr
    assert sandbox.sh("cmp copied.bin up.bin")[0] == 0
    assert (workdir / alice.name / "down.bin").read_bytes() == (workdir / "payload").read_bytes()


@pytest.mark.parametrize(
    ("source", "host"),
    [
        ("127.0.0.2", "127.0.0.1"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),  # v4-mapped on an IPv6 socket
        ("LAN4", "127.0.0.1"),  # the host's LAN address, towards loopback
        ("LAN4", "LAN4"),
        ("LAN6", "::1"),
        ("LAN6", "LAN6"),
    ],
)
def test_spoofed_source_addresses_are_still_the_local_user(
    gw: Gw,
    sandbox,  # noqa: F811
    students: list[OsUser],
    source: str,
    host: str,
    workdir: Path,  # noqa: F811
) -> None:
    """Attack: B binds another loopback address, ::1, a v4-mapped address or the host's
    own LAN address (IPv4 or IPv6, towards loopback or towards itself), so the gateway
    would take it for a remote client, to which the rule does not apply. B is still
    found as B and refused; A gets in the same way."""
    lan = {"LAN4": lambda: host_address(4), "LAN6": lambda: host_address(6)}
    source = lan[source]() if source in lan else source
    host = lan[host]() if host in lan else host
    alice, bob = students
    token = gw.issue(sandbox, uid=alice.uid)
    relay = workdir / "relay.py"
    relay.write_text(RELAY)
    proxy = f"ProxyCommand=/usr/bin/python3 -S {relay} {source} 0 {host} {gw.port}"
    result = run(as_user(bob, ssh(gw, token, "127.0.0.1", "-o", proxy)))
    assert refused(result), result.stderr
    result = run(as_user(alice, ssh(gw, token, "127.0.0.1", "-o", proxy)))
    assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr


def test_reusing_the_port_of_the_token_owner_does_not_borrow_its_identity(
    gw: Gw,
    sandbox,  # noqa: F811
    students: list[OsUser],
    workdir: Path,  # noqa: F811
) -> None:
    """Attack: A logs in from a fixed source port and closes; B at once connects from the
    same address and port (the same address pair, as far as the gateway can tell) with
    A's token, hoping its owner lookup still finds A. Each connection is looked up anew:
    B is refused, and A, reusing the port after B, still gets in."""
    alice, bob = students
    token = gw.issue(sandbox, uid=alice.uid)
    relay = workdir / "relay.py"
    relay.write_text(RELAY)
    with socket.socket() as probe:
        probe.bind(("127.0.0.5", 0))
        port = probe.getsockname()[1]
    proxy = f"ProxyCommand=/usr/bin/python3 -S {relay} 127.0.0.5 {port} 127.0.0.1 {gw.port}"
    outcomes = []
    for user in (alice, bob, alice, bob):
        result = run(as_user(user, ssh(gw, token, "127.0.0.1", "-o", proxy)))
        outcomes.append((user.name, "in" if result.returncode == 0 else refused(result)))
    # The relay binds the port or fails: a refusal (not a failed connect) came from it.
    in_, out = "in", True
    assert outcomes == [(alice.name, in_), (bob.name, out), (alice.name, in_), (bob.name, out)]


def test_one_students_failed_logins_never_slow_another_down(
    loop: Loop,  # noqa: F811
    workdir: Path,  # noqa: F811
    sandbox,  # noqa: F811
    students: list[OsUser],
) -> None:
    """Attack: student A tries 20 unknown tokens over loopback (where every student and
    the Jupyter tunnel come from; ten once locked everyone out for five minutes). A is
    blocked: its further unknown tokens are answered late. Student B's are answered at
    once, and B's valid token gets in at once; so does A's own."""
    limits = GatewayLimits(max_failures=5, blocked_delay=3.0)
    alice, bob = students
    with Gw(loop, workdir, limits=limits) as gw:
        for _ in range(20):
            assert refused(run(as_user(alice, ssh(gw, generate_token()))))
        failures = gw.gateway.ledger.failures
        assert failures.blocked(f"local uid {alice.uid}")
        started = time.monotonic()
        assert refused(run(as_user(alice, ssh(gw, generate_token()))))
        assert time.monotonic() - started >= limits.blocked_delay

        started = time.monotonic()
        assert refused(run(as_user(bob, ssh(gw, generate_token()))))
        result = run(as_user(bob, ssh(gw, gw.issue(sandbox, uid=bob.uid))))
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
        assert time.monotonic() - started < limits.blocked_delay
        assert not failures.blocked(f"local uid {bob.uid}")
        result = run(as_user(alice, ssh(gw, gw.issue(sandbox, uid=alice.uid))))
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr


def test_a_local_peer_the_kernel_cannot_name_is_refused(
    gw: Gw,
    sandbox,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local client whose socket's owner the kernel does not tell (sock_diag answering
    nothing: made so here, it cannot be provoked) gets no token accepted, not even
    one of the gateway's own user; a remote client would be unaffected."""
    monkeypatch.setattr(peers, "local_peer_uid", lambda *args: None)
    token = gw.issue(sandbox)
    assert refused(run(ssh(gw, token)))
    monkeypatch.undo()
    assert run(ssh(gw, token)).returncode == 0
