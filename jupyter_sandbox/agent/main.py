"""The agent: runs inside every sandbox and does all work there (stdlib only).

Started by the backend as ``python3 -E -s -S main.py FD`` with the listening
Unix socket inherited as file descriptor FD. Each accepted connection carries
one request (see ``protocol``) and is served by its own thread. Everything the
agent does (processes, files, TCP connections) happens inside the sandbox's
namespaces and as the sandbox user: a path or an address given by a client
can only ever reach what the sandbox itself can reach.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from functools import partial

import isolation
import protocol
from protocol import CHUNK, Frame

LOG_DIR = protocol.STATE_MOUNT
LOG_LIMIT = 1 << 20
RING_SIZE = 20000
PIPE_CHUNK = 1 << 20
KILL_GRACE = 2.0


class AgentError(Exception):
    """An error reported to the client as an ERROR frame."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Channel:
    """One client connection: a request line, then frames both ways."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=CHUNK)
        self._send_lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"") -> None:
        data = protocol.encode(kind, payload)
        with self._send_lock:
            self.sock.sendall(data)

    def send_json(self, kind: int, obj: object) -> None:
        self.send(kind, json.dumps(obj, separators=(",", ":")).encode())

    def recv(self) -> tuple[int, bytes] | None:
        """Next frame from the client, or None at end of stream."""
        header = self.rfile.read(protocol.HEADER.size)
        if len(header) < protocol.HEADER.size:
            return None
        kind, size = protocol.HEADER.unpack(header)
        payload = self.rfile.read(size) if size else b""
        if len(payload) < size:
            return None
        return kind, payload

    def receive_pipe(self) -> int:
        """Ask for and receive a pipe end; bulk data then bypasses the frames."""
        self.send(Frame.FD)
        _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
        if len(fds) != 1 or not stat.S_ISFIFO(os.fstat(fds[0]).st_mode):
            for fd in fds:
                os.close(fd)
            raise AgentError("BadRequest", "expected exactly one pipe")
        return fds[0]

    def data_frames(self):
        """Payloads of DATA frames until END; raises if the stream stops early."""
        while True:
            frame = self.recv()
            if frame is None:
                raise AgentError("ConnectionLost", "client closed the stream before END")
            kind, payload = frame
            if kind == Frame.END:
                return
            if kind == Frame.DATA:
                yield payload


class Log:
    """The sandbox log: background output and events, a ring in memory and a tail on disk."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "log.jsonl")
        self.ring: collections.deque = collections.deque(maxlen=RING_SIZE)
        self.seq = 0
        self.cond = threading.Condition()
        self._load()

    def _load(self) -> None:
        for path in (self.path + ".1", self.path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                        except ValueError:
                            continue
                        self.ring.append(entry)
                        self.seq = max(self.seq, entry.get("seq", 0))
            except OSError:
                pass

    def write(self, source: str, stream: str, text: str) -> None:
        with self.cond:
            self.seq += 1
            entry = {
                "seq": self.seq,
                "time": time.time(),
                "source": source,
                "stream": stream,
                "text": text,
            }
            self.ring.append(entry)
            try:
                if os.path.getsize(self.path) > LOG_LIMIT:
                    os.replace(self.path, self.path + ".1")
            except OSError:
                pass
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError:
                pass
            self.cond.notify_all()

    def _since(self, seq: int) -> list:
        """Entries after `seq`; the ring holds consecutive numbers, so slice, don't scan."""
        if not self.ring:
            return []
        start = max(0, seq + 1 - self.ring[0]["seq"])
        entries = list(itertools.islice(self.ring, start, None))
        if entries and entries[0]["seq"] != max(seq + 1, self.ring[0]["seq"]):
            return [e for e in self.ring if e["seq"] > seq]  # not consecutive after all
        return entries

    def _newer(self, seq: int, until) -> bool:
        return self.seq > seq or bool(until and until())

    def follow(self, after: int, tail: int | None, follow: bool, source: str | None, until=None):
        """Entries newer than `after` (or the last `tail`), then new ones while `follow`."""
        with self.cond:
            entries = [
                e
                for e in self.ring
                if e["seq"] > after and (source is None or e["source"] == source)
            ]
        if tail is not None:
            entries = entries[-tail:] if tail else []
        yield from entries
        last = entries[-1]["seq"] if entries else (self.seq if tail is not None else after)
        while follow:
            with self.cond:
                self.cond.wait_for(partial(self._newer, last, until), timeout=1.0)
                new = self._since(last)
                finished = until is not None and until()
            for entry in new:
                last = entry["seq"]
                if source is None or entry["source"] == source:
                    yield entry
            if finished and not new:
                return
            if not new:
                yield None  # lets the caller notice a closed client


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


class Agent:
    def __init__(self, isolated: isolation.Isolation) -> None:
        self.isolated = isolated
        self.log = Log(LOG_DIR)
        self.procs: dict[int, Process] = {}
        self.procs_lock = threading.Lock()
        self.started = time.time()

    # -- plumbing ---------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            try:
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: the sandbox hit its pid limit
                conn.close()

    def handle(self, conn: socket.socket) -> None:
        channel = Channel(conn)
        try:
            line = channel.rfile.readline(1 << 20)
            if not line:
                return
            request = json.loads(line)
            handler = getattr(self, "op_" + str(request.pop("op", "")), None)
            if handler is None:
                raise AgentError("BadRequest", "unknown operation")
            handler(channel, **request)
        except AgentError as e:
            self._report(channel, e.kind, str(e))
        except FileNotFoundError as e:
            self._report(channel, "FileNotFound", f"no such file or directory: {e.filename}")
        except FileExistsError as e:
            self._report(channel, "FileExists", f"already exists: {e.filename}")
        except PermissionError as e:
            self._report(channel, "PermissionDenied", f"permission denied: {e.filename}")
        except (IsADirectoryError, NotADirectoryError, OSError) as e:
            self._report(channel, "FileError", f"{e.strerror or e}: {getattr(e, 'filename', '')}")
        except (TypeError, ValueError, KeyError) as e:
            self._report(channel, "BadRequest", f"bad request: {e}")
        except RuntimeError as e:  # typically: can't start a thread at the pid limit
            self._report(channel, "SandboxError", f"the sandbox is out of resources: {e}")
        finally:
            # shutdown() ends the connection for the peer even while a file object
            # made from the socket (or a lingering pump thread) still refers to it.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _report(channel: Channel, kind: str, message: str) -> None:
        try:
            channel.send_json(Frame.ERROR, {"type": kind, "message": message})
        except OSError:
            pass

    # -- processes ----------------------------------------------------------------

    @staticmethod
    def _argv(cmd: str | None, argv: list | None) -> list:
        if argv:
            return [str(a) for a in argv]
        if cmd is None:
            raise AgentError("BadRequest", "exec needs cmd or argv")
        return ["/bin/sh", "-c", cmd]

    @staticmethod
    def _env(env: dict | None, term: str | None = None) -> dict:
        merged = dict(os.environ)
        merged.update({str(k): str(v) for k, v in (env or {}).items()})
        if term:
            merged["TERM"] = term
        return merged

    @staticmethod
    def _cwd(cwd: str | None) -> str:
        path = resolve(cwd or ".")
        if not os.path.isdir(path):
            raise AgentError("FileNotFound", f"working directory does not exist: {cwd}")
        return path

    def op_ping(self, channel: Channel) -> None:
        channel.send_json(
            Frame.RESULT,
            {"version": protocol.VERSION, "pid": os.getpid(), "uptime": time.time() - self.started},
        )

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
        args = self._argv(cmd, argv)
        workdir = self._cwd(cwd)
        started = Started()
        if pty is not None:
            master, slave = os.openpty()
            set_winsize(master, pty.get("rows", 24), pty.get("cols", 80))
            outputs = [(master, Frame.STDOUT)]
            stdin_fd, child_ends = master, [slave]
            io = {
                "stdin": slave,
                "stdout": slave,
                "stderr": slave,
                "preexec_fn": take_controlling_tty,
            }
            term = pty.get("term", "xterm-256color")
        else:
            master, term = None, None
            out_read, out_write = os.pipe()
            err_read, err_write = os.pipe()
            in_read, stdin_fd = os.pipe() if stdin else (subprocess.DEVNULL, None)
            outputs = [(out_read, Frame.STDOUT), (err_read, Frame.STDERR)]
            child_ends = [out_write, err_write] + ([in_read] if stdin else [])
            io = {"stdin": in_read, "stdout": out_write, "stderr": err_write}
        timed_out = threading.Event()
        pumps = [
            _thread(self._pump_fd, channel, fd, kind, started, master is None)
            for fd, kind in outputs
        ]
        _thread(self._exec_input, channel, started, stdin_fd, master)
        if timeout:
            _thread(self._exec_timeout, started, float(timeout), timed_out)
        proc = None
        try:
            proc = self.isolated.popen(
                args, cwd=workdir, env=self._env(env, term), start_new_session=True, **io
            )
            channel.send_json(Frame.RESULT, {"pid": self.isolated.inner_pid(proc.pid)})
        except BaseException:
            if proc is not None:  # started, but nobody is there to see it
                kill_group(proc)
            started.set(None)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        started.set(proc)
        returncode = proc.wait()
        for pump in pumps:
            pump.join(0.2 if master is None else 1.0)
        status = protocol.exit_status(returncode)
        status["timed_out"] = timed_out.is_set()
        with contextlib.suppress(OSError):
            channel.send_json(Frame.EXIT, status)
        if master is not None:
            os.close(master)

    @staticmethod
    def _pump_fd(channel: Channel, fd: int, kind: int, started: Started, owned: bool) -> None:
        """Forward output once the command is announced; close `fd` at its end if `owned`."""
        try:
            if started.wait() is None:
                return
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:  # EIO on a pty whose last process has gone
                    return
                if not data:
                    return
                try:
                    channel.send(kind, data)
                except OSError:
                    return
        finally:
            if owned:
                os.close(fd)

    def _exec_input(
        self, channel: Channel, started: Started, stdin_fd: int | None, master: int | None
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
                        size = json.loads(payload)
                        set_winsize(master, size["rows"], size["cols"])
                except (OSError, ValueError):
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
        args = self._argv(cmd, argv)
        proc = self.isolated.popen(
            args,
            cwd=self._cwd(cwd),
            env=self._env(env),
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
            _thread(self._pump_log, proc.stdout, source, "stdout"),
            _thread(self._pump_log, proc.stderr, source, "stderr"),
        ]
        _thread(self._reap, entry, pumps, source)
        channel.send_json(Frame.RESULT, entry.info())

    def _pump_log(self, pipe, source: str, stream: str) -> None:
        for line in iter(pipe.readline, b""):
            self.log.write(source, stream, line.decode("utf-8", "replace"))
        pipe.close()

    def _reap(self, entry: Process, pumps: list, source: str) -> None:
        returncode = entry.popen.wait()
        for pump in pumps:
            pump.join(0.5)
        entry.exit = protocol.exit_status(returncode)
        self.log.write(source, "event", f"exited with code {entry.exit['exit_code']}")
        entry.done.set()
        with self.log.cond:
            self.log.cond.notify_all()

    def _proc(self, pid: int) -> Process:
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
        entry = self._proc(pid)
        entry.done.wait(timeout)
        channel.send_json(Frame.RESULT, entry.info())

    def op_proc_signal(self, channel: Channel, pid: int, signal: int = 15) -> None:
        entry = self._proc(pid)
        if entry.exit is None:
            signal_group(entry.popen, int(signal))
        channel.send_json(Frame.RESULT, entry.info())

    def op_note(self, channel: Channel, text: str, source: str = "service") -> None:
        """Record an event (an SSH login, say) in the sandbox log."""
        self.log.write(str(source), "event", str(text))
        channel.send_json(Frame.RESULT, {})

    def op_logs(
        self,
        channel: Channel,
        after: int = 0,
        tail: int | None = None,
        follow: bool = False,
        pid: int | None = None,
    ) -> None:
        """Log entries as RESULT frames; with `follow`, until the client goes away."""
        source, until = None, None
        if pid is not None:
            entry = self._proc(pid)
            source, until = f"proc:{entry.pid}", entry.done.is_set
        channel.sock.settimeout(None)
        for item in self.log.follow(int(after), tail, bool(follow), source, until):
            if item is None:
                if client_gone(channel.sock):
                    return
                continue
            channel.send_json(Frame.RESULT, item)
        channel.send(Frame.END)

    # -- files ----------------------------------------------------------------------

    def op_stat(self, channel: Channel, path: str) -> None:
        channel.send_json(Frame.RESULT, describe(resolve(path)))

    def op_list(self, channel: Channel, path: str) -> None:
        base = resolve(path)
        entries = []
        with os.scandir(base) as it:
            for item in it:
                entries.append(describe(item.path))
        entries.sort(key=lambda e: e["name"])
        channel.send_json(Frame.RESULT, {"entries": entries})

    def op_mkdir(
        self,
        channel: Channel,
        path: str,
        parents: bool = True,
        exist_ok: bool = True,
        mode: int = 0o755,
    ) -> None:
        target = resolve(path)
        if parents:
            os.makedirs(target, mode, exist_ok=exist_ok)
        else:
            os.mkdir(target, mode)
        channel.send_json(Frame.RESULT, describe(target))

    def op_remove(self, channel: Channel, path: str, recursive: bool = False) -> None:
        target = resolve(path)
        if os.path.isdir(target) and not os.path.islink(target):
            if recursive:
                import shutil  # imported on use: agent start-up time counts

                shutil.rmtree(target)
            else:
                os.rmdir(target)
        else:
            os.unlink(target)
        channel.send_json(Frame.RESULT, {})

    def op_rename(self, channel: Channel, src: str, dst: str) -> None:
        target = resolve(dst)
        os.replace(resolve(src), target)
        channel.send_json(Frame.RESULT, describe(target))

    def op_read(self, channel: Channel, path: str, pipe: bool = False) -> None:
        """Send a file: as DATA frames, or with `pipe` into a pipe the client passes."""
        target = resolve(path)
        with open(target, "rb") as f:
            info = describe(target)
            if info["type"] != "file":
                raise AgentError("FileError", f"not a regular file: {path}")
            channel.send_json(Frame.RESULT, info)
            if pipe:
                out = channel.receive_pipe()
                try:
                    while os.sendfile(out, f.fileno(), None, PIPE_CHUNK):
                        pass
                finally:
                    os.close(out)
            else:
                while data := f.read(CHUNK):
                    channel.send(Frame.DATA, data)
        channel.send(Frame.END)

    def op_write(
        self,
        channel: Channel,
        path: str,
        mode: int | None = None,
        parents: bool = True,
        pipe: bool = False,
    ) -> None:
        """Receive a file into `path`, atomically: DATA frames until END, or a pipe."""
        target = resolve(path)
        directory = os.path.dirname(target)
        if parents:
            os.makedirs(directory, exist_ok=True)
        if os.path.isdir(target):
            raise AgentError("FileError", f"is a directory: {path}")
        tmp = os.path.join(
            directory, f".{os.path.basename(target)}.upload-{os.getpid()}-{threading.get_ident()}"
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                if pipe:
                    source = channel.receive_pipe()
                    try:
                        write_with_fresh_process(source, fd)
                    finally:
                        os.close(source)
                else:
                    for data in channel.data_frames():
                        f.write(data)
            os.chmod(tmp, 0o644 if mode is None else int(mode) & 0o7777)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        channel.send_json(Frame.RESULT, describe(target))

    def op_tar_out(self, channel: Channel, path: str, pipe: bool = False) -> None:
        """Send `path` (file or tree) as a tar stream; symlinks stay symlinks."""
        target = resolve(path)
        channel.send_json(Frame.RESULT, describe(target))
        writer = os.fdopen(channel.receive_pipe(), "wb") if pipe else FrameWriter(channel)
        import tarfile  # imported on use: agent start-up time counts

        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if os.path.isdir(target) and not os.path.islink(target):
                for name in sorted(os.listdir(target)):
                    tar.add(os.path.join(target, name), arcname=name, recursive=True)
            else:
                tar.add(target, arcname=os.path.basename(target), recursive=False)
        writer.flush()
        if pipe:
            writer.close()
        channel.send(Frame.END)

    def op_tar_in(self, channel: Channel, path: str, pipe: bool = False) -> None:
        """Unpack a tar stream into directory `path`, refusing names that leave it."""
        root = resolve(path)
        os.makedirs(root, exist_ok=True)
        reader = os.fdopen(channel.receive_pipe(), "rb") if pipe else FrameReader(channel)
        count = 0
        import tarfile

        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                protocol.check_tar_member(root, member)
                tar.extract(member, root, set_attrs=not member.issym())
                count += 1
        drain(reader)
        if pipe:
            reader.close()
        channel.send_json(Frame.RESULT, {"files": count})

    # -- network ----------------------------------------------------------------------

    def op_connect(
        self, channel: Channel, host: str = "127.0.0.1", port: int = 0, path: str | None = None
    ) -> None:
        """Open a TCP (or Unix) connection from inside the sandbox, then relay raw bytes."""
        if path is not None:
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(resolve(path))
        else:
            peer = socket.create_connection((host, int(port)), timeout=10)
            peer.settimeout(None)
        channel.send_json(Frame.RESULT, {"connected": True})
        relay(channel.sock, peer, channel.rfile)


# -- helpers -------------------------------------------------------------------------


def resolve(path: str) -> str:
    """A path as the sandbox user means it: relative to the home directory."""
    if not isinstance(path, str) or "\x00" in path:
        raise AgentError("BadRequest", "path must be a string without NUL bytes")
    return os.path.normpath(os.path.join(protocol.SANDBOX_HOME, os.path.expanduser(path)))


def describe(path: str) -> dict:
    st = os.lstat(path)
    kind = (
        "dir"
        if stat.S_ISDIR(st.st_mode)
        else "file"
        if stat.S_ISREG(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else "other"
    )
    return {
        "name": os.path.basename(path) or path,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "target": os.readlink(path) if kind == "symlink" else None,
    }


class FrameWriter:
    """A write-only file object that sends DATA frames."""

    def __init__(self, channel: Channel) -> None:
        self.channel, self.buffer = channel, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.channel.send(Frame.DATA, bytes(self.buffer))
            self.buffer.clear()


class FrameReader:
    """A read-only file object over DATA frames until END."""

    def __init__(self, channel: Channel) -> None:
        self.frames = channel.data_frames()
        self.pending = b""
        self.finished = False

    def read(self, size: int = -1) -> bytes:
        while not self.finished and (size < 0 or len(self.pending) < size):
            chunk = next(self.frames, None)
            if chunk is None:
                self.finished = True
            else:
                self.pending += chunk
        if size < 0:
            size = len(self.pending)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


def write_with_fresh_process(source: int, target: int) -> None:
    """Copy a pipe into a file with a short-lived `cat`.

    Linux throttles a process by how many pages it has dirtied so far, so a
    long-lived agent writing its third large upload crawls at the disk's pace
    while a fresh process writes into the page cache at memory speed.
    """
    done = subprocess.run(["cat"], stdin=source, stdout=target, stderr=subprocess.PIPE)
    if done.returncode:
        raise AgentError("FileError", done.stderr.decode(errors="replace").strip())


def drain(reader) -> None:
    """Read a stream to its end (tar leaves padding behind the last member)."""
    while reader.read(CHUNK):
        pass


def relay(client: socket.socket, peer: socket.socket, client_file) -> None:
    """Copy bytes both ways until both sides are done."""

    def upstream() -> None:
        try:
            while data := client_file.read1(CHUNK):
                peer.sendall(data)
        except OSError:
            pass
        _shutdown(peer, socket.SHUT_WR)

    thread = _thread(upstream)
    try:
        while data := peer.recv(CHUNK):
            client.sendall(data)
    except OSError:
        pass
    _shutdown(client, socket.SHUT_WR)
    thread.join()
    peer.close()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def client_gone(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def watch_user_init(agent: Agent) -> None:
    """End the agent, and so the sandbox, when the user init is gone."""
    status = agent.isolated.wait_user_init()
    message = f"the sandbox's init process ended (wait status {status}): the sandbox stops"
    agent.log.write("agent", "event", message)
    print(message, file=sys.stderr, flush=True)
    os._exit(protocol.EXIT_USER_INIT_LOST)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    listen_fd = int(sys.argv[1])
    lockdown_fd = int(sys.argv[2]) if len(sys.argv) > 2 else None
    keep = sorted({listen_fd, lockdown_fd or listen_fd})
    for low, high in zip([2, *keep], [*keep, 1 << 16]):
        os.closerange(low + 1, high)  # descriptors bwrap was handed for the setup only
    lockdown = isolation.read_filter(lockdown_fd) if lockdown_fd is not None else None
    try:
        isolated = isolation.enter(lockdown)
    except isolation.SetupError as e:
        sys.exit(f"sandbox agent: cannot isolate itself from user code: {e}")
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    os.chdir(protocol.SANDBOX_HOME)
    sys.stdin.close()
    agent = Agent(isolated)
    _thread(watch_user_init, agent)
    agent.serve(listener)


if __name__ == "__main__":
    main()
