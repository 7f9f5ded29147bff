"""Keeping the service up: restart it after a crash, stop it on request.

`jupyter-sandbox serve` (and the detached start a client makes when no service
runs) runs this supervisor, which runs the service itself as a child process
(`serve --no-supervisor`). After the child dies by a signal or a non-zero exit
it is started again, after a short backoff, with no client call: the new
service re-adopts the sandboxes and ends those whose deadline passed meanwhile.
The child's own exit 0 (idle, or stopped by SIGTERM) ends the supervisor too.

SIGTERM or SIGINT to the supervisor stop the service cleanly; SIGHUP is passed on
(the service reads its config file again). If the
supervisor itself is killed, the service keeps running on its own and clients
keep finding it through its socket.

The supervisor binds the SSH gateway's port and hands the listening socket to
each service it starts, so the port stays ours while the service restarts: no
other local user can take it and receive the logins (and tokens) meant for the
sandboxes, and logins made meanwhile wait in the queue instead of failing.

The supervisor holds an exclusive lock on its pid file for its whole life, so
there is one per user, and clients can tell "restarting" from "not running".
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .._config import Paths
from .._exits import describe_exit as _describe
from . import ssh_port
from .locks import try_lock

log = logging.getLogger("jupyter_sandbox.supervisor")

# Exit codes of `serve --no-supervisor` that are not crashes.
ALREADY_RUNNING = 3  # another service holds the lock: it is not ours to restart
STORAGE_IN_USE = 4  # the storage belongs to another service: restarting cannot help
GAVE_UP = 5  # this supervisor's own: the service crashed too often in a row

RESTART_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)  # after the 1st, 2nd, ... crash in the window
CRASH_WINDOW = 120.0  # crashes further apart than this do not add up
STOP_TIMEOUT = 60.0  # how long a stopping service may take before it is killed

# Environment variables never handed to the supervisor and the service: the service
# needs none of them, and a process's environment outlives the caller that had them.
_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "KEY", "AUTH")


class SupervisorRunning(RuntimeError):
    """Another supervisor of this user holds the lock."""


def service_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that carry (or give access to) credentials."""
    return {
        name: value
        for name, value in env.items()
        if not any(marker in name.upper() for marker in _SECRET_MARKERS)
    }


_PROGRAM_NAMES = (b"jupyter_sandbox", b"jupyter-sandbox")  # `python -m ...`, the script


def supervisor_pid(paths: Paths) -> int | None:
    """The pid of this user's live supervisor, if one runs."""
    try:
        pid = int(paths.supervisor_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        owner = os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError):
        return None
    # A pid reused since the supervisor died may be a service of ours running alone, or
    # any process that names us in its argv, another user's too: neither counts.
    program = any(name in arg for arg in cmdline[:3] for name in _PROGRAM_NAMES)
    ours = owner == os.getuid() and program and b"serve" in cmdline
    ours = ours and b"--no-supervisor" not in cmdline
    return pid if ours else None


