"""Bulk transfers straight to a sandbox's agent, through pipes the kernel copies.

A client on the service's own machine (the same OS user) may connect to the
agent's socket directly. It hands the agent one end of a pipe (SCM_RIGHTS) and
the kernel moves the bytes with splice/sendfile: no HTTP, no copies through
Python, no file descriptor of the host's files ever enters the sandbox. Where
the agent socket cannot be reached, the caller falls back to HTTP streaming.

The agent is as untrusted here as anywhere: its frames are checked by
``untrusted.messages``, what it sends is written by ``untrusted.extract``, and
every wait on it is bounded by ``untrusted.streams``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._errors import FileError, SandboxError, SandboxExpired
from ..agent import protocol
from ..agent.protocol import Frame
from ..untrusted import messages
from ..untrusted.extract import FileDownload, Limits, extract_tree
from ..untrusted.streams import (
    INACTIVITY,
    AgentSpoke,
    PipeReader,
    PipeWriter,
    Throughput,
    silent,
    wait_for_fd,
)
from ._tar import add_tree

Progress = Callable[[int, "int | None"], None]
PIPE_SIZE = 1 << 20
PING_TIMEOUT = 5.0


class DirectTransfer:
    """File transfers of one sandbox over its agent socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def usable(self) -> bool:
        """Can this process talk to the agent (same machine, same user), and pass pipes?"""
        try:
            with _Connection.open(self.socket_path, "ping", PING_TIMEOUT) as conn:
                return conn.expect(Frame.RESULT)["version"] >= protocol.PIPE_VERSION
        except (OSError, SandboxError):
            return False

    def _request(self, op: str, **args: Any) -> _Connection:
        return _Connection.open(self.socket_path, op, INACTIVITY, pipe=True, **args)

    def upload_file(self, local: Path, remote: str, progress: Progress | None) -> dict:
        mode = local.stat().st_mode & 0o7777
        with self._request("write", path=remote, mode=mode) as conn:
            conn.expect(Frame.FD)
            with _pipe(conn.sock, agent_reads=True) as pipe, open(local, "rb") as f:
                os.set_blocking(pipe, False)
                _pump(
                    lambda: _splice_into(f.fileno(), pipe),
                    progress,
                    os.fstat(f.fileno()).st_size,
                )
            return conn.expect(Frame.RESULT)

    def download_file(
        self, remote: str, target: Path, progress: Progress | None, limits: Limits
    ) -> dict:
        """Copy one file; at most (and exactly) the size the agent announced is accepted."""
        with self._request("read", path=remote) as conn:
            info = conn.expect(Frame.RESULT)
            with FileDownload(target, info, remote, limits) as out:
                conn.expect(Frame.FD)
                with _pipe(conn.sock, agent_reads=False) as pipe:
                    _write_with_fresh_process(pipe, out, progress)
                    _expect_end_of(pipe, out.size)
                conn.expect(Frame.END)
                out.commit()
            return info

    def upload_tree(self, local: Path, remote: str, progress: Progress | None) -> dict:
        with self._request("tar_in", path=remote) as conn:
            conn.expect(Frame.FD)
            with (
                contextlib.suppress(BrokenPipeError),  # the agent stopped reading: see its answer
                _pipe(conn.sock, agent_reads=True) as pipe,
                _Counting(PipeWriter(pipe), progress) as out,
            ):
                add_tree(local, out)
            return conn.expect(Frame.RESULT)

    def download_tree(
        self, remote: str, target: Path, progress: Progress | None, limits: Limits
    ) -> None:
        with self._request("tar_out", path=remote) as conn:
            conn.expect(Frame.RESULT)
            conn.expect(Frame.FD)
            with _pipe(conn.sock, agent_reads=False) as pipe:
                source = PipeReader(pipe, watch=conn.sock.fileno())
                try:
                    extract_tree(_Counting(source, progress), target, limits)
                    complete = True
                except AgentSpoke:
                    complete = False
            conn.expect(Frame.END)  # or the error the agent reported instead
            if not complete:
                raise messages.ProtocolViolation("the sandbox's agent ended the archive early")


class _Connection:
    """One request on the agent socket; every frame checked, every wait bounded."""

    def __init__(self, sock: socket.socket, op: str, timeout: float) -> None:
        self.sock, self.op, self.timeout = sock, op, timeout

    @classmethod
    @contextlib.contextmanager
    def open(cls, socket_path: str, op: str, timeout: float, **args: Any) -> Iterator[_Connection]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(protocol.request_line(op, **args))
            yield cls(sock, op, timeout)
        finally:
            sock.close()

    def _recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except TimeoutError:
                raise silent(self.timeout) from None
            if not chunk:
                raise SandboxExpired("the sandbox went away during a transfer")
            data += chunk
        return bytes(data)

    def expect(self, kind: Frame) -> dict:
        """Read the next frame; it must be `kind` (an ERROR frame raises its error)."""
        got, size = protocol.HEADER.unpack(self._recv_exactly(protocol.HEADER.size))
        frame = messages.check_header(self.op, got, size)
        payload = self._recv_exactly(size) if size else b""
        if frame == Frame.ERROR:
            raise messages.agent_error(payload)
        if frame != kind:
            raise messages.ProtocolViolation(
                f"the sandbox's agent sent a {frame.name} frame (expected {kind.name})"
            )
        return messages.parse_result(self.op, payload) if kind == Frame.RESULT else {}


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


def _write_with_fresh_process(source: int, out: FileDownload, progress: Progress | None) -> None:
    """Splice exactly the announced size from a pipe into the file, in a fresh thread.

    Linux throttles a task by how many pages it has dirtied so far, so a fresh
    thread writes into the page cache at memory speed where a long-lived one would
    crawl (see the agent's twin). A pipe silent for INACTIVITY seconds ends the copy.
    """
    failure: list[BaseException] = []

    def copy() -> None:
        try:
            done, throughput = 0, Throughput()
            while done < out.size:
                wait_for_fd(source, select.POLLIN, INACTIVITY)
                moved = os.splice(source, out.fd, min(out.size - done, PIPE_SIZE))
                if not moved:
                    return  # the sandbox sent less: commit() says how much
                done += moved
                throughput.add(moved)
                if progress is not None:
                    progress(done, out.size)
        except BaseException as e:
            failure.append(e)

    writer = threading.Thread(target=copy, name="jupyter-sandbox-download")
    writer.start()
    writer.join()
    if failure:
        raise failure[0]


def _expect_end_of(pipe: int, size: int) -> None:
    """The pipe must end after the announced size: a sandbox may not send more."""
    wait_for_fd(pipe, select.POLLIN, INACTIVITY)
    if os.read(pipe, 1):
        raise FileError(f"the sandbox sent more than the {size} bytes it announced")


def _splice_into(source: int, pipe: int) -> int:
    """Move up to PIPE_SIZE bytes into the agent's pipe; wait at most INACTIVITY for room."""
    while True:
        try:
            return os.splice(source, pipe, PIPE_SIZE, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            wait_for_fd(pipe, select.POLLOUT, INACTIVITY)


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
        pass
