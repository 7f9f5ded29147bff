"""The synchronous facade: ``Sandbox`` runs ``AsyncSandbox`` on a private event loop thread.

This works where the caller already runs an event loop (a Jupyter kernel):
the coroutine runs on the portal's own loop and the caller blocks on its
result. Ctrl-C while waiting cancels the remote operation (a running command
is stopped; the sandbox stays usable) and re-raises KeyboardInterrupt.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal as signals
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .._models import (
    CommandResult,
    FileInfo,
    LogEntry,
    OutputLine,
    Recording,
    SandboxInfo,
    SshAccess,
    Usage,
)
from ._async import AsyncProcess, AsyncSandbox
from ._files import Progress

T = TypeVar("T")


class Portal:
    """An event loop in a daemon thread, shared by every synchronous handle."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="jupyter-sandbox", daemon=True
        )
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal; Ctrl-C cancels it and waits until it has unwound."""
        settled = threading.Event()

        async def tracked() -> T:
            try:
                return await coro
            finally:
                settled.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            settled.wait(5)  # the remote operation is stopped before we go on
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iteration[T]:
        """A blocking iterator over an async iterator running on the portal."""
        return Iteration(self, agen)


class Iteration(Iterator[T]):
    """Blocking iteration over an async iterator; ``close()`` (or ``with``) ends it early."""

    def __init__(self, portal: Portal, agen: AsyncIterator[T]) -> None:
        self._portal, self._agen, self._closed = portal, agen, False
        _open_iterations.add(self)

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            return self._portal.call(self._agen.__anext__())
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    def close(self) -> None:
        """Stop following (a log, a command's output) and free the connection."""
        if not self._closed:
            self._closed = True
            aclose = getattr(self._agen, "aclose", None)
            if aclose is not None and self._portal.thread.is_alive():
                self._portal.call(aclose())

    def __enter__(self) -> Iteration[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_portal: Portal | None = None
_portal_lock = threading.Lock()
_owned: dict[str, Sandbox] = {}
_open_iterations: weakref.WeakSet[Iteration] = weakref.WeakSet()


def portal() -> Portal:
    global _portal
    with _portal_lock:
        if _portal is None or _portal.pid != os.getpid():
            _portal = Portal()
            _portal.pid = os.getpid()
            atexit.register(_kill_owned)
        return _portal


def _kill_owned() -> None:
    """At interpreter exit, close open iterations and end the sandboxes this process owns."""
    for iteration in list(_open_iterations):
        with contextlib.suppress(Exception):
            iteration.close()
    for sandbox in list(_owned.values()):
        try:
            sandbox.kill()
        except Exception:
            pass


class Process:
    """A background process started with ``Sandbox.spawn``."""

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner
        self.pid = inner.pid
        self.command = inner.command

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} {self.command!r}>"

    @property
    def exit_code(self) -> int | None:
        return self._inner.exit_code

    @property
    def running(self) -> bool:
        return portal().call(self._inner.is_running())

    def wait(self, timeout: float | None = None) -> int | None:
        return portal().call(self._inner.wait(timeout))

    def kill(self, signal: int = signals.SIGTERM) -> None:
        portal().call(self._inner.kill(signal))

    def output(self, follow: bool = True) -> Iteration[OutputLine]:
        return portal().iterate(self._inner.output(follow))


class FileSystem:
    """``sandbox.fs``: paths are inside the sandbox, relative ones to its home."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._fs = sandbox.fs

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return portal().call(getattr(self._fs, name)(*args, **kwargs))

    def upload(
        self, local: str | os.PathLike, remote: str, progress: Progress | None = None
    ) -> None:
        self._call("upload", local, remote, progress)

    def download(
        self, remote: str, local: str | os.PathLike, progress: Progress | None = None
    ) -> None:
        self._call("download", remote, local, progress)

    def read_text(self, path: str) -> str:
        return self._call("read_text", path)

    def read_bytes(self, path: str) -> bytes:
        return self._call("read_bytes", path)

    def write_text(self, path: str, text: str, mode: int | None = None) -> FileInfo:
        return self._call("write_text", path, text, mode)

    def write_bytes(self, path: str, data: bytes, mode: int | None = None) -> FileInfo:
        return self._call("write_bytes", path, data, mode)

    def list(self, path: str = ".") -> list[FileInfo]:
        return self._call("list", path)

    def stat(self, path: str) -> FileInfo:
        return self._call("stat", path)

    def exists(self, path: str) -> bool:
        return self._call("exists", path)

    def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        return self._call("mkdir", path, parents, exist_ok)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._call("remove", path, recursive)

    def rename(self, src: str, dst: str) -> FileInfo:
        return self._call("rename", src, dst)


class Sandbox:
    """A handle on one sandbox; the blocking twin of :class:`AsyncSandbox`."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.id = inner.id
        self.name = inner.name
        self.fs = FileSystem(inner)
        if inner.owns_lease:
            _owned[self.id] = self

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} name={self.name!r}>"

    @classmethod
    def create(
        cls,
        *,
        name: str | None = None,
        timeout: str | float = "session",
        memory: str | int | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        fds: int | None = None,
        disk: str | int | None = None,
        network: str = "none",
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        owner: str | None = None,
        record_terminals: bool = False,
    ) -> Sandbox:
        """Start a sandbox. ``timeout`` is "session" (lives with this process) or a duration;
        `record_terminals` records its SSH terminal sessions (``recordings()``)."""
        return cls(
            portal().call(
                AsyncSandbox.create(
                    name=name,
                    timeout=timeout,
                    memory=memory,
                    cpus=cpus,
                    pids=pids,
                    fds=fds,
                    disk=disk,
                    network=network,
                    env=env,
                    labels=labels,
                    owner=owner,
                    record_terminals=record_terminals,
                )
            )
        )

    @classmethod
    def connect(cls, ref: str) -> Sandbox:
        """Attach to a running sandbox by id or name."""
        return cls(portal().call(AsyncSandbox.connect(ref)))

    @classmethod
    def list(cls, include_ended: bool = False, mine: bool = False) -> list[SandboxInfo]:
        """See :meth:`AsyncSandbox.list`."""
        return portal().call(AsyncSandbox.list(include_ended, mine))

    @classmethod
    def usage(cls, user: str | None = None) -> Usage:
        """Your quota and what your sandboxes hold against it (a quota of None: unlimited);
        an instructor may name another `user`."""
        return portal().call(AsyncSandbox.usage(user))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def info(self) -> SandboxInfo:
        return portal().call(self._inner.info())

    def extend_timeout(self, timeout: str | float) -> SandboxInfo:
        info = portal().call(self._inner.extend_timeout(timeout))
        _owned.pop(self.id, None)
        return info

    def restart(self) -> SandboxInfo:
        """Start a failed sandbox again: the same id, name, home, limits and deadline."""
        return portal().call(self._inner.restart())

    def kill(self) -> None:
        _owned.pop(self.id, None)
        portal().call(self._inner.kill())

    def expose_ssh(
        self,
        *,
        ttl: str | float | None = None,
        single_use: bool = False,
        public_key: str | None = None,
    ) -> SshAccess:
        """A fresh SSH credential for this sandbox; see :meth:`AsyncSandbox.expose_ssh`."""
        return portal().call(
            self._inner.expose_ssh(ttl=ttl, single_use=single_use, public_key=public_key)
        )

    def revoke_ssh(self, access: SshAccess | str | None = None) -> int:
        """Revoke one SSH credential or all of them; live sessions are closed."""
        return portal().call(self._inner.revoke_ssh(access))

    def sh(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> CommandResult:
        """Run `cmd` with /bin/sh and return its result; see :meth:`AsyncSandbox.sh`."""
        return portal().call(
            self._inner.sh(
                cmd,
                cwd=cwd,
                env=env,
                input=input,
                timeout=timeout,
                check=check,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )

    def stream(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        input: str | bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Iteration[OutputLine]:
        """Iterate over the command's output lines as they are produced."""
        return portal().iterate(
            self._inner.stream(cmd, cwd=cwd, env=env, input=input, timeout=timeout, check=check)
        )

    def spawn(
        self, cmd: str, *, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> Process:
        return Process(portal().call(self._inner.spawn(cmd, cwd=cwd, env=env)))

    def processes(self) -> list[Process]:
        return [Process(p) for p in portal().call(self._inner.processes())]

    def logs(self, follow: bool = False, tail: int | None = None) -> Iteration[LogEntry]:
        return portal().iterate(self._inner.logs(follow=follow, tail=tail))

    def recordings(self) -> list[Recording]:
        """The sandbox's terminal recordings, oldest first (none unless ``info().recording``)."""
        return portal().call(self._inner.recordings())

    def recording(self, name: str | Recording) -> bytes:
        """One recording's asciicast v2 file (a header line, then one event a line)."""
        return portal().call(self._inner.recording(name))
