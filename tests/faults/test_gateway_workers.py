"""The SSH gateway as several worker processes on one port (JUPYTER_SANDBOX_SSH_WORKERS):
logins spread over the workers, revocation reaching every worker, a worker or the
service killed with SIGKILL, limits counted for all workers together.

A supervised service of the test's own with three workers, driven by the stock ssh
client; after each test nothing is left: no worker, no sandbox process.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox, SshAccess
from jupyter_sandbox.ssh import GatewayLimits, generate_token
from tests.conftest import UNPINNED_SSH, _alive, _children, _cmdline, wait_for
from tests.faults._supervised import SupervisedService, supervised_service
from tests.security.test_gateway_abuse import close_all, closed, idle_connections

WORKERS = 3
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes of these tests run as root")


def worker_pids(service: SupervisedService) -> list[int]:
    """The gateway workers of the running service."""
    pid = service.service_pid()
    if pid is None:
        return []
    return sorted(p for p in _children(pid) if "jupyter_sandbox.ssh.worker" in _cmdline(p))


def all_workers(service: SupervisedService) -> list[int]:
    """Wait until the service runs all its workers; their pids."""
    found = wait_for(
        lambda: (pids := worker_pids(service)) and len(pids) == WORKERS and pids,
        30,
        message=f"{WORKERS} gateway workers",
    )
    return list(found)


def workers_service(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, seen: set[int], **settings: str
) -> Iterator[SupervisedService]:
    """A supervised service with three gateway workers; none of them, nor any in `seen`
    (workers a test saw before it replaced them), may outlive it."""
    settings["JUPYTER_SANDBOX_SSH_WORKERS"] = str(WORKERS)
    generator = supervised_service(env, monkeypatch, **settings)
    running = next(generator)
    yield running
    seen.update(worker_pids(running))
    with pytest.raises(StopIteration):
        next(generator)
    left = [pid for pid in seen if _alive(pid)]
    assert not left, f"gateway workers left after the service stopped: {left}"


@pytest.fixture
def seen_workers() -> set[int]:
    return set()


@pytest.fixture
def service(separate_service_env, monkeypatch, seen_workers) -> Iterator[SupervisedService]:
    yield from workers_service(separate_service_env, monkeypatch, seen_workers)


@pytest.fixture
def limited_service(separate_service_env, monkeypatch, seen_workers) -> Iterator[SupervisedService]:
    """With low limits: 5 failed logins, 12 logins in progress."""
    yield from workers_service(
        separate_service_env,
        monkeypatch,
        seen_workers,
        JUPYTER_SANDBOX_SSH_MAX_FAILURES="5",
        JUPYTER_SANDBOX_SSH_MAX_STARTUPS="12",
        JUPYTER_SANDBOX_SSH_PER_SOURCE_MAX_STARTUPS="12",
    )


def ssh(access: SshAccess, *command: str, token: str | None = None) -> list[str]:
    """ssh to the gateway with `access`'s token (or `token`)."""
    user = token or access.username
    return ["ssh", "-p", str(access.port), *UNPINNED_SSH, f"{user}@127.0.0.1", *command]


