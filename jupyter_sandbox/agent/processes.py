"""User commands: ``exec`` tied to a connection (pipes or a pty), ``spawn`` in the background.

Every command is started through the isolation's spawner, so it lands in the
user's pid namespace; pids are reported as the user sees them there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import termios
import threading
import time

import protocol
from channel import AgentError, Channel, start_thread
from files import resolve
from isolation import Isolation
from logs import Log, pump_output
from protocol import CHUNK, Frame

KILL_GRACE = 2.0
PTY_SETTLE = 0.2  # seconds a pty must stay empty after its command exited
MAX_PTY_SIDE = 0xFFFF  # rows and columns are unsigned shorts in struct winsize


class Started:
    """A command's process once it exists; threads started before it wait here."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.proc: subprocess.Popen | None = None

    def set(self, proc: subprocess.Popen | None) -> None:
        self.proc = proc
        self._event.set()

    def wait(self) -> subprocess.Popen | None:
        self._event.wait()
        return self.proc


class OutputPump:
    """Forwards a command's output from `fd` as frames of `kind`, once it is announced.

    When the command exits, what it wrote is forwarded to the end however slowly the
    client takes it (and however late this thread gets to run): until the descriptor
    holds nothing more, bounded by what it can hold plus the chunk in flight. Past that,
    the rest belongs to a background process the command left holding the descriptor,
    and the command's EXIT goes first. Each chunk is read and sent under `lock`, so a
    descriptor found empty under it has nothing on its way either.
    """

    def __init__(self, channel: Channel, fd: int, kind: int, started: Started, owned: bool) -> None:
        self.channel, self.fd, self.kind, self.started = channel, fd, kind, started
        self.owned = owned  # close `fd` at the end
        try:
            self.capacity, self.settle = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ), 0.0
        except OSError:  # a pty: the kernel passes output to its master a little later
            self.capacity, self.settle = CHUNK, PTY_SETTLE
        self.forwarded = 0
        self.lock = threading.Lock()
        self.closed = False
        self.thread = start_thread(self._run)

    def _run(self) -> None:
        try:
            if self.started.wait() is None:
                return
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            while True:
                poller.poll()
                with self.lock:
                    try:
                        data = os.read(self.fd, CHUNK)
                    except OSError:  # EIO on a pty whose last process has gone
                        return
                    if not data:
                        return
                    try:
                        self.channel.send(self.kind, data)
                    except OSError:
                        return
                    self.forwarded += len(data)
        finally:
            with self.lock:
                self.closed = True
                if self.owned:
                    os.close(self.fd)

    def drain(self) -> None:
        """Once the command exited: wait until what it wrote is forwarded (see above)."""
        limit = self.forwarded + self.capacity + CHUNK
        quiet_since = None
        while self.forwarded < limit:
            with self.lock:
                if self.closed:
                    return
                empty = _unread(self.fd) == 0
            now = time.monotonic()
            if not empty:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            if empty and now - quiet_since >= self.settle:
                return
            self.thread.join(0.01)


class Process:
    """A background process started by `spawn`; its output goes to the log."""

    def __init__(self, popen: subprocess.Popen, pid: int, command: str) -> None:
        self.popen = popen
        self.pid = pid  # as the sandbox user sees it
        self.command = command
        self.exit: dict | None = None
        self.done = threading.Event()

    def info(self) -> dict:
        return {
            "pid": self.pid,
            "command": self.command,
            "running": self.exit is None,
            **(self.exit or {"exit_code": None, "signal": None}),
        }


