"""SIGKILL of the service at the worst moments: only typed errors, nothing lost.

A real service under its supervisor, real sandboxes, the real `ssh` client. The
service is killed while an upload, a download, a command's output, a log follow,
a create or an interactive SSH session is in flight. After each: the error the
caller gets is a ServiceUnavailable that says what happened to the call and what
to do; every file written before the fault is intact; the service is back with
no client call; the same client object and the same SSH token work again; and
nothing is left behind (checked by the fixture once the supervisor tree stops).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox, ServiceUnavailable
from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config
from jupyter_sandbox.client._sync import portal
from tests.conftest import _alive, wait_for
from tests.faults._supervised import SupervisedService, supervised_service

pytestmark = pytest.mark.unprivileged

BIG = 64 << 20
RESTARTING = "it is restarting, and keeps the sandboxes and their files"


@pytest.fixture
def service(separate_service_env, monkeypatch) -> Iterator[SupervisedService]:
    yield from supervised_service(separate_service_env, monkeypatch)


@pytest.fixture
def sb(service) -> Iterator[Sandbox]:
    """A sandbox holding files written before any fault."""
    with Sandbox.create(timeout="10m") as sandbox:
        sandbox.fs.write_text("notes.txt", "written before the fault\n")
        sandbox.fs.write_bytes("big.bin", b"the old contents\n")
        sandbox.sh("mkdir -p tree && seq 1 1000 > tree/numbers")
        yield sandbox


def checksums(sb: Sandbox) -> str:
    return sb.sh("find . -type f ! -name '.*' | sort | xargs sha256sum").stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_when(service: SupervisedService, reached: Callable[[int], bool]) -> Callable:
    """A progress callback that SIGKILLs the service once, when `reached(done)`."""
    killed: list[int] = []

    def progress(done: int, total: int | None) -> None:
        if not killed and reached(done):
            killed.append(service.kill_service())

    progress.killed = killed
    return progress


def back(service: SupervisedService, killed: list[int]) -> None:
    """The service replaced the killed one, with no client call."""
    assert killed, "the fault never happened"
    service.wait_back(killed[0])


def typed(error: pytest.ExceptionInfo, during: str, outcome: str) -> None:
    """The error says what happened and what to do, and carries no HTTP-layer chain."""
    assert type(error.value) is ServiceUnavailable
    message = str(error.value)
    assert message == f"the sandbox service stopped during {during}; {RESTARTING}; {outcome}"
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_kill_mid_upload(service, sb, tmp_path):
    """The HTTP path (the one clients on another machine or as another user take)."""
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(BIG))
    before = checksums(sb)
    sb.fs._fs._direct_transfer = False
    progress = kill_when(service, lambda done: done >= BIG // 4)
    with pytest.raises(ServiceUnavailable) as error:
        sb.fs.upload(local, "big.bin", progress=progress)
    typed(error, "the upload", "the upload did not complete: run it again")
    wait_for(lambda: not _open_here(local), 10, message="the upload to let go of the local file")
    back(service, progress.killed)
    assert checksums(sb) == before  # the old big.bin too: nothing half-written replaced it
    assert not sb.sh("find . -name '*.upload-*'").stdout  # nor is a partial copy left
    sb.fs.upload(local, "big.bin")
    assert sb.sh("sha256sum < big.bin").stdout.split()[0] == sha256(local)


def _open_here(path: Path) -> bool:
    """Does this process still hold `path` open?"""
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fds / fd) == str(path) for fd in os.listdir(fds))


def test_kill_mid_upload_straight_to_the_agent(service, sb, tmp_path):
    """A client on the service's machine sends bulk data to the agent itself: the
    service dying meanwhile does not even interrupt the upload."""
    if portal().call(sb.fs._fs._direct()) is None:
        pytest.skip("this process cannot reach the agent's socket")
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(BIG))
    progress = kill_when(service, lambda done: done >= BIG // 4)
    sb.fs.upload(local, "big.bin", progress=progress)
    back(service, progress.killed)
    assert sb.sh("sha256sum < big.bin").stdout.split()[0] == sha256(local)
    assert sb.fs.read_text("notes.txt") == "written before the fault\n"


def test_kill_mid_download(service, sb, tmp_path):
    sb.sh(f"head -c {BIG} /dev/urandom > download.bin")
    remote_sum = sb.sh("sha256sum < download.bin").stdout.split()[0]
    before = checksums(sb)
    (tmp_path / "local").mkdir()
    local = tmp_path / "local" / "download.bin"
    local.write_text("a local file the download would replace\n")
    sb.fs._fs._direct_transfer = False
    progress = kill_when(service, lambda done: done >= BIG // 4)
    with pytest.raises(ServiceUnavailable) as error:
        sb.fs.download("download.bin", local, progress=progress)
    typed(error, "the download", "the download did not complete: run it again")
    assert local.read_text() == "a local file the download would replace\n"
    assert [p.name for p in local.parent.iterdir()] == ["download.bin"]  # no temp file
    back(service, progress.killed)
    assert checksums(sb) == before
    sb.fs.download("download.bin", local)
    assert sha256(local) == remote_sum


def test_kill_mid_command_output(service, sb):
    before = checksums(sb)
    lines: list[str] = []

    def on_stdout(line: str) -> None:
        lines.append(line)
        if len(lines) == 20:
            service.kill_service()

    killed_at = service.service_pid()
    with pytest.raises(ServiceUnavailable) as error:
        sb.sh(
            "i=0; while true; do i=$((i+1)); echo counted-$i; sleep 0.01; done", on_stdout=on_stdout
        )
    typed(
        error,
        "the command",
        "the command was stopped with it and its output from then on is lost: run it again "
        "(work started with spawn() outlives the service)",
    )
    assert lines[:20] == [f"counted-{i}\n" for i in range(1, 21)]
    back(service, [killed_at])
    # The same handle works again, and the command did stop with the service.
    wait_for(
        lambda: "counted-" not in sb.sh("ps -eo args").stdout,
        10,
        message="the cut-off command to stop",
    )
    assert checksums(sb) == before


def test_kill_mid_log_follow(service, sb):
    sb.spawn("i=0; while true; do i=$((i+1)); echo beat-$i; sleep 0.05; done")
    seen: list[str] = []
    killed_at = service.service_pid()
    with pytest.raises(ServiceUnavailable) as error:
        for entry in sb.logs(follow=True):
            if entry.text.startswith("beat-"):
                seen.append(entry.text)
                if len(seen) == 10:
                    service.kill_service()
    typed(error, "the log stream", "the sandbox's log is kept: read or follow it again")
    back(service, [killed_at])
    # The log kept what was followed, and the process, which outlives the service, goes on.
    wait_for(
        lambda: len([e for e in sb.logs() if e.text.startswith("beat-")]) > len(seen) + 20,
        15,
        message="the background process to go on writing to the log",
    )
    logged = [e.text for e in sb.logs() if e.text.startswith("beat-")]
    assert logged[: len(seen)] == seen


def test_kill_mid_create(service):
    """A create cut off halfway: the caller hears it may or may not have happened, and
    a half-made sandbox is cleaned up by the restarted service."""
    sandboxes = service.storage / "sandboxes"
    Sandbox.list()
    killed: list[int] = []

    def kill_once_started() -> None:
        wait_for(lambda: sandboxes.exists() and any(sandboxes.iterdir()), 30, interval=0.002)
        killed.append(service.kill_service())

    killer = threading.Thread(target=kill_once_started)
    killer.start()
    with pytest.raises(ServiceUnavailable) as error:
        Sandbox.create(timeout="10m")
    killer.join()
    typed(
        error,
        "the creation of a sandbox",
        "the sandbox may or may not have been created: check Sandbox.list() before creating "
        "another",
    )
    back(service, killed)
    listed = Sandbox.list()
    assert len(listed) <= 1
    for info in listed:  # if it was made, it is whole and usable
        assert Sandbox.connect(info.id).sh("echo whole").stdout == "whole\n"
        Sandbox.connect(info.id).kill()
    wait_for(lambda: not any(sandboxes.iterdir()), 15, message="no half-made sandbox left")


def test_calls_while_the_service_is_down_wait_for_it_and_are_not_repeated(service, sb):
    """A long-poll (safe to repeat) cut by the kill is sent again and returns; a spawn
    made while the service is down goes through once it is back, exactly once."""
    process = sb.spawn("sleep 2; exit 7")
    result: list[int | None] = []
    waiter = threading.Thread(target=lambda: result.append(process.wait(30)))
    waiter.start()
    wait_for(lambda: _in_flight(sb), 10, message="the wait to be in flight")
    supervisor = service.supervisor_pid()
    os.kill(supervisor, signal.SIGSTOP)  # hold the restart back while calls are made
    try:
        old = service.kill_service()
        spawned: list = []
        spawner = threading.Thread(target=lambda: spawned.append(sb.spawn("echo once >> once")))
        spawner.start()
        spawner.join(1.0)
        assert spawner.is_alive(), "the spawn did not wait for the service"
    finally:
        os.kill(supervisor, signal.SIGCONT)
    service.wait_back(old)
    spawner.join(30)
    waiter.join(30)
    assert result == [7]
    assert len(spawned) == 1
    wait_for(lambda: sb.fs.exists("once"), 10, message="the spawned command to run")
    assert sb.fs.read_text("once") == "once\n"
    assert sb.fs.read_text("notes.txt") == "written before the fault\n"


def test_a_call_right_after_a_crash_waits_for_the_restarted_service(service, sb):
    """The client's kept-alive connections lead to the dead service: a command made at
    once must not be sent on one of them (and be reported lost), but wait and go through."""
    assert sb.sh("echo before").stdout == "before\n"
    old = service.service_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not _alive(old), 10, interval=0.001, message="the service to die")
    assert sb.sh("echo after").stdout == "after\n"
    assert service.service_pid() not in (None, old)


def _in_flight(sb: Sandbox) -> bool:
    """Is a request of this client on its way (httpx's pool has a busy connection)?"""
    client = sb._inner._transport._client
    pool = client._transport._pool.connections if client is not None else []
    return any(not connection.is_idle() for connection in pool)


def test_kill_with_an_interactive_ssh_session_open(service, sb, tmp_path):
    access = sb.expose_ssh()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(access.known_hosts_line + "\n")
    config = tmp_path / "ssh_config"
    write_ssh_config(config, access.hostname, access.port, access.username, known_hosts)
    ssh = ["ssh", "-F", str(config), "-o", "BatchMode=yes"]
    session = subprocess.Popen(
        [*ssh, "-tt", HOST_ALIAS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        session.stdin.write(b"echo typed in the session > typed.txt; echo DONE-$((6*7))\n")
        session.stdin.flush()
        output = b""
        while b"DONE-42" not in output:
            chunk = session.stdout.read1(4096)
            assert chunk, f"the session ended early: {session.stderr.read()!r}"
            output += chunk
        old = service.kill_service()
        # The session ends at once (it ran through the service), not after a timeout.
        assert session.wait(15) == 255
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    service.wait_back(old)
    assert service.runtime()["ssh_port"] == access.port
    # The same command, token, port and pinned host key work again.
    again = subprocess.run(
        [*ssh, HOST_ALIAS, "cat typed.txt notes.txt"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == "typed in the session\nwritten before the fault\n"
    assert sb.fs.read_text("typed.txt") == "typed in the session\n"