def held_sessions(access: SshAccess, count: int) -> list[subprocess.Popen]:
    """`count` sessions that stay open (each prints "up" once it runs)."""
    procs = [
        subprocess.Popen(ssh(access, "echo up; exec sleep 600"), stdout=subprocess.PIPE)
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout.readline() == b"up\n"
    return procs


def sessions_by_worker(service: SupervisedService, port: int) -> dict[int, int]:
    """How many established gateway connections each worker holds (`ss`)."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    owners = [
        line.split("pid=")[1].split(",")[0] for line in listing.splitlines() if "pid=" in line
    ]
    return dict(collections.Counter(int(pid) for pid in owners))


def ssh_events(sb: Sandbox) -> list[str]:
    return [e.text for e in sb.logs() if e.source == "ssh"]


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_many_concurrent_logins_all_get_in(service: SupervisedService) -> None:
    """Burst: 60 logins at the same instant across three workers; every one gets in, and
    the workers carry no token in their argv or environment."""
    with Sandbox.create() as sb:
        access = sb.expose_ssh()
        pids = all_workers(service)
        procs = [
            subprocess.Popen(ssh(access, "echo in"), stdout=subprocess.PIPE) for _ in range(60)
        ]
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
        assert [p.returncode for p in procs] == [0] * 60 and set(outputs) == {b"in\n"}
        for pid in pids:
            for what in ("cmdline", "environ"):
                assert access.username.encode() not in Path(f"/proc/{pid}/{what}").read_bytes()


def test_revoking_closes_the_sessions_in_every_worker(service: SupervisedService) -> None:
    """Nine live sessions spread over the three workers (each holds some); one revoke
    closes all of them within seconds, and the token no longer logs in."""
    with Sandbox.create() as sb:
        access = sb.expose_ssh()
        pids = all_workers(service)
        procs = held_sessions(access, 9)
        try:
            spread = sessions_by_worker(service, access.port)
            assert sorted(spread) == pids, spread
            revoked_at = time.monotonic()
            assert sb.revoke_ssh() == 1
            for proc in procs:
                proc.wait(timeout=10)
            assert time.monotonic() - revoked_at < 5
            assert subprocess.run(ssh(access, "true"), capture_output=True).returncode == 255
        finally:
            stop_all(procs)


def test_a_killed_worker_is_replaced_and_its_sessions_end_is_logged(
    service: SupervisedService,
) -> None:
    """Fault: SIGKILL to one worker while each serves a session. Its client is
    disconnected, the others keep working, the sandbox's log says the session ended
    and why, the service log says so too, and a new worker takes the dead one's place."""
    with Sandbox.create() as sb:
        access = sb.expose_ssh()
        pids = all_workers(service)
        procs = held_sessions(access, WORKERS)
        try:
            spread = sessions_by_worker(service, access.port)
            assert sorted(spread) == pids, spread
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: sum(p.poll() is not None for p in procs) == 1, 10)
            [dropped] = [p for p in procs if p.poll() is not None]
            assert dropped.returncode == 255
            replaced = all_workers(service)
            assert victim not in replaced and len(set(replaced) & set(pids)) == WORKERS - 1
            why = f"its gateway worker (pid {victim}) was killed by SIGKILL"
            wait_for(lambda: any(why in text for text in ssh_events(sb)), 10)
            assert "was killed by SIGKILL with 1 session(s)" in service.log()
            assert all(p.poll() is None for p in procs if p is not dropped)
            result = subprocess.run(ssh(access, "echo in"), capture_output=True, timeout=60)
            assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
        finally:
            stop_all(procs)


def test_sigkill_of_the_service_leaves_no_worker_behind(
    service: SupervisedService, seen_workers: set[int]
) -> None:
    """Fault: SIGKILL to the service. Its workers die with it at once (no orphan keeps
    serving tokens nobody can revoke any more); the supervisor starts the service and
    new workers, and a token given before the fault logs in again."""
    sb = Sandbox.create(timeout="5m")
    try:
        access = sb.expose_ssh()
        pids = all_workers(service)
        seen_workers.update(pids)
        old = service.kill_service()
        wait_for(lambda: not any(_alive(pid) for pid in pids), 10, message="the workers to die")
        service.wait_back(old)
        assert not set(all_workers(service)) & set(pids)
        result = subprocess.run(ssh(access, "echo in"), capture_output=True, timeout=60)
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
    finally:
        sb.kill()


def test_limits_are_counted_for_all_workers_together(limited_service: SupervisedService) -> None:
    """Attack: five unknown tokens (the limit) then a sixth, and 40 idle connections
    against a start-up limit of 12. Whichever workers they land on, the sixth is slowed
    like one after five in one process, and no more than 12 idle connections are held
    in all."""
    with Sandbox.create() as sb:
        access = sb.expose_ssh()
        all_workers(limited_service)
        for _ in range(5):
            bad = ssh(access, "true", token=generate_token())
            assert subprocess.run(bad, capture_output=True).returncode == 255
        started = time.monotonic()
        bad = ssh(access, "true", token=generate_token())
        assert subprocess.run(bad, capture_output=True).returncode == 255
        assert time.monotonic() - started >= GatewayLimits().blocked_delay

        idle = idle_connections(access.port, 40)
        try:

            def open_ones() -> list[socket.socket]:
                return [s for s in idle if not closed(s)]

            wait_for(lambda: len(open_ones()) <= 12, 20, message="the limit to bite")
            assert len(open_ones()) == 12
            result = subprocess.run(ssh(access, "echo in"), capture_output=True, timeout=60)
            assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr
        finally:
            close_all(idle)