class CommandIO:
    """A command's descriptors: a pty, or pipes for stdin, stdout and stderr.

    ``owned`` holds every descriptor that nobody else has taken over yet; whoever
    opened them closes those, on every path.
    """

    def __init__(self, pty: tuple[int, int] | None, stdin: bool) -> None:
        self.owned: set[int] = set()
        self.master: int | None = None
        try:
            if pty is not None:
                self.master, slave = self._open(os.openpty())
                set_winsize(self.master, *pty)
                self.outputs = [(self.master, Frame.STDOUT)]
                self.stdin, self.child_ends = self.master, [slave]
                self.popen_io = {
                    "stdin": slave,
                    "stdout": slave,
                    "stderr": slave,
                    "preexec_fn": take_controlling_tty,
                }
            else:
                out_read, out_write = self._open(os.pipe())
                err_read, err_write = self._open(os.pipe())
                in_read, self.stdin = self._open(os.pipe()) if stdin else (None, None)
                self.outputs = [(out_read, Frame.STDOUT), (err_read, Frame.STDERR)]
                self.child_ends = [out_write, err_write] + ([in_read] if stdin else [])
                self.popen_io = {
                    "stdin": subprocess.DEVNULL if in_read is None else in_read,
                    "stdout": out_write,
                    "stderr": err_write,
                }
        except BaseException:
            self.close(self.owned)
            raise

    def _open(self, fds: tuple[int, int]) -> tuple[int, int]:
        self.owned.update(fds)
        return fds

    def hand_over(self, fd: int | None) -> None:
        """`fd` is now closed by someone else (the thread that uses it)."""
        if fd is not None and fd != self.master:
            self.owned.discard(fd)

    def close(self, fds) -> None:
        for fd in list(fds):
            self.owned.discard(fd)
            os.close(fd)