class Supervisor:
    """Runs `serve --no-supervisor` and starts it again whenever it crashes."""

    def __init__(
        self,
        service_args: list[str],
        paths: Paths | None = None,
        ready_fd: int | None = None,
        api_address: tuple[str, int] | None = None,
        keep_env: tuple[str, ...] = (),
    ) -> None:
        self.paths = paths or Paths.default()
        # Credentials the service itself needs (a hub service's JUPYTERHUB_API_TOKEN):
        # passed on where `service_environment` drops every other.
        self.keep_env = keep_env
        self.command = [
            sys.executable,
            "-m",
            "jupyter_sandbox",
            "serve",
            "--no-supervisor",
            *service_args,
        ]
        self.ready_fd = ready_fd
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self._lock_fd: int | None = None
        self.api_address = api_address  # of `serve --tcp`
        self._sockets: dict[str, socket.socket] = {}  # env variable -> socket it names
        self._crashes: collections.deque[float] = collections.deque()

    def _lock(self) -> None:
        fd = try_lock(self.paths.supervisor_file)
        if fd is None:
            pid = supervisor_pid(self.paths)
            whose = "this machine" if self.paths.mode == "system" else "this user"
            raise SupervisorRunning(
                f"a sandbox service is already running for {whose} (supervisor pid {pid})"
            )
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def run(self) -> int:
        """Supervise until the service ends by itself or is stopped; the exit code."""
        if self.paths.mode == "system":
            self.paths.make_system_dirs()
        self._lock()
        self._sockets = self._bind_ports()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        ever_ready = False
        while True:
            ready = threading.Event()
            self.child = self._start(ready)
            if self.stopping:  # asked while it was being started: _stop saw the old one
                self.child.send_signal(signal.SIGTERM)
            returncode = self.child.wait()
            ever_ready = ever_ready or ready.is_set()
            if self.stopping or returncode == 0:
                log.info("supervisor: the service %s; stopping", _describe(returncode))
                return 0
            if not ever_ready or returncode in (ALREADY_RUNNING, STORAGE_IN_USE):
                # The first start failed, or another service took over meanwhile (its
                # message is in the log already): restarting cannot help.
                log.info("supervisor: the service %s; not restarting it", _describe(returncode))
                return returncode if returncode > 0 else 1
            delay = self._backoff(time.monotonic())
            if delay is None:
                log.error(
                    "supervisor: the service crashed %d times in %.0f s (last: %s); not "
                    "restarting it again. The cause is above in this log; the next client "
                    "call or `jupyter-sandbox serve` starts it again.",
                    len(self._crashes),
                    CRASH_WINDOW,
                    _describe(returncode),
                )
                return GAVE_UP
            log.warning(
                "supervisor: the service %s; starting it again in %.2f s",
                _describe(returncode),
                delay,
            )
            if not self._sleep(delay):
                return 0

    def _bind_ports(self) -> dict[str, socket.socket]:
        """The service's listening sockets, held for the supervisor's whole life. Nothing if
        a service runs already (it holds the ports, and the one we start exits at once); one
        that cannot be bound is left to the service (which binds it, or says why not)."""
        if self._service_running():
            return {}
        sockets = {}
        try:
            host, port = ssh_port.configured_address()
            sockets[ssh_port.LISTEN_FD_ENV] = ssh_port.listening_socket(
                self.paths.data_dir / "ssh", host, port
            )
            if self.api_address is not None:
                sockets[ssh_port.API_LISTEN_FD_ENV] = ssh_port.bind_listener(*self.api_address)
        except (OSError, ValueError) as e:
            log.warning("supervisor: cannot bind a port (%s); the service binds its own", e)
        return sockets

    def _service_running(self) -> bool:
        """Does a service hold its lock (one left running by a killed supervisor)?"""
        fd = try_lock(self.paths.lock_file)
        if fd is None:
            return True
        os.close(fd)
        return False

    def _start(self, ready: threading.Event) -> subprocess.Popen:
        read_fd, write_fd = os.pipe()
        env = service_environment(os.environ)
        env.update({name: os.environ[name] for name in self.keep_env if name in os.environ})
        passed = [write_fd]
        for name, sock in self._sockets.items():
            passed.append(sock.fileno())
            env[name] = str(sock.fileno())
        child = subprocess.Popen(
            [*self.command, "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            pass_fds=passed,
            env=env,
        )
        os.close(write_fd)
        threading.Thread(
            target=self._await_ready, args=(read_fd, ready), name="ready", daemon=True
        ).start()
        return child

    def _await_ready(self, read_fd: int, ready: threading.Event) -> None:
        """Wait for the child's line, "ready" or "failed <why>"; pass the first on to our
        starter (a failure too: the starter shows why)."""
        with os.fdopen(read_fd, "rb") as pipe:
            line = pipe.readline(4096)
        if line == b"ready\n":
            ready.set()
        elif not line.startswith(b"failed "):
            return  # the child exited before listening, saying nothing
        fd, self.ready_fd = self.ready_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, line)
            os.close(fd)

    def _backoff(self, now: float) -> float | None:
        """The delay before the next start, or None once the crash limit is reached."""
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - CRASH_WINDOW:
            self._crashes.popleft()
        if len(self._crashes) > len(RESTART_DELAYS):
            return None
        return RESTART_DELAYS[len(self._crashes) - 1]

    def _sleep(self, delay: float) -> bool:
        """Wait `delay` seconds unless asked to stop meanwhile; False if asked."""
        until = time.monotonic() + delay
        while not self.stopping and time.monotonic() < until:
            time.sleep(min(0.05, max(0.0, until - time.monotonic())))
        return not self.stopping

    def _forward(self, signum: int, frame: object) -> None:
        """SIGHUP: the service reads its config file again (`systemctl reload`)."""
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def _stop(self, signum: int, frame: object) -> None:
        """SIGTERM/SIGINT: stop the service cleanly, then exit."""
        if self.stopping:
            return
        self.stopping = True
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            threading.Thread(target=self._kill_if_stuck, args=(child,), daemon=True).start()

    @staticmethod
    def _kill_if_stuck(child: subprocess.Popen) -> None:
        try:
            child.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("supervisor: the service did not stop in %.0f s: killing it", STOP_TIMEOUT)
            child.kill()
