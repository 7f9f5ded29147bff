"""Bulk transfers straight to a sandbox's agent, through pipes the kernel copies.

A client on the service's own machine (the same OS user) may connect to the
agent's socket directly. It hands the agent one end of a pipe (SCM_RIGHTS) and
the kernel moves the bytes with splice/sendfile: no HTTP, no copies through
Python, no file descriptor of the host's files ever enters the sandbox. Where
the agent socket cannot be reached, the caller falls back to HTTP streaming.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._errors import FileError, SandboxError, SandboxExpired
from ..agent import protocol
from ..agent.protocol import Frame
from ..agent.remote import raise_agent_error
from ._tar import add_tree, extract_tree

Progress = Callable[[int, "int | None"], None]
PIPE_SIZE = 1 << 20
PROGRESS_INTERVAL = 0.1


class DirectTransfer:
    """File transfers of one sandbox over its agent socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def usable(self) -> bool:
        """Can this process talk to the agent (same machine, same user), and pass pipes?"""
        try:
            with self._connect() as sock:
                sock.sendall(protocol.request_line("ping"))
                return _expect(sock, Frame.RESULT).get("version", 0) >= protocol.PIPE_VERSION
        except (OSError, SandboxError):
            return False

    @contextlib.contextmanager
    def _connect(self) -> Iterator[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
            yield sock
        finally:
            sock.close()

    @contextlib.contextmanager
    def _request(self, op: str, **args: Any) -> Iterator[socket.socket]:
        with self._connect() as sock:
            sock.sendall(protocol.request_line(op, pipe=True, **args))
            yield sock

    def upload_file(self, local: Path, remote: str, progress: Progress | None) -> dict:
        mode = local.stat().st_mode & 0o7777
        with self._request("write", path=remote, mode=mode) as sock:
            _expect(sock, Frame.FD)
            with _pipe(sock, agent_reads=True) as pipe, open(local, "rb") as f:
                _pump(
                    lambda: os.splice(f.fileno(), pipe, PIPE_SIZE),
                    progress,
                    os.fstat(f.fileno()).st_size,
                )
            return _expect(sock, Frame.RESULT)

    def download_file(self, remote: str, target: Path, progress: Progress | None) -> dict:
        with self._request("read", path=remote) as sock:
            info = _expect(sock, Frame.RESULT)
            _expect(sock, Frame.FD)
            tmp = target.with_name(f".{target.name}.download")
            try:
                with _pipe(sock, agent_reads=False) as pipe, open(tmp, "wb") as f:
                    _write_with_fresh_process(pipe, f.fileno(), progress, info["size"])
                _expect(sock, Frame.END)
                os.chmod(tmp, info["mode"])
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            return info

    def upload_tree(self, local: Path, remote: str, progress: Progress | None) -> dict:
        with self._request("tar_in", path=remote) as sock:
            _expect(sock, Frame.FD)
            with (
                _pipe(sock, agent_reads=True) as pipe,
                _Counting(os.fdopen(pipe, "wb", closefd=False), progress) as out,
            ):
                add_tree(local, out)
            return _expect(sock, Frame.RESULT)

    def download_tree(self, remote: str, target: Path, progress: Progress | None) -> None:
        with self._request("tar_out", path=remote) as sock:
            _expect(sock, Frame.RESULT)
            _expect(sock, Frame.FD)
            with (
                _pipe(sock, agent_reads=False) as pipe,
                _Counting(os.fdopen(pipe, "rb", closefd=False), progress) as source,
            ):
                extract_tree(source, target)
            _expect(sock, Frame.END)


@contextlib.contextmanager
def _pipe(sock: socket.socket, agent_reads: bool) -> Iterator[int]:
    """A pipe with one end passed to the agent; yields the end this side keeps."""
    read_end, write_end = os.pipe()
    give, keep = (read_end, write_end) if agent_reads else (write_end, read_end)
    try:
        fcntl.fcntl(keep, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        socket.send_fds(sock, [b"\0"], [give])
        os.close(give)
        give = -1
        yield keep
    finally:
        for fd in (give, keep):
            if fd >= 0:
                os.close(fd)


def _write_with_fresh_process(
    source: int, target: int, progress: Progress | None, total: int
) -> None:
    """Copy a pipe into a file with a short-lived `cat` (see the agent's twin for why)."""
    writer = subprocess.Popen(["cat"], stdin=source, stdout=target, stderr=subprocess.PIPE)
    while True:
        try:
            writer.wait(PROGRESS_INTERVAL)
            break
        except subprocess.TimeoutExpired:
            if progress is not None:
                progress(os.fstat(target).st_size, total)
    if writer.returncode:
        raise FileError(f"writing the download failed: {writer.stderr.read().decode().strip()}")
    if progress is not None:
        progress(os.fstat(target).st_size, total)


def _pump(step: Callable[[], int], progress: Progress | None, total: int | None) -> None:
    done = 0
    try:
        while moved := step():
            done += moved
            if progress is not None:
                progress(done, total)
    except BrokenPipeError:
        pass  # the agent stopped reading; its answer says why


class _Counting:
    """Wraps a binary file object and reports bytes read or written."""

    def __init__(self, inner: Any, progress: Progress | None) -> None:
        self.inner, self.progress, self.done = inner, progress, 0

    def _count(self, size: int) -> None:
        self.done += size
        if self.progress is not None:
            self.progress(self.done, None)

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self._count(len(data))
        return data

    def write(self, data: bytes) -> int:
        written = self.inner.write(data)
        self._count(len(data))
        return written

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.inner.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SandboxExpired("the sandbox went away during a transfer")
        data += chunk
    return data


def _expect(sock: socket.socket, kind: int) -> dict:
    """Read the next frame; it must be `kind` (an ERROR frame raises its error)."""
    got, size = protocol.HEADER.unpack(_recv_exactly(sock, protocol.HEADER.size))
    payload = _recv_exactly(sock, size) if size else b""
    if got == Frame.ERROR:
        raise_agent_error(payload)
    if got != kind:
        raise SandboxError(f"unexpected frame {got} from the agent (wanted {kind})")
    return json.loads(payload) if payload else {}