class Processes:
    """Starts and tracks the user's commands."""

    def __init__(self, log: Log, isolated: Isolation) -> None:
        self.log = log
        self.isolated = isolated
        self.procs: dict[int, Process] = {}
        self.procs_lock = threading.Lock()

    def op_exec(
        self,
        channel: Channel,
        cmd: str | None = None,
        argv: list | None = None,
        cwd: str | None = None,
        env: dict | None = None,
        pty: dict | None = None,
        timeout: float | None = None,
        stdin: bool = True,
    ) -> None:
        """Run a command tied to this connection; closing the connection kills it.

        Every helper thread starts before the command does: a command that fills the
        sandbox's pid limit (a fork bomb) would otherwise leave none to be had.
        """
        args = command_argv(cmd, argv)
        workdir = working_dir(cwd)
        size = pty_size(pty) if pty is not None else None
        term = pty.get("term", "xterm-256color") if pty is not None else None
        io = CommandIO(size, bool(stdin))
        started, timed_out = Started(), threading.Event()
        pumps, proc = [], None
        try:
            for fd, kind in io.outputs:
                pumps.append(OutputPump(channel, fd, kind, started, owned=fd != io.master))
                io.hand_over(fd)
            start_thread(self._exec_input, channel, started, io.stdin, io.master)
            io.hand_over(io.stdin)
            if timeout:
                start_thread(self._exec_timeout, started, float(timeout), timed_out)
            proc = self.isolated.popen(
                args, cwd=workdir, env=environment(env, term), start_new_session=True, **io.popen_io
            )
            channel.send_json(Frame.RESULT, {"pid": self.isolated.inner_pid(proc.pid)})
        except BaseException:
            if proc is not None:  # started, but nobody is there to see it
                kill_group(proc)
            started.set(None)
            io.close(io.owned)
            raise
        io.close(io.child_ends)
        started.set(proc)
        try:
            returncode = proc.wait()
            for pump in pumps:
                pump.drain()
            status = protocol.exit_status(returncode)
            status["timed_out"] = timed_out.is_set()
            with contextlib.suppress(OSError):
                channel.send_json(Frame.EXIT, status)
        finally:
            io.close(io.owned)

    @staticmethod
    def _exec_input(
        channel: Channel, started: Started, stdin_fd: int | None, master: int | None
    ) -> None:
        """Client frames for a running command; end of connection kills it."""
        proc = started.wait()
        try:
            while proc is not None:
                try:
                    frame = channel.recv()
                except OSError:
                    frame = None
                if frame is None:
                    if proc.poll() is None:
                        terminate_group(proc)
                    return
                kind, payload = frame
                try:
                    if kind == Frame.STDIN and stdin_fd is not None:
                        _write_all(stdin_fd, payload)
                    elif kind == Frame.EOF and master is not None:
                        os.write(master, b"\x04")
                    elif kind == Frame.EOF and stdin_fd is not None:
                        os.close(stdin_fd)
                        stdin_fd = None
                    elif kind == Frame.SIGNAL:
                        signal_group(proc, int(payload or signal.SIGINT))
                    elif kind == Frame.RESIZE and master is not None:
                        set_winsize(master, *pty_size(json.loads(payload)))
                except (OSError, ValueError, TypeError, AgentError):
                    pass
        finally:
            if master is None and stdin_fd is not None:
                os.close(stdin_fd)

    @staticmethod
    def _exec_timeout(started: Started, timeout: float, timed_out: threading.Event) -> None:
        proc = started.wait()
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out.set()
            kill_group(proc)

    def op_spawn(
        self,
        channel: Channel,
        cmd: str | None = None,
        argv: list | None = None,
        cwd: str | None = None,
        env: dict | None = None,
    ) -> None:
        """Start a background process whose output goes to the sandbox log."""
        args = command_argv(cmd, argv)
        proc = self.isolated.popen(
            args,
            cwd=working_dir(cwd),
            env=environment(env),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        command = cmd if cmd is not None else " ".join(args)
        entry = Process(proc, self.isolated.inner_pid(proc.pid), command)
        with self.procs_lock:
            self.procs[entry.pid] = entry
        source = f"proc:{entry.pid}"
        self.log.write(source, "event", f"started: {command}")
        pumps = [
            start_thread(pump_output, self.log, proc.stdout, source, "stdout"),
            start_thread(pump_output, self.log, proc.stderr, source, "stderr"),
        ]
        start_thread(self._reap, entry, pumps, source)
        channel.send_json(Frame.RESULT, entry.info())

    def _reap(self, entry: Process, pumps: list, source: str) -> None:
        returncode = entry.popen.wait()
        for pump in pumps:
            pump.join(0.5)
        entry.exit = protocol.exit_status(returncode)
        self.log.write(source, "event", f"exited with code {entry.exit['exit_code']}")
        entry.done.set()
        with self.log.cond:
            self.log.cond.notify_all()

    def find(self, pid: int) -> Process:
        """The background process the user knows as `pid`."""
        with self.procs_lock:
            entry = self.procs.get(int(pid))
        if entry is None:
            raise AgentError("ProcessNotFound", f"no background process with pid {pid}")
        return entry

    def op_procs(self, channel: Channel) -> None:
        with self.procs_lock:
            procs = [p.info() for p in self.procs.values()]
        channel.send_json(Frame.RESULT, {"processes": procs})

    def op_proc_wait(self, channel: Channel, pid: int, timeout: float | None = None) -> None:
        entry = self.find(pid)
        entry.done.wait(timeout)
        channel.send_json(Frame.RESULT, entry.info())

    def op_proc_signal(self, channel: Channel, pid: int, signal: int = 15) -> None:
        entry = self.find(pid)
        if entry.exit is None:
            signal_group(entry.popen, int(signal))
        channel.send_json(Frame.RESULT, entry.info())


def command_argv(cmd: str | None, argv: list | None) -> list:
    if argv:
        return [str(a) for a in argv]
    if cmd is None:
        raise AgentError("BadRequest", "exec needs cmd or argv")
    return ["/bin/sh", "-c", cmd]


def environment(env: dict | None, term: str | None = None) -> dict:
    merged = dict(os.environ)
    merged.update({str(k): str(v) for k, v in (env or {}).items()})
    if term:
        merged["TERM"] = term
    return merged


def working_dir(cwd: str | None) -> str:
    path = resolve(cwd or ".")
    if not os.path.isdir(path):
        raise AgentError("FileNotFound", f"working directory does not exist: {cwd}")
    return path


def pty_size(pty: object) -> tuple[int, int]:
    """(rows, cols) of a pty request, checked: whole numbers from 0 to 65535."""
    if not isinstance(pty, dict):
        raise AgentError("BadRequest", "pty must be an object")
    size = pty.get("rows", 24), pty.get("cols", 80)
    if not all(type(n) is int and 0 <= n <= MAX_PTY_SIDE for n in size):
        raise AgentError(
            "BadRequest", f"pty rows and cols must be whole numbers from 0 to {MAX_PTY_SIDE}"
        )
    return size


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group until it is empty (it may still be forking)."""
    for _ in range(200):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def terminate_group(proc: subprocess.Popen) -> None:
    """SIGHUP the command's process group, then SIGKILL it if it lingers."""
    signal_group(proc, signal.SIGHUP)
    signal_group(proc, signal.SIGCONT)
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def _unread(fd: int) -> int:
    """Bytes waiting to be read from `fd` (a pipe or a pty master)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
